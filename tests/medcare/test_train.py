"""medcare.train, in process on tiny saved models: stage 1 -> stage 2 -> export end to end, the loss and the
orthogonality penalty fall, one optimizer step does not depend on how it is split into micro-batches
(the penalty is not multiplied by gradient accumulation), user errors are one line, exit 2, no output; and
stage 2 from an original stage-1 directory with a frozen knowledge LoRA, resume, gradient checkpointing."""

from __future__ import annotations

import json
import os

import pytest
import torch
from pipeline_testing import (
    OFFICIAL_E,
    fabricate_official_stage1,
    input_ids,
    last_stderr_line,
    logged_steps,
    logits,
    one_thread,
    randomize_adapters,
    records,
    rel_err,
    run_train,
    save_base,
    stage1_config,
    stage1_meta,
    stage2_config,
    stage2_meta,
    tiny_model,
    user_error_line,
    write_jsonl,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import medcare_kernels as mk
from medcare import trainer as trainer_mod
from medcare.checkpoint import (
    ADAPTER_FILE,
    MANIFEST_FILE,
    adapter_state,
    load_adapter_state,
    read_stage,
    save_stage,
)
from medcare.config import Stage2Config
from medcare.data import DataCollator, SupervisedDataset, load_records
from medcare.inject import apply_stage1
from medcare.stage_model import build_stage_model

QUIET = ["--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--model_dtype", "float32"]
STAGE1_ADAPTERS = ["--num_experts", "4", "--top_k", "2", "--expert_rank", "4", "--shared_rank", "8",
                   "--attn_rank", "4", "--attn_alpha", "8", "--mlp_alpha", "8"]
FAST = ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--num_train_epochs", "2",
        "--learning_rate", "1e-2", "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--logging_steps", "1",
        *QUIET]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


def load_base(path):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def env(tmp_path_factory, chatml_tokenizer):
    """A saved tiny Qwen2 base, a tiny Llama base of the same sizes, training data, and stage-1 / stage-2
    directories made through the API (random adapters) for the stage-2 and error tests."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("train")
    vocab = len(chatml_tokenizer)
    base = save_base(root / "base", tiny_model("qwen2", vocab), chatml_tokenizer)
    llama = save_base(root / "llama", tiny_model("llama", vocab), chatml_tokenizer)
    data = write_jsonl(root / "data.jsonl", records(8))
    cfg1 = stage1_config()
    stage1_dirs = {}
    for name, path in (("qwen2", base), ("llama", llama)):
        model = load_base(path)
        apply_stage1(model, cfg1)
        randomize_adapters(model, std=0.1)
        stage1_dirs[name] = save_stage(str(root / f"stage1-{name}"), adapter_state(model),
                                       stage1_meta(cfg1, model, path))
    model = load_base(base)
    attention = build_stage_model(model, read_stage(stage1_dirs["qwen2"]), alignment=stage2_config()).attention
    stage2 = save_stage(str(root / "stage2"), {**adapter_state(model), **attention},
                        stage2_meta(cfg1, stage2_config(), model, stage1_dirs["qwen2"], base))
    return dict(root=root, base=base, llama=llama, data=data, stage1=stage1_dirs["qwen2"],
                stage1_llama=stage1_dirs["llama"], stage2=stage2, vocab=vocab)


# ----------------------------------------------------------------------------------------------- e2e
def test_stage1_stage2_export_end_to_end(env, tmp_path, capfd):
    s1, s2, out = tmp_path / "s1", tmp_path / "s2", tmp_path / "exported"
    assert run_train(["stage1", "--model", env["base"], "--data", env["data"], "--output", s1, *STAGE1_ADAPTERS,
                      *FAST]) == 0
    stage1_logs = logged_steps(s1)
    assert sorted(os.listdir(s1)) == [ADAPTER_FILE, "expert_usage.json", "expert_usage.png", MANIFEST_FILE,
                                      "trainer_state.json"]
    stage1 = read_stage(str(s1), expect_stage=1)
    assert stage1.stage1.num_experts == 4 and stage1.stage1.shared_rank == 8
    assert all(torch.count_nonzero(v) > 0 for k, v in stage1.tensors.items() if k.endswith("lora_b"))

    assert run_train(["stage2", "--model", env["base"], "--stage1", s1, "--data", env["data"], "--output", s2,
                      "--rank", "8", *FAST]) == 0
    stage2_logs = logged_steps(s2)
    assert sorted(os.listdir(s2)) == [ADAPTER_FILE, MANIFEST_FILE, "trainer_state.json"]
    stage2 = read_stage(str(s2), expect_stage=2)
    assert {"stage", "stage1", "stage2", "stage1_dir", "base_model"} <= set(stage2.meta)
    assert {k.rsplit(".", 2)[1] for k in stage2.tensors} == {"attention", "knowledge", "alignment"}

    assert run_train(["export", "--stage2", s2, "--output", out]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    capfd.readouterr()

    # The logged training loss fell in each stage (8 optimizer steps; stage 2's logged loss includes the
    # penalty, and orth_loss is logged beside it).
    assert len(stage1_logs) == 8 and len(stage2_logs) == 8
    ce1 = [e["loss"] for e in stage1_logs]
    ce2 = [e["loss"] - e["orth_loss"] for e in stage2_logs]
    assert sum(ce1[-2:]) < sum(ce1[:2]) - 0.1, ce1
    assert sum(ce2[-2:]) < sum(ce2[:2]) - 0.05, ce2

    # On the whole data set, the trained adapters have a lower loss than where each stage started.
    tokenizer = AutoTokenizer.from_pretrained(env["base"])
    batch = DataCollator(tokenizer)([*SupervisedDataset(load_records([env["data"]]), tokenizer)])
    start1 = load_base(env["base"])
    apply_stage1(start1, stage1.stage1)
    trained1 = load_base(env["base"])
    apply_stage1(trained1, stage1.stage1)
    load_adapter_state(trained1, stage1.tensors)
    assert data_loss(trained1, batch) < data_loss(start1, batch) - 0.05
    s2_cfg = Stage2Config(**stage2.meta["stage2"])
    start2 = load_base(env["base"])
    build_stage_model(start2, stage1, alignment=s2_cfg)
    trained2 = load_base(env["base"])
    build_stage_model(trained2, stage1, alignment=s2_cfg)
    used = load_adapter_state(trained2, stage2.tensors, roles=("knowledge", "alignment"))
    assert used == {k for k in stage2.tensors if ".attention." not in k}
    assert data_loss(trained2, batch) < data_loss(start2, batch) - 0.05

    # The exported checkpoint computes what the trained stage-2 adapters compute.
    ids = input_ids(env["vocab"])
    assert rel_err(logits(load_base(out), ids), logits(trained2, ids)) <= 1e-5


def test_stage1_without_routed_experts_is_attention_and_shared_lora_into_stage2(env, tmp_path):
    """--num_experts 0 (the ablation's "no noise aggregator" and single-stage LoRA): the MLP gets the shared LoRA
    alone, no router and no expert-usage files; the directory goes through stage 2 like any stage 1."""
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    argv = ["--model", env["base"], "--data", env["data"], *FAST, "--num_train_epochs", "1"]
    assert run_train(["stage1", *argv, "--output", s1, *STAGE1_ADAPTERS, "--num_experts", "0"]) == 0
    assert sorted(os.listdir(s1)) == [ADAPTER_FILE, MANIFEST_FILE, "trainer_state.json"]
    stage1 = read_stage(str(s1), expect_stage=1)
    assert {k.rsplit(".", 2)[1] for k in stage1.tensors} == {"attention", "shared"}
    assert all(torch.count_nonzero(v) > 0 for k, v in stage1.tensors.items() if k.endswith("lora_b"))
    # Trainable: the attention LoRA and the shared LoRA (rank 8) of every MLP projection, nothing else.
    model = load_base(env["base"])
    apply_stage1(model, stage1.stage1)
    trainable = {n.rsplit(".", 1)[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_a", "lora_b"}
    assert {m.adapter_ranks["shared"] for n, m in model.named_modules() if n.endswith("mlp.up_proj")} == {8}
    # Without routed experts, "experts kept" and "experts dropped" are the same model.
    load_adapter_state(model, stage1.tensors)
    dropped = load_base(env["base"])
    build_stage_model(dropped, stage1)
    ids = input_ids(env["vocab"])
    assert rel_err(logits(dropped, ids), logits(model, ids)) <= 1e-5
    assert run_train(["stage2", *argv, "--stage1", s1, "--output", s2]) == 0
    stage2 = read_stage(str(s2), expect_stage=2)
    assert stage2.stage2.rank == 8 and {k.rsplit(".", 2)[1] for k in stage2.tensors} == {"attention", "knowledge",
                                                                                           "alignment"}


@torch.no_grad()
def data_loss(model, batch) -> float:
    model.eval()
    return float(model(**batch).loss)


def test_orth_loss_is_logged_and_falls_with_a_large_lambda(env, tmp_path):
    assert run_train(["stage2", "--model", env["base"], "--stage1", env["stage1"], "--data", env["data"],
                      "--output", tmp_path / "s2", "--rank", "8", "--orth_lambda", "50", *FAST]) == 0
    logs = logged_steps(tmp_path / "s2")
    assert len(logs) == 8 and all("orth_loss" in e for e in logs)
    orth = [e["orth_loss"] for e in logs]
    assert orth[0] > 1.0
    assert orth[-1] < 0.5 * orth[0], orth
    assert orth[-1] == min(orth), orth
    # The logged loss is CE + lambda * penalty, so here it is dominated by the penalty.
    assert all(e["loss"] > 50 * e["orth_loss"] for e in logs)


def test_no_orth_loss_logged_without_the_penalty(env, tmp_path):
    assert run_train(["stage2", "--model", env["base"], "--stage1", env["stage1"], "--data", env["data"],
                      "--output", tmp_path / "s2", "--rank", "8", "--orth_lambda", "0", "--max_steps", "2", *FAST]) == 0
    logs = logged_steps(tmp_path / "s2")
    assert logs and not any("orth_loss" in e for e in logs)
    assert all(e["loss"] < 10 for e in logs)  # plain CE of a tiny random model (~ln 477 = 6.2)


# ------------------------------------------------------------------------------ gradient accumulation
def one_step(env, out, batch: int, accumulation: int, data: str, *extra) -> dict[str, torch.Tensor]:
    argv = ["stage2", "--model", env["base"], "--stage1", env["stage1"], "--data", data, "--output", out,
            "--rank", "8", "--dropout", "0", "--orth_lambda", "2", "--max_steps", "1",
            "--per_device_train_batch_size", batch, "--gradient_accumulation_steps", accumulation,
            "--optim", "sgd", "--learning_rate", "0.05", "--max_grad_norm", "0", "--weight_decay", "0",
            "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--train_sampling_strategy", "sequential",
            "--logging_steps", "1", *QUIET, *extra]
    assert run_train(argv) == 0
    return load_file(os.path.join(out, ADAPTER_FILE))


def assert_same_update(env, full, split):
    start = read_stage(env["stage1"]).tensors
    diff2 = update2 = 0.0
    for key, v in full.items():
        diff2 += float((v - split[key]).double().square().sum())
        if ".knowledge." in key:
            init = start[key.replace(".knowledge.", ".shared.")]
            update2 += float((v - init).double().square().sum())
        elif key.endswith("alignment.lora_b"):  # starts at zero
            update2 += float(v.double().square().sum())
    assert update2 > 1e-6  # the step did something
    assert diff2 ** 0.5 <= 1e-4 * update2 ** 0.5, (diff2 ** 0.5, update2 ** 0.5)


def test_gradient_accumulation_gives_the_same_step(env, tmp_path):
    """8 x 1 and 2 x 4 over the same 8 records (different lengths, so different label counts per
    micro-batch): one SGD step must move the adapters identically, penalty included."""
    full = one_step(env, tmp_path / "full", 8, 1, env["data"])
    split = one_step(env, tmp_path / "split", 2, 4, env["data"])
    assert_same_update(env, full, split)


def test_chunked_loss_head_is_on_by_default_and_takes_the_plain_heads_step(env, tmp_path, monkeypatch, capfd):
    """The loss head that never holds all logits (medcare.loss_head) against the model's own, with gradient
    accumulation (the Trainer's num_items_in_batch path) and the orthogonality penalty: the same step."""
    calls = []
    real = mk.linear_cross_entropy
    monkeypatch.setattr(mk, "linear_cross_entropy", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    chunked = one_step(env, tmp_path / "chunked", 2, 4, env["data"])
    assert len(calls) == 4  # one call per micro-batch
    chunked_log = logged_steps(tmp_path / "chunked")
    calls.clear()
    plain = one_step(env, tmp_path / "plain", 2, 4, env["data"], "--chunked_loss", "false")
    assert not calls
    assert "chunked loss head is off" not in capfd.readouterr().out
    assert chunked_log[0]["loss"] == pytest.approx(logged_steps(tmp_path / "plain")[0]["loss"], rel=1e-6)
    for k in plain:
        torch.testing.assert_close(chunked[k], plain[k], rtol=1e-5, atol=1e-7)


def test_gradient_accumulation_without_loss_kwargs(env, tmp_path, monkeypatch):
    """The other branch: a model whose loss the Trainer divides by the accumulation itself. Identical records,
    so the mean of micro-batch means equals the full-batch mean and only the penalty could differ."""
    class NoLossKwargs(trainer_mod.MedCareTrainer):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            self.model_accepts_loss_kwargs = False

    monkeypatch.setattr(trainer_mod, "MedCareTrainer", NoLossKwargs)
    same = write_jsonl(tmp_path / "same.jsonl", [records(1)[0]] * 8)
    full = one_step(env, tmp_path / "full", 8, 1, same)
    split = one_step(env, tmp_path / "split", 2, 4, same)
    assert_same_update(env, full, split)


# -------------------------------------------------------------------------------------- user errors
def bad_json(root) -> str:
    path = root / "bad.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}\n')
    return str(path)


def wrong_records(root) -> str:
    path = root / "wrong.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "assistant", "content": "no question"}], "x": 1}) + "\n"
                    + json.dumps({"text": "not a conversation"}) + "\n")
    return str(path)


def broken_config_dir(root) -> str:
    path = root / "broken-model"
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text("{ this is not json")
    return str(path)


def no_config_dir(root) -> str:
    path = root / "not-a-model"
    path.mkdir(exist_ok=True)
    (path / "weights.bin").write_bytes(b"")
    return str(path)


# case -> (argv before --output, a word the error line must contain)
ERROR_CASES = {
    "missing model dir": (lambda e, r: ["stage1", "--model", r / "no-such-model", "--data", e["data"]],
                          "no-such-model"),
    "model dir without config": (lambda e, r: ["stage1", "--model", no_config_dir(r), "--data", e["data"]],
                                 "config.json"),
    "missing data file": (lambda e, r: ["stage1", "--model", e["base"], "--data", r / "nope.jsonl"], "nope.jsonl"),
    "data file not JSON": (lambda e, r: ["stage1", "--model", e["base"], "--data", bad_json(r)], "bad.jsonl"),
    "data records malformed": (lambda e, r: ["stage1", "--model", e["base"], "--data", wrong_records(r)],
                               "wrong.jsonl"),
    "top_k > num_experts": (lambda e, r: ["stage1", "--model", e["base"], "--data", e["data"], "--num_experts", "2",
                                          "--top_k", "3"], "top_k"),
    "stage-2 dir as --stage1": (lambda e, r: ["stage2", "--model", e["base"], "--stage1", e["stage2"], "--data",
                                              e["data"]], "stage-2"),
    "--stage1 of another architecture": (lambda e, r: ["stage2", "--model", e["base"], "--stage1",
                                                       e["stage1_llama"], "--data", e["data"]], "model_type"),
    "--stage1 missing": (lambda e, r: ["stage2", "--model", e["base"], "--stage1", r / "no-stage1", "--data",
                                       e["data"]], "no-stage1"),
    "unknown MLP target": (lambda e, r: ["stage1", "--model", e["base"], "--data", e["data"], "--mlp_targets",
                                         "gate_proj", "fc9"], "fc9"),
    "resume with no checkpoint": (lambda e, r: ["stage1", "--model", e["base"], "--data", e["data"],
                                                "--resume_from_checkpoint", "last"], "no checkpoint-*"),
    "model config not JSON": (lambda e, r: ["stage1", "--model", broken_config_dir(r), "--data", e["data"]],
                              "broken-model"),
    "no experts and no shared LoRA": (lambda e, r: ["stage1", "--model", e["base"], "--data", e["data"],
                                                    "--num_experts", "0", "--shared_rank", "0"], "shared_rank >= 1"),
    "no experts to balance": (lambda e, r: ["stage1", "--model", e["base"], "--data", e["data"], "--num_experts",
                                            "0", "--router_aux_loss_coef", "0.1"], "router_aux_loss_coef"),
}
# options out of range or unknown values, each on an otherwise good stage-1 run: (option, value, word)
for _opt, _value, _word in [("--shared_rank", "-1", "shared_rank"), ("--expert_rank", "0", "expert_rank"),
                            ("--attn_dropout", "1.5", "attn_dropout"), ("--num_experts", "-1", "num_experts"),
                            ("--on_bad_records", "ignore", "--on_bad_records"),
                            ("--label_mask", "everything", "--label_mask"),
                            ("--model_dtype", "float8", "--model_dtype")]:
    ERROR_CASES[f"{_opt} {_value}"] = (
        lambda e, r, o=_opt, v=_value: ["stage1", "--model", e["base"], "--data", e["data"], *STAGE1_ADAPTERS, o, v],
        _word)


def run_error_case(env, tmp_path, capfd, case):
    """(exit status, the one stderr line, --output): the run must report its error as exactly one line."""
    out = tmp_path / "out"
    command, *options = ERROR_CASES[case][0](env, tmp_path)
    argv = [command, "--output", out, *FAST, *options]  # the case's options last: they win over FAST's
    capfd.readouterr()
    rc = run_train(argv)
    return rc, user_error_line(capfd), out


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_user_errors_exit_2_in_one_line_and_write_nothing(env, tmp_path, capfd, case):
    rc, line, out = run_error_case(env, tmp_path, capfd, case)
    assert rc == 2, line
    assert ERROR_CASES[case][1] in line, line
    assert not out.exists()


def test_every_record_truncated_away_is_a_user_error(env, tmp_path, capfd):
    out = tmp_path / "out"
    rc = run_train(["stage1", "--model", env["base"], "--data", env["data"], "--output", out, "--model_max_length", "3",
                    *STAGE1_ADAPTERS, *FAST])
    err = capfd.readouterr().err
    assert rc == 2 and "Traceback" not in err and "truncat" in err.splitlines()[-1]
    assert not out.exists()


# ------------------------------------------------------------------------------------- more stage runs
def test_stage2_from_an_official_stage1_with_frozen_knowledge(env, tmp_path):
    official = tmp_path / "official"
    raw, _ = fabricate_official_stage1(str(official), load_base(env["base"]))
    out = tmp_path / "s2"
    assert run_train(["stage2", "--model", env["base"], "--stage1", official, "--data", env["data"], "--output", out,
                      "--rank", "8", "--freeze_knowledge", "true", "--weight_decay", "0", "--max_steps", "2",
                      *FAST]) == 0
    stage2 = read_stage(str(out), expect_stage=2)
    assert stage2.meta["stage1"]["num_experts"] == OFFICIAL_E and stage2.meta["stage2"]["freeze_knowledge"]
    moved = 0.0
    for i in range(2):
        for p in ("gate_proj", "up_proj", "down_proj"):
            key, pre = f"model.layers.{i}.mlp.{p}", f"base_model.model.model.layers.{i}.mlp.{p}"
            # The frozen knowledge LoRA is exactly the original shared LoRA after training.
            assert torch.equal(stage2.tensors[f"{key}.knowledge.lora_a"], raw[f"{pre}.share_experts.lora_A.weight"])
            assert torch.equal(stage2.tensors[f"{key}.knowledge.lora_b"], raw[f"{pre}.share_experts.lora_B.weight"])
            moved += float(stage2.tensors[f"{key}.alignment.lora_b"].abs().sum())
    assert moved > 0  # while the alignment LoRA trained
    assert any(".attention." in k for k in stage2.tensors)


def test_freeze_knowledge_with_weight_decay_is_refused(env, tmp_path, capfd):
    out = tmp_path / "s2"
    assert run_train(["stage2", "--model", env["base"], "--stage1", env["stage1"], "--data", env["data"],
                      "--output", out, "--freeze_knowledge", "true", "--weight_decay", "0.1", *FAST]) == 2
    assert "weight_decay" in capfd.readouterr().err
    assert not out.exists()


def test_resume_from_checkpoint_continues_exactly(env, tmp_path):
    argv = ["stage2", "--model", env["base"], "--stage1", env["stage1"], "--data", env["data"], "--rank", "8",
            "--dropout", "0.1", "--max_steps", "4", "--per_device_train_batch_size", "2",
            "--gradient_accumulation_steps", "1", "--learning_rate", "1e-2", "--lr_scheduler_type", "constant",
            "--warmup_steps", "0", "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true",
            "--model_dtype", "float32"]
    full = tmp_path / "full"
    assert run_train(argv + ["--output", full, "--save_strategy", "steps", "--save_steps", "2"]) == 0
    assert {ADAPTER_FILE, MANIFEST_FILE, "optimizer.pt"} <= set(os.listdir(full / "checkpoint-2"))
    read_stage(str(full / "checkpoint-2"), expect_stage=2)
    resumed = tmp_path / "resumed"
    assert run_train(argv + ["--output", resumed, "--save_strategy", "no",
                       "--resume_from_checkpoint", full / "checkpoint-2"]) == 0
    want, got = load_file(str(full / ADAPTER_FILE)), load_file(str(resumed / ADAPTER_FILE))
    assert set(want) == set(got)
    start = load_file(str(full / "checkpoint-2" / ADAPTER_FILE))
    assert any(not torch.equal(want[k], start[k]) for k in want)  # steps 3 and 4 did something
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7)


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
def test_gradient_checkpointing_gives_the_same_step(env, tmp_path):
    argv = ["stage1", "--model", env["base"], "--data", env["data"], *STAGE1_ADAPTERS, "--attn_dropout", "0.3",
            "--max_steps", "1", "--optim", "sgd", "--learning_rate", "0.1", "--max_grad_norm", "0",
            "--train_sampling_strategy", "sequential", *FAST]
    assert run_train(argv + ["--output", tmp_path / "plain"]) == 0
    assert run_train(argv + ["--output", tmp_path / "ckpt", "--gradient_checkpointing", "true"]) == 0
    plain, ckpt = load_file(str(tmp_path / "plain" / ADAPTER_FILE)), load_file(str(tmp_path / "ckpt" / ADAPTER_FILE))
    assert any(torch.count_nonzero(v) for k, v in plain.items() if k.endswith("experts.lora_b"))
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-7)


def test_stage2_after_a_partial_stage1_uses_or_names_its_targets(env, tmp_path, capfd):
    s1 = tmp_path / "s1"
    assert run_train(["stage1", "--model", env["base"], "--data", env["data"], "--output", s1, *STAGE1_ADAPTERS,
                      "--mlp_targets", "up_proj", "--max_steps", "1", *FAST]) == 0
    capfd.readouterr()
    out = tmp_path / "s2"
    rc = run_train(["stage2", "--model", env["base"], "--stage1", s1, "--data", env["data"], "--output", out,
                    "--max_steps", "1", *FAST])
    err = capfd.readouterr().err
    if rc == 0:  # stage 2 followed stage 1's MLP targets
        assert {k.split(".")[4] for k in read_stage(str(out)).tensors if ".knowledge." in k} == {"up_proj"}
    else:  # or it says what to change
        assert rc == 2 and "--targets" in err and "up_proj" in err, err
    # With matching targets it works.
    assert run_train(["stage2", "--model", env["base"], "--stage1", s1, "--data", env["data"], "--output",
                      tmp_path / "s2b", "--targets", "up_proj", "--max_steps", "1", *FAST]) == 0


def test_help_lists_the_subcommands_and_how_to_get_their_options(capsys):
    from medcare import train

    assert train.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "subcommands: demo, stage1, stage2, export" in out
    assert "`python -m medcare.train SUBCOMMAND --help` lists its options" in out


def test_options_without_a_subcommand_go_to_the_demo(tmp_path, capfd):
    """`python -m medcare.train --output DIR` is the demo with that option (checked here on its refusal of a
    non-empty directory, before anything is built); an option the demo lacks is one line naming the demo."""
    from medcare import train

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    assert train.main(["--output", str(tmp_path / "taken")]) == 2
    assert "already exists and is not empty" in user_error_line(capfd)
    assert train.main(["--learning_rate", "1"]) == 2
    line = user_error_line(capfd)
    assert "--learning_rate" in line and "python -m medcare.train demo --help" in line, line
    assert os.listdir(tmp_path) == ["taken"]


def test_a_non_empty_output_is_never_overwritten(env, tmp_path, capfd):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert run_train(["stage1", "--model", env["base"], "--data", env["data"], "--output", out, *FAST]) == 2
    assert "already exists and is not empty" in last_stderr_line(capfd)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    # stage 2 writing into its own --stage1 directory is refused even with --overwrite_output
    before = (tmp_path / "x").exists()
    assert run_train(["stage2", "--model", env["base"], "--stage1", env["stage1"], "--data", env["data"], "--output",
                      env["stage1"], "--overwrite_output", "true", *FAST]) == 2
    assert "is also an input" in last_stderr_line(capfd) and not before
    assert '"stage": 1' in open(os.path.join(env["stage1"], "medcare_adapter.json")).read()


def test_a_bad_kernel_backend_is_reported_before_loading(env, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("MEDCARE_KERNELS_BACKEND", "fastest")
    out = tmp_path / "out"
    assert run_train(["stage1", "--model", env["base"], "--data", env["data"], "--output", out, *FAST]) == 2
    assert "MEDCARE_KERNELS_BACKEND" in last_stderr_line(capfd)
    assert not out.exists()
