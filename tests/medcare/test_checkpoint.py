"""medcare.checkpoint: stage directories (round trip, manifest, checksum, refusals), the stage-1 -> stage-2
transition (= stage-1 model without the routed experts), export (a plain HF checkpoint that computes what
the stage-2 adapters compute, loadable without medcare) and import of the original implementation's
stage-1 artifacts (mapped exactly, never unpickling arbitrary objects)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from pipeline_testing import (
    ATTN,
    MLP,
    NUM_LAYERS,
    OFFICIAL_ALPHA,
    OFFICIAL_E,
    OFFICIAL_K,
    OFFICIAL_R,
    fabricate_official_stage1,
    input_ids,
    logits,
    one_thread,
    randomize_adapters,
    rel_err,
    save_base,
    stage1_config,
    stage1_meta,
    stage2_config,
    stage2_meta,
    tiny_config,
    tiny_model,
)
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

import medcare
from medcare import train as train_mod
from medcare.checkpoint import (
    ADAPTER_FILE,
    MANIFEST_FILE,
    CheckpointError,
    adapter_state,
    check_base_matches,
    load_adapter_state,
    load_stage1,
    read_stage,
    save_stage,
)
from medcare.config import ConfigError
from medcare.files import sha256_file
from medcare.inject import adapter_modules, apply_stage1
from medcare.layers import LoRALinear, MoLoRALinear
from medcare.stage_model import build_stage_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


def load_base(path) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, chatml_tokenizer):
    """A saved base model, a stage-1 directory with every adapter random, and a stage-2 directory
    (written with train.run_stage2's meta layout) whose knowledge and alignment adapters are random too."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("pipeline")
    vocab = len(chatml_tokenizer)
    base_dir = save_base(root / "base", tiny_model("qwen2", vocab), chatml_tokenizer)
    ids = input_ids(vocab)
    cfg1, cfg2 = stage1_config(), stage2_config(rank=6)

    s1_model = load_base(base_dir)
    apply_stage1(s1_model, cfg1)
    randomize_adapters(s1_model, std=0.1)
    s1_dir = save_stage(str(root / "stage1"), adapter_state(s1_model), stage1_meta(cfg1, s1_model, base_dir))
    s1_logits = logits(s1_model, ids)
    with torch.no_grad():  # stage 1 without the noise aggregator: every routed expert's B zeroed
        for _, m in adapter_modules(s1_model, MoLoRALinear):
            m.lora_b[:, : m.num_experts * m.expert_rank].zero_()
    s1_no_na_logits = logits(s1_model, ids)

    s2_model = load_base(base_dir)
    attention = build_stage_model(s2_model, read_stage(s1_dir, expect_stage=1), alignment=cfg2).attention
    s2_start_logits = logits(s2_model, ids)
    randomize_adapters(s2_model, std=0.1)
    s2_logits = logits(s2_model, ids)
    tensors = {**adapter_state(s2_model), **attention}
    s2_dir = save_stage(str(root / "stage2"), tensors, stage2_meta(cfg1, cfg2, s2_model, s1_dir, base_dir))
    return dict(root=root, base_dir=base_dir, ids=ids, cfg1=cfg1, cfg2=cfg2, s1_dir=s1_dir, s2_dir=s2_dir,
                s1_logits=s1_logits, s1_no_na_logits=s1_no_na_logits, s2_start_logits=s2_start_logits,
                s2_logits=s2_logits, s1_model=s1_model, s2_model=s2_model, base_logits=logits(load_base(base_dir), ids))


# ------------------------------------------------------------------------------------ stage directories
def test_stage1_round_trip(pipeline, tmp_path):
    torch.manual_seed(0)
    cfg = stage1_config()
    model = load_base(pipeline["base_dir"])
    apply_stage1(model, cfg)
    randomize_adapters(model)
    tensors = adapter_state(model)
    # Keys and shapes of the documented layout.
    for i in range(NUM_LAYERS):
        for p in ATTN:
            assert tensors[f"model.layers.{i}.self_attn.{p}.attention.lora_a"].shape[0] == cfg.attn_rank
        for p in MLP:
            key = f"model.layers.{i}.mlp.{p}"
            d_in = model.get_submodule(key).base_layer.in_features
            assert tensors[f"{key}.experts.lora_a"].shape == (cfg.num_experts * cfg.expert_rank, d_in)
            assert tensors[f"{key}.shared.lora_a"].shape == (cfg.shared_rank, d_in)
            assert tensors[f"{key}.router.weight"].shape == (cfg.num_experts, d_in)
            assert tensors[f"{key}.router.bias"].shape == (cfg.num_experts,)
    assert len(tensors) == NUM_LAYERS * (2 * len(ATTN) + 6 * len(MLP))
    meta = stage1_meta(cfg, model, pipeline["base_dir"])
    out = save_stage(str(tmp_path / "s1"), tensors, meta)
    assert sorted(os.listdir(out)) == sorted([ADAPTER_FILE, MANIFEST_FILE])  # no temporary files left
    stage = read_stage(out, expect_stage=1)
    assert set(stage.tensors) == set(tensors)
    for k, v in tensors.items():
        assert torch.equal(stage.tensors[k], v), k
    m = stage.meta
    assert m["format"] == "medcare-adapter" and m["format_version"] == 1
    assert m["library_version"] == medcare.__version__
    assert m["stage"] == 1 and stage.stage == 1
    assert m["stage1"] == cfg.to_dict() and stage.stage1 == cfg
    assert m["base_model"] == json.loads(json.dumps(meta["base_model"]))
    assert m["files"][ADAPTER_FILE] == {"sha256": sha256_file(os.path.join(out, ADAPTER_FILE)),
                                        "tensors": len(tensors)}
    # Into a fresh model: every parameter equal, every key used, same logits.
    fresh = load_base(pipeline["base_dir"])
    apply_stage1(fresh, cfg)
    used = load_adapter_state(fresh, stage.tensors)
    assert used == set(tensors)
    fresh_params = dict(fresh.named_parameters())
    for n, p in model.named_parameters():
        assert torch.equal(fresh_params[n], p), n
    ids = pipeline["ids"]
    assert torch.equal(logits(fresh, ids), logits(model, ids))


def test_stage2_round_trip(pipeline):
    torch.manual_seed(0)
    stage = read_stage(pipeline["s2_dir"], expect_stage=2)
    roles = {k.rsplit(".", 2)[1] for k in stage.tensors}
    assert roles == {"attention", "knowledge", "alignment"}
    for k, v in adapter_state(pipeline["s2_model"]).items():
        assert torch.equal(stage.tensors[k], v), k
    for key in ("stage", "stage1", "stage2", "stage1_dir", "base_model"):
        assert key in stage.meta


def test_adapter_tensor_with_wrong_shape_is_refused(pipeline):
    torch.manual_seed(0)
    stage = read_stage(pipeline["s1_dir"])
    model = load_base(pipeline["base_dir"])
    apply_stage1(model, stage1_config(shared_rank=4))
    with pytest.raises(CheckpointError, match="shape"):
        load_adapter_state(model, stage.tensors)


def test_missing_adapter_tensor_is_refused(pipeline):
    torch.manual_seed(0)
    stage = read_stage(pipeline["s1_dir"])
    tensors = dict(stage.tensors)
    del tensors["model.layers.1.mlp.down_proj.router.bias"]
    model = load_base(pipeline["base_dir"])
    apply_stage1(model, stage.stage1)
    with pytest.raises(CheckpointError, match="router.bias"):
        load_adapter_state(model, tensors)


def test_corrupted_adapter_file_fails_the_checksum(pipeline, tmp_path):
    torch.manual_seed(0)
    stage = read_stage(pipeline["s1_dir"])
    out = save_stage(str(tmp_path / "s1"), stage.tensors, {k: stage.meta[k] for k in ("stage", "stage1", "base_model")})
    path = os.path.join(out, ADAPTER_FILE)
    data = bytearray(open(path, "rb").read())
    data[-17] ^= 0x5A  # inside the tensor data: the header still parses
    open(path, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="checksum") as exc:
        read_stage(out)
    assert path in str(exc.value)


def test_wrong_stage_is_refused(pipeline):
    torch.manual_seed(0)
    with pytest.raises(CheckpointError, match="stage-2") as exc:
        read_stage(pipeline["s2_dir"], expect_stage=1)
    assert pipeline["s2_dir"] in str(exc.value)
    with pytest.raises(CheckpointError, match="stage-1"):
        read_stage(pipeline["s1_dir"], expect_stage=2)


def test_missing_directory_or_manifest(tmp_path, pipeline):
    torch.manual_seed(0)
    missing = str(tmp_path / "does-not-exist")
    with pytest.raises(CheckpointError) as exc:
        read_stage(missing)
    assert missing in str(exc.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError) as exc:
        read_stage(str(empty))
    assert str(empty) in str(exc.value) and MANIFEST_FILE in str(exc.value)
    no_tensors = tmp_path / "no-tensors"
    no_tensors.mkdir()
    with open(os.path.join(pipeline["s1_dir"], MANIFEST_FILE)) as f:
        (no_tensors / MANIFEST_FILE).write_text(f.read())
    with pytest.raises(CheckpointError, match=ADAPTER_FILE) as exc:
        read_stage(str(no_tensors))
    assert str(no_tensors) in str(exc.value)
    bad = tmp_path / "bad-manifest"
    bad.mkdir()
    (bad / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(CheckpointError) as exc:
        read_stage(str(bad))
    assert str(bad) in str(exc.value)


def test_check_base_matches(pipeline):
    torch.manual_seed(0)
    stage = read_stage(pipeline["s1_dir"])
    vocab = stage.meta["base_model"]["fingerprint"]["vocab_size"]
    check_base_matches(stage, tiny_config("qwen2", vocab))  # the same architecture passes
    with pytest.raises(CheckpointError, match="hidden_size"):
        check_base_matches(stage, tiny_config("qwen2", vocab, hidden_size=48))
    with pytest.raises(CheckpointError, match="num_hidden_layers"):
        check_base_matches(stage, tiny_config("qwen2", vocab, num_hidden_layers=3))
    with pytest.raises(CheckpointError, match="model_type"):
        check_base_matches(stage, tiny_config("llama", vocab))


# ------------------------------------------------------------------------------------------ transition
def test_transition_is_stage1_without_the_routed_experts(pipeline):
    torch.manual_seed(0)
    # The stage-1 model really uses its experts (the comparison below would notice them).
    assert (pipeline["s1_logits"] - pipeline["s1_no_na_logits"]).abs().max() > 1e-3
    assert (pipeline["s1_no_na_logits"] - pipeline["base_logits"]).abs().max() > 1e-3
    model = load_base(pipeline["base_dir"])
    stage1 = read_stage(pipeline["s1_dir"], expect_stage=1)
    built = build_stage_model(model, stage1, alignment=pipeline["cfg2"])
    attention, report = built.attention, built.report
    torch.testing.assert_close(logits(model, pipeline["ids"]), pipeline["s1_no_na_logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pipeline["s2_start_logits"], pipeline["s1_no_na_logits"], rtol=1e-5, atol=1e-5)
    # The NA is gone, the attention LoRA is merged into plain Linear layers, knowledge = shared exactly.
    assert not list(adapter_modules(model, MoLoRALinear))
    assert report.replaced == {p: NUM_LAYERS for p in MLP}
    assert set(attention) == {k for k in stage1.tensors if ".attention." in k}
    for i in range(NUM_LAYERS):
        for p in ATTN:
            assert type(getattr(model.model.layers[i].self_attn, p)) is nn.Linear
        for p in MLP:
            name = f"model.layers.{i}.mlp.{p}"
            m = model.get_submodule(name)
            assert type(m) is LoRALinear and list(m.adapter_ranks) == ["knowledge", "alignment"]
            a, b = m.adapter("knowledge")
            assert torch.equal(a, stage1.tensors[f"{name}.shared.lora_a"])
            assert torch.equal(b, stage1.tensors[f"{name}.shared.lora_b"])
            assert torch.count_nonzero(m.adapter("alignment")[1]) == 0
            assert m.scaling == stage1.stage1.mlp_scaling


def test_transition_refuses_a_different_scaling(pipeline):
    torch.manual_seed(0)
    model = load_base(pipeline["base_dir"])
    with pytest.raises(ConfigError, match="scaling"):
        build_stage_model(model, read_stage(pipeline["s1_dir"]), alignment=stage2_config(scaling=1.0))


def test_refused_transition_leaves_the_model_untouched(pipeline):
    torch.manual_seed(0)
    model = load_base(pipeline["base_dir"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError):
        build_stage_model(model, read_stage(pipeline["s1_dir"]), alignment=stage2_config(scaling=1.0))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------------------------------------- export
def test_merge_stage2_equals_the_adapter_model(pipeline):
    torch.manual_seed(0)
    assert (pipeline["s2_logits"] - pipeline["s2_start_logits"]).abs().max() > 1e-3
    model = load_base(pipeline["base_dir"])
    n = build_stage_model(model, read_stage(pipeline["s2_dir"], expect_stage=2), merged=True).merged_pairs
    assert n == NUM_LAYERS * (len(ATTN) + 2 * len(MLP))
    assert not list(adapter_modules(model))
    assert rel_err(logits(model, pipeline["ids"]), pipeline["s2_logits"]) <= 1e-5


LOAD_WITHOUT_MEDCARE = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModelForCausalLM
    model_dir, ids_path, out_path = sys.argv[1:4]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(input_ids=torch.load(ids_path)).logits.float()
    assert "medcare" not in sys.modules and "medcare_kernels" not in sys.modules, sorted(sys.modules)
    torch.save({"logits": out, "modules": [n for n, _ in model.named_modules()]}, out_path)
""")


def test_export_cli_writes_a_plain_checkpoint(pipeline, tmp_path, capfd):
    out = str(tmp_path / "exported")
    assert train_mod.main(["export", "--stage2", pipeline["s2_dir"], "--output", out]) == 0
    capfd.readouterr()
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert not any(f.startswith(".") for f in os.listdir(tmp_path))  # no temporary export dir left behind
    # The same tensor names as the base checkpoint: no extra modules, nothing adapter-shaped.
    base_keys = set(load_file(os.path.join(pipeline["base_dir"], "model.safetensors")))
    exported = load_file(os.path.join(out, "model.safetensors"))
    assert set(exported) == base_keys
    assert all(v.dtype == torch.float32 for v in exported.values())
    ids_path, res_path = str(tmp_path / "ids.pt"), str(tmp_path / "res.pt")
    torch.save(pipeline["ids"], ids_path)
    proc = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_MEDCARE, out, ids_path, res_path], cwd=str(tmp_path),
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = torch.load(res_path)
    assert not any("lora" in n or "router" in n or "base_layer" in n for n in res["modules"])
    assert rel_err(res["logits"], pipeline["s2_logits"]) <= 1e-5


def test_export_refuses_a_non_empty_output(pipeline, tmp_path, capfd):
    torch.manual_seed(0)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    (out / "model.safetensors").write_bytes(b"not a model")
    assert train_mod.main(["export", "--stage2", pipeline["s2_dir"], "--output", str(out)]) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and "not empty" in err
    assert sorted(os.listdir(out)) == ["keep.txt", "model.safetensors"]
    assert (out / "keep.txt").read_text() == "precious"
    assert (out / "model.safetensors").read_bytes() == b"not a model"


def test_export_refuses_a_stage1_directory(pipeline, tmp_path, capfd):
    torch.manual_seed(0)
    out = tmp_path / "exported"
    assert train_mod.main(["export", "--stage2", pipeline["s1_dir"], "--output", str(out)]) == 2
    assert "stage-1" in capfd.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------------------------- official import
class OfficialMoLoRA(nn.Module):
    """The original stage-1 MLP projection, per expert: softmax router, top-K, renormalised weights,
    y = W x + s sum_j w_j B_j A_j x + s Bs As x with s = lora_alpha / r."""

    def __init__(self, base, raw, pre):
        super().__init__()
        self.base, self.s = base, OFFICIAL_ALPHA / OFFICIAL_R
        self.switch_w, self.switch_b = raw[f"{pre}.switch.weight"], raw[f"{pre}.switch.bias"]
        self.a = [raw[f"{pre}.experts.{j}.lora_A_{j}.weight"] for j in range(OFFICIAL_E)]
        self.b = [raw[f"{pre}.experts.{j}.lora_B_{j}.weight"] for j in range(OFFICIAL_E)]
        self.sa, self.sb = raw[f"{pre}.share_experts.lora_A.weight"], raw[f"{pre}.share_experts.lora_B.weight"]

    def forward(self, x):
        probs = torch.softmax(x @ self.switch_w.T + self.switch_b, dim=-1)
        w, idx = torch.topk(probs, OFFICIAL_K, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        y = self.base(x)
        for j in range(OFFICIAL_E):
            weight = (w * (idx == j)).sum(-1, keepdim=True)  # 0 where expert j is not selected
            y = y + self.s * weight * ((x @ self.a[j].T) @ self.b[j].T)
        return y + self.s * ((x @ self.sa.T) @ self.sb.T)


class OfficialLoRA(nn.Module):
    def __init__(self, base, a, b):
        super().__init__()
        self.base, self.a, self.b, self.s = base, a, b, OFFICIAL_ALPHA / OFFICIAL_R

    def forward(self, x):
        return self.base(x) + self.s * ((x @ self.a.T) @ self.b.T)


def official_model(base, raw, attn):
    for i in range(NUM_LAYERS):
        layer = base.model.layers[i]
        for p in MLP:
            setattr(layer.mlp, p, OfficialMoLoRA(getattr(layer.mlp, p), raw,
                                                 f"base_model.model.model.layers.{i}.mlp.{p}"))
        for p in ATTN:
            pre = f"base_model.model.model.layers.{i}.self_attn.{p}"
            setattr(layer.self_attn, p, OfficialLoRA(getattr(layer.self_attn, p), attn[f"{pre}.lora_A.weight"],
                                                     attn[f"{pre}.lora_B.weight"]))
    return base


def test_official_stage1_import_computes_the_official_formula(pipeline, tmp_path):
    torch.manual_seed(0)
    path = str(tmp_path / "official")
    raw, attn = fabricate_official_stage1(path, load_base(pipeline["base_dir"]))
    stage = load_stage1(path)
    cfg = stage.stage1
    assert (cfg.num_experts, cfg.top_k, cfg.expert_rank, cfg.shared_rank) == (OFFICIAL_E, OFFICIAL_K, OFFICIAL_R,
                                                                                2 * OFFICIAL_R)
    assert cfg.attn_rank == OFFICIAL_R and cfg.mlp_scaling == cfg.attn_scaling == OFFICIAL_ALPHA / OFFICIAL_R
    # Packed layout: expert e's rows are its A, in numeric expert order (expert 10 after expert 9).
    key = "model.layers.1.mlp.up_proj"
    pre = f"base_model.model.{key}"
    r = OFFICIAL_R
    for j in range(OFFICIAL_E):
        assert torch.equal(stage.tensors[f"{key}.experts.lora_a"][j * r:(j + 1) * r],
                           raw[f"{pre}.experts.{j}.lora_A_{j}.weight"])
        assert torch.equal(stage.tensors[f"{key}.experts.lora_b"][:, j * r:(j + 1) * r],
                           raw[f"{pre}.experts.{j}.lora_B_{j}.weight"])
    model = load_base(pipeline["base_dir"])
    apply_stage1(model, cfg)
    used = load_adapter_state(model, stage.tensors)
    assert used == set(stage.tensors)
    assert len(used) == NUM_LAYERS * (2 * len(ATTN) + 6 * len(MLP))  # every official tensor landed somewhere
    want = logits(official_model(load_base(pipeline["base_dir"]), raw, attn), pipeline["ids"])
    assert (want - pipeline["base_logits"]).abs().max() > 1e-3
    torch.testing.assert_close(logits(model, pipeline["ids"]), want, rtol=1e-5, atol=1e-5)


def test_official_stage1_top_k_override_and_missing_top_k(pipeline, tmp_path):
    torch.manual_seed(0)
    path = str(tmp_path / "official")
    fabricate_official_stage1(path, load_base(pipeline["base_dir"]))
    assert load_stage1(path, top_k=3).stage1.top_k == 3
    cfg = json.load(open(os.path.join(path, "config.json")))
    del cfg["num_experts_per_token"]
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(CheckpointError, match="num_experts_per_token"):
        load_stage1(path)


class Evil:
    """Unpickling this runs os.mkdir(marker): a stand-in for arbitrary code in a pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_official_bin_with_a_pickled_object_is_refused(tmp_path, pipeline):
    torch.manual_seed(0)
    path = tmp_path / "official"
    fabricate_official_stage1(str(path), load_base(pipeline["base_dir"]))
    marker = str(tmp_path / "pwned")
    raw = torch.load(path / "non_lora_trainables.bin", weights_only=True)
    raw["base_model.model.model.layers.0.mlp.up_proj.switch.weight"] = Evil(marker)
    torch.save(raw, path / "non_lora_trainables.bin")
    with pytest.raises(CheckpointError, match="non_lora_trainables.bin"):
        load_stage1(str(path))
    assert not os.path.exists(marker)


@pytest.mark.parametrize("bad", ["string router", "string shared", "top-level list"])
def test_official_bin_with_non_tensor_values_is_refused(tmp_path, pipeline, bad):
    torch.manual_seed(0)
    path = tmp_path / "official"
    fabricate_official_stage1(str(path), load_base(pipeline["base_dir"]))
    raw = torch.load(path / "non_lora_trainables.bin", weights_only=True)
    if bad == "string router":  # accepted silently
        raw["base_model.model.model.layers.0.mlp.up_proj.switch.weight"] = "not a tensor"
    elif bad == "string shared":  # AttributeError: 'str' object has no attribute 'shape'
        raw["base_model.model.model.layers.0.mlp.up_proj.share_experts.lora_A.weight"] = "not a tensor"
    else:
        raw = list(raw.values())
    torch.save(raw, path / "non_lora_trainables.bin")
    with pytest.raises(CheckpointError):
        load_stage1(str(path))
