"""DeepSpeed ZeRO-3 on CPU processes, as `torchrun --nproc_per_node 2 -m medcare.train ... --deepspeed
recipes/ds_zero3.json` runs it (DeepSpeed's CPU accelerator, gloo): stage 1 and stage 2 with 2 processes save
whole adapters equal to a one-process run over the same global batch (2 processes x 2 = 1 process x 4), the
orthogonality penalty (collected inside each projection's forward, where ZeRO-3 has gathered the parameters)
moves them exactly as on one process, and export from the ZeRO-3 stage-2 directory writes the same checkpoint.

The shipped recipe is used with two test settings: `stage3_param_persistence_threshold: 0` (by default every
tensor under 1e5 elements stays whole on every rank, so nothing of this tiny model would be partitioned) and
`zero_allow_untested_optimizer` (SGD, see test_distributed.COMMON: it keeps the comparison at float precision).
Tolerance 1e-6, as for DDP: the same fp32 arithmetic, only the order of the two ranks' gradient sums differs."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from pipeline_testing import (
    multiprocess_env,
    one_thread,
    run_train,
    user_error_line,
)
from safetensors.torch import load_file
from test_distributed import ATOL, COMMON, REPO, STAGE1, assert_same_adapters, torchrun, trained

from medcare.checkpoint import read_stage

RECIPE = os.path.join(REPO, "recipes", "ds_zero3.json")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def env(tmp_path_factory, chatml_tokenizer):
    return multiprocess_env(tmp_path_factory.mktemp("deepspeed"), chatml_tokenizer)


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> str:
    """The shipped ZeRO-3 recipe with the two test settings of the module docstring."""
    with open(RECIPE, encoding="utf-8") as f:
        config = json.load(f)
    config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    config["zero_allow_untested_optimizer"] = True
    path = tmp_path_factory.mktemp("deepspeed") / "ds_zero3_test.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stage1_zero3_two_processes_equal_one_process(env, ds, tmp_path):
    # top_k = num_experts: as for DDP (test_distributed), a near-tie top-2 choice could flip between runs.
    argv = ["stage1", "--model", env["base"], "--data", env["data"], *STAGE1, "--top_k", "4", *COMMON]
    proc = torchrun(["-m", "medcare.train", *argv, "--output", tmp_path / "zero3", "--per_device_train_batch_size",
                     "2", "--deepspeed", ds])
    assert proc.stdout.count("medcare: stage 1 saved to") == 1  # one job, one writer
    assert "medcare: parameters sharded by DeepSpeed ZeRO-3 over 2 processes" in proc.stdout
    assert run_train(argv + ["--output", tmp_path / "one", "--per_device_train_batch_size", "4"]) == 0
    assert_same_adapters(tmp_path / "zero3", tmp_path / "one")  # whole tensors: shapes and keys are checked too
    stage = read_stage(str(tmp_path / "zero3"), expect_stage=1)  # a loadable stage directory (checksum verified)
    assert max(float(v.abs().max()) for k, v in stage.tensors.items() if k.endswith("lora_b")) > 100 * ATOL


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_stage2_zero3_orth_penalty_and_export_equal_one_process(env, ds, tmp_path):
    argv = ["stage2", "--model", env["base"], "--stage1", env["stage1"], "--data", env["data"], "--dropout", "0",
            "--orth_lambda", "0.5", *COMMON]
    torchrun(["-m", "medcare.train", *argv, "--output", tmp_path / "zero3", "--per_device_train_batch_size", "2",
              "--deepspeed", ds])
    assert run_train(argv + ["--output", tmp_path / "one", "--per_device_train_batch_size", "4"]) == 0
    assert_same_adapters(tmp_path / "zero3", tmp_path / "one")
    shared = {k.replace(".shared.", ".knowledge."): v for k, v in read_stage(env["stage1"]).tensors.items()}
    assert trained(tmp_path / "zero3", shared, "knowledge") > 1e-4
    # The penalty's gradient is a real part of the update: without it the adapters end far from both runs,
    # so a penalty without gradient under ZeRO-3 (the original implementation's bug) would fail the check above.
    no_penalty = [a if a != "0.5" else "0" for a in argv]
    assert run_train(no_penalty + ["--output", tmp_path / "no_orth", "--per_device_train_batch_size", "4"]) == 0
    got, without = load_file(str(tmp_path / "zero3" / "adapter.safetensors")), \
        load_file(str(tmp_path / "no_orth" / "adapter.safetensors"))
    assert max(float((got[k] - without[k]).abs().max()) for k in got if k.endswith("lora_a")) > 1000 * ATOL
    # Export from the ZeRO-3 directory writes the checkpoint export from the one-process directory writes.
    for name in ("zero3", "one"):
        assert run_train(["export", "--stage2", tmp_path / name, "--output", tmp_path / f"{name}-export"]) == 0
    a, b = (load_file(str(tmp_path / f"{n}-export" / "model.safetensors")) for n in ("zero3", "one"))
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=ATOL, msg=k)


def test_deepspeed_not_installed_is_one_line(env, tmp_path, capfd, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` raises ImportError
    capfd.readouterr()
    rc = run_train(["stage1", "--model", env["base"], "--data", env["data"], "--output", tmp_path / "out",
                    "--deepspeed", RECIPE])
    line = user_error_line(capfd)
    assert rc == 2 and "pip install 'medcare[deepspeed]'" in line, line
    assert not (tmp_path / "out").exists()


def test_a_missing_deepspeed_config_is_one_line(env, tmp_path, capfd):
    capfd.readouterr()
    rc = run_train(["stage1", "--model", env["base"], "--data", env["data"], "--output", tmp_path / "out",
                    "--deepspeed", tmp_path / "nope.json"])
    line = user_error_line(capfd)
    assert rc == 2 and "nope.json: no such DeepSpeed config file" in line, line


# Under torchrun, both ranks kill themselves (SIGKILL) at the end of optimizer step N, before that step's
# checkpoint: the same point on every run, whatever the timing.
KILL_DRIVER = r'''
import os, signal, sys
import torch
torch.set_num_threads(1)
from transformers import TrainerCallback
from medcare import train, trainer

at = int(os.environ["KILL_AT_STEP"])


class Kill(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == at:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


class Killable(trainer.MedCareTrainer):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.add_callback(Kill())


trainer.MedCareTrainer = Killable
train.exit_process(train.main(sys.argv[1:]))
'''


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_zero3_killed_and_resumed_ends_where_one_uninterrupted_process_does(env, ds, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(KILL_DRIVER)
    argv = ["stage1", "--model", env["base"], "--data", env["data"], *STAGE1, "--top_k", "4", *COMMON,
            "--max_steps", "4", "--lr_scheduler_type", "cosine", "--warmup_steps", "1"]
    zero3 = ["--output", tmp_path / "zero3", "--per_device_train_batch_size", "2", "--deepspeed", ds,
             "--save_strategy", "steps", "--save_steps", "1"]
    os.environ["KILL_AT_STEP"] = "3"
    try:
        proc = torchrun([driver, *argv, *zero3], check=False)
    finally:
        del os.environ["KILL_AT_STEP"]
    assert proc.returncode != 0 and not (tmp_path / "zero3" / "adapter.safetensors").exists()
    assert sorted(p.name for p in (tmp_path / "zero3").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    torchrun(["-m", "medcare.train", *argv, *zero3, "--resume_from_checkpoint", "last"])
    assert run_train(argv + ["--output", tmp_path / "one", "--per_device_train_batch_size", "4"]) == 0
    assert_same_adapters(tmp_path / "zero3", tmp_path / "one")
