"""Reliability of the training layer: the numerical guard (a NaN loss or an infinite gradient stops training
naming the step, keeps the last good checkpoint, writes no NaN weights), non-finite adapters are never
saved, a kill during an atomic write leaves the previous file, records that truncation empties follow
--on_bad_records, and a few more bad-input cases beside tests/medcare/test_train.py's matrix."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from pipeline_testing import (
    last_stderr_line,
    one_thread,
    pipeline_env,
    records,
    run_train,
    tiny_model,
    write_jsonl,
)
from safetensors.torch import load_file

import medcare
from medcare import trainer as trainer_mod
from medcare.checkpoint import ADAPTER_FILE, MANIFEST_FILE, CheckpointError, read_stage, save_stage
from medcare.files import atomic_write

REPO = os.path.dirname(os.path.dirname(os.path.abspath(medcare.__file__)))
STAGE1 = ["--num_experts", "4", "--top_k", "2", "--expert_rank", "4", "--shared_rank", "8", "--attn_rank", "4",
          "--attn_alpha", "8", "--mlp_alpha", "8"]
FAST = ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--num_train_epochs", "1",
        "--learning_rate", "1e-2", "--logging_steps", "1", "--report_to", "none", "--disable_tqdm", "true",
        "--model_dtype", "float32"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def env(tmp_path_factory, chatml_tokenizer):
    return pipeline_env(tmp_path_factory, chatml_tokenizer, "reliability", 8)


# ------------------------------------------------------------------------------------- numerical guard
def poison(monkeypatch, at_step: int, what: str) -> None:
    """During optimizer step `at_step` (1-based), make the loss NaN or one adapter gradient infinite."""
    class Poisoned(trainer_mod.MedCareTrainer):
            def compute_loss(self, model, inputs, *args, **kw):
                loss = super().compute_loss(model, inputs, *args, **kw)
                if what == "loss" and self.state.global_step + 1 == at_step:
                    loss = loss * float("nan")
                return loss

            def training_step(self, model, inputs, num_items_in_batch=None):
                loss = super().training_step(model, inputs, num_items_in_batch)
                if what == "grad" and self.state.global_step + 1 == at_step:
                    name, param = next((n, p) for n, p in model.named_parameters() if "up_proj.lora_b" in n)
                    param.grad.view(-1)[0] = float("inf")  # the loss stays finite
                return loss

    monkeypatch.setattr(trainer_mod, "MedCareTrainer", Poisoned)


@pytest.mark.parametrize("what, reason", [("loss", "the loss is nan"),
                                          ("grad", "the gradient of model.layers.0.mlp.up_proj.lora_b")])
def test_non_finite_loss_or_gradient_stops_at_that_step(env, tmp_path, capfd, monkeypatch, what, reason):
    poison(monkeypatch, 3, what)
    out = tmp_path / "out"
    rc = run_train(["stage1", "--model", env["base"], "--data", env["data"], "--output", out, *STAGE1, *FAST,
                    "--save_strategy", "steps", "--save_steps", "2"])
    line = last_stderr_line(capfd)
    assert rc == 1, line
    assert line.startswith("medcare: error: training stopped at step 3:") and reason in line, line
    assert "checkpoint-2" in line  # names the last good checkpoint
    # The last good checkpoint is kept and loads; nothing was written after it, no NaN anywhere.
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]
    stage = read_stage(str(out / "checkpoint-2"), expect_stage=1)
    assert all(bool(torch.isfinite(t).all()) for t in stage.tensors.values())


def test_guard_does_not_fire_on_a_healthy_run(env, tmp_path, monkeypatch):
    poison(monkeypatch, 99, "loss")  # never reached: the patched trainer itself changes nothing
    assert run_train(["stage1", "--model", env["base"], "--data", env["data"], "--output", tmp_path / "ok", *STAGE1,
                      *FAST, "--save_strategy", "no"]) == 0


def test_non_finite_adapters_are_never_saved(tmp_path):
    good = {"a.attention.lora_a": torch.ones(2, 3), "a.attention.lora_b": torch.zeros(3, 2)}
    meta = {"stage": 1, "stage1": {}, "base_model": {}}
    save_stage(str(tmp_path), good, meta)
    before = (tmp_path / ADAPTER_FILE).read_bytes(), (tmp_path / MANIFEST_FILE).read_bytes()
    for bad in (float("nan"), float("inf"), -float("inf")):
        poisoned = {**good, "a.attention.lora_b": torch.tensor([[0.0, bad]] * 3)}
        with pytest.raises(CheckpointError, match="NaN or infinity.*a.attention.lora_b"):
            save_stage(str(tmp_path), poisoned, meta)
    assert ((tmp_path / ADAPTER_FILE).read_bytes(), (tmp_path / MANIFEST_FILE).read_bytes()) == before
    assert sorted(os.listdir(tmp_path)) == [ADAPTER_FILE, MANIFEST_FILE]  # no temporary left behind


def test_fp32_router_under_bf16_autocast(env):
    """bf16 overflow in routing cannot happen: router parameters are fp32 and the gates come out fp32
    even when the model computes in bf16."""
    from pipeline_testing import stage1_config

    from medcare.inject import adapter_modules, apply_stage1
    from medcare.layers import MoLoRALinear

    model = tiny_model("qwen2", 477).to(torch.bfloat16)
    apply_stage1(model, stage1_config(adapter_dtype="auto"))
    molora = [m for _, m in adapter_modules(model) if isinstance(m, MoLoRALinear)]
    assert molora and all(m.router_weight.dtype == torch.float32 and m.lora_a.dtype == torch.bfloat16
                          for m in molora)
    x = torch.full((3, molora[0].base_layer.in_features), 300.0, dtype=torch.bfloat16)  # logits far past bf16 eps
    with torch.no_grad():
        y = molora[0](x)
    assert y.dtype == torch.bfloat16 and bool(torch.isfinite(y.float()).all())


# ------------------------------------------------------------------------------------- atomic writes
KILL_DURING_WRITE = r'''
import os, signal, sys
from medcare.files import atomic_write

def half(tmp):
    with open(tmp, "wb") as f:
        f.write(b"NEW-HALF")
        f.flush()
        os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)

atomic_write(sys.argv[1], half)
'''


def test_a_kill_during_an_atomic_write_leaves_the_previous_file(tmp_path):
    target = tmp_path / "adapter.safetensors"
    atomic_write(str(target), lambda tmp: open(tmp, "wb").write(b"OLD-COMPLETE"))
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_WRITE, str(target)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO}, cwd=REPO, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert target.read_bytes() == b"OLD-COMPLETE"


def test_a_torn_stage_directory_fails_its_checksum_and_names_the_file(tmp_path):
    save_stage(str(tmp_path), {"m.attention.lora_a": torch.randn(4, 3)}, {"stage": 1, "stage1": {}, "base_model": {}})
    path = tmp_path / ADAPTER_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # what a non-atomic writer would leave after a kill
    with pytest.raises(CheckpointError, match=f"{ADAPTER_FILE}: checksum mismatch"):
        read_stage(str(tmp_path))


# ------------------------------------------------------------------------------------------- bad input
def test_truncated_away_records_fail_by_default_and_are_counted_when_skipped(env, tmp_path, capfd):
    long = {"messages": [{"role": "user", "content": "What is the usual adult dose of aspirin? " * 20},
                         {"role": "assistant", "content": "500 mg."}]}
    data = write_jsonl(tmp_path / "mixed.jsonl", records(4)[:2] + [long] + records(4)[2:])
    argv = ["stage1", "--model", env["base"], "--data", data, *STAGE1, *FAST, "--save_strategy", "no",
            "--model_max_length", "64", "--max_steps", "1"]
    assert run_train(argv + ["--output", tmp_path / "fail"]) == 2
    line = last_stderr_line(capfd)
    assert f"{data}:line 3: no assistant token left after truncation to 64 tokens" in line, line
    assert "--on_bad_records skip" in line and not (tmp_path / "fail").exists()
    assert run_train(argv + ["--output", tmp_path / "skip", "--on_bad_records", "skip"]) == 0
    err = capfd.readouterr().err
    assert "skipped 1 bad records of 5 (0 invalid, 1 truncated away)" in err, err
    assert load_file(str(tmp_path / "skip" / ADAPTER_FILE))


def test_invalid_records_are_skipped_and_counted(env, tmp_path, capfd):
    data = tmp_path / "some-bad.jsonl"
    data.write_text("".join(f"{line}\n" for line in [
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}',
        '{"messages": [{"role": "doctor", "content": "q"}]}', "{not json",
        '{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}']))
    argv = ["stage1", "--model", env["base"], "--data", data, *STAGE1, *FAST, "--save_strategy", "no",
            "--max_steps", "1"]
    assert run_train(argv + ["--output", tmp_path / "fail"]) == 2
    line = last_stderr_line(capfd)
    assert "line 2:" in line and "line 3: malformed JSON" in line and "doctor" in line, line
    assert run_train(argv + ["--output", tmp_path / "skip", "--on_bad_records", "skip"]) == 0
    assert "skipped 2 bad records of 4 (2 invalid, 0 truncated away)" in capfd.readouterr().err


def test_frozen_knowledge_under_fsdp1_is_refused(env, tmp_path, capfd):
    stage1 = tmp_path / "stage1"
    assert run_train(["stage1", "--model", env["base"], "--data", env["data"], "--output", stage1, *STAGE1, *FAST,
                      "--save_strategy", "no", "--max_steps", "1"]) == 0
    out = tmp_path / "out"
    assert run_train(["stage2", "--model", env["base"], "--stage1", stage1, "--data", env["data"], "--output", out,
                      *FAST, "--freeze_knowledge", "true", "--fsdp", "full_shard", "--fsdp_config",
                      '{"version": 1}']) == 2
    line = last_stderr_line(capfd)
    assert "FSDP1" in line and "--freeze_knowledge" in line, line
    assert not out.exists()


# ------------------------------------------------------------------------------------ process exit
EXIT_SCRIPT = r'''
import atexit, sys, tempfile
import torch.distributed as dist
from medcare.train import close_process_group, exit_process
atexit.register(lambda: print("atexit ran", flush=True))
dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
dist.all_reduce(__import__("torch").ones(3))
close_process_group(finished=True)
assert not dist.is_initialized()
print("closed", flush=True)
exit_process(int(sys.argv[1]))
'''


@pytest.mark.parametrize("code", [0, 3])
def test_exit_after_a_gloo_group_keeps_the_status_and_runs_atexit(code):
    """exit_process skips only the interpreter finalization after a gloo group (the gloo-thread abort it avoids
    is exercised by the torchrun tests); the exit status, atexit handlers and buffered output survive it."""
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, str(code)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == code, proc.stderr
    assert proc.stdout.splitlines() == ["closed", "atexit ran"], proc.stdout + proc.stderr


def test_exit_without_a_gloo_group_is_sys_exit(monkeypatch):
    from medcare import train

    monkeypatch.setattr(train, "_closed_gloo_group", False)
    with pytest.raises(SystemExit) as exc:
        train.exit_process(2)
    assert exc.value.code == 2
