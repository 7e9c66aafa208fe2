"""Multi-process training on CPU (gloo), as `torchrun --nproc_per_node 2 -m medcare.train ...` runs it:
DDP for stage 1 and stage 2, FSDP2 (fully_shard) for stage 2, each a few steps. The adapters rank 0 saves
equal a single-process run over the same global batch (2 processes x 2 = 1 process x 4; the data order is a
function of the seed and the global batch, not of the process count). Under FSDP2 the orthogonality penalty,
collected inside each projection's forward, has the same non-zero gradient as on one process.

DeepSpeed ZeRO-3 is tested the same way in test_deepspeed.py; FSDP1 needs a GPU in this setup. See README
"Running at scale" for the GPU commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from pipeline_testing import (
    multiprocess_env,
    one_thread,
    run_train,
)
from safetensors.torch import load_file

import medcare
from medcare.checkpoint import ADAPTER_FILE, read_stage
from medcare.inject import adapter_modules
from medcare.losses import orth_loss

pytestmark = pytest.mark.slow  # torchrun: two processes each start Python, torch and transformers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(medcare.__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
# SGD: with AdamW, dividing by sqrt(v) turns the rounding noise of near-zero gradients (two processes sum in
# another order than one) into visible weight differences; SGD keeps the comparison at float precision.
COMMON = ["--gradient_accumulation_steps", "1", "--max_steps", "3", "--optim", "sgd", "--learning_rate", "0.5",
          "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--logging_steps", "1", "--report_to", "none",
          "--disable_tqdm", "true", "--model_dtype", "float32", "--save_strategy", "no", "--seed", "3",
          "--use_cpu", "true", "--ddp_timeout", "120"]
STAGE1 = ["--num_experts", "4", "--top_k", "2", "--expert_rank", "4", "--shared_rank", "8", "--attn_rank", "4",
          "--attn_alpha", "8", "--mlp_alpha", "8", "--attn_dropout", "0"]
FSDP2 = ["--fsdp", "full_shard auto_wrap",
         "--fsdp_config", json.dumps({"transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"], "version": 2})]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


@pytest.fixture(scope="module")
def env(tmp_path_factory, chatml_tokenizer):
    return multiprocess_env(tmp_path_factory.mktemp("distributed"), chatml_tokenizer)


def torchrun(args, timeout=240, check=True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU test everywhere: gloo, and the same device as the reference run
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0 or not check, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


ATOL = 1e-6


def assert_same_adapters(got_dir, want_dir, atol=ATOL):
    got, want = load_file(str(got_dir / ADAPTER_FILE)), load_file(str(want_dir / ADAPTER_FILE))
    assert set(got) == set(want) and got
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def trained(stage_dir, start: dict, role: str) -> float:
    """Largest change of a role's tensors from `start` (the run must have done something)."""
    got = load_file(str(stage_dir / ADAPTER_FILE))
    return max(float((got[k] - start[k]).abs().max()) for k in got if f".{role}." in k and k in start)


@pytest.mark.timeout(300)
def test_stage1_ddp_two_processes_equal_one_process(env, tmp_path):
    # top_k = num_experts: each process pads its own half of the batch, so the hidden states differ in the
    # last bits from the single-process run, and a near-tie top-2 choice could flip (a discrete, legitimate
    # difference). With every expert selected the comparison checks the gradient sync, not tie-breaking.
    argv = ["stage1", "--model", env["base"], "--data", env["data"], *STAGE1, "--top_k", "4", *COMMON]
    proc = torchrun(["-m", "medcare.train", *argv, "--output", tmp_path / "ddp", "--per_device_train_batch_size", "2"])
    assert proc.stdout.count("medcare: stage 1 saved to") == 1  # one job, one report, one writer
    assert run_train(argv + ["--output", tmp_path / "one", "--per_device_train_batch_size", "4"]) == 0
    assert_same_adapters(tmp_path / "ddp", tmp_path / "one")
    lora_b = load_file(str(tmp_path / "ddp" / ADAPTER_FILE))
    assert max(float(v.abs().max()) for k, v in lora_b.items() if k.endswith("lora_b")) > 100 * ATOL  # B=0 at start


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_stage2_two_processes_equal_one_process(env, tmp_path, mode):
    """Stage 2 with the orthogonality penalty (computed on the full parameters under DDP, collected inside
    forward under FSDP2) and, under FSDP2, a frozen knowledge LoRA that must stay exactly stage 1's."""
    freeze = ["--freeze_knowledge", "true"] if mode == "fsdp2" else []
    argv = ["stage2", "--model", env["base"], "--stage1", env["stage1"], "--data", env["data"], "--dropout", "0",
            "--orth_lambda", "0.5", *freeze, *COMMON]
    launch = FSDP2 if mode == "fsdp2" else []
    torchrun(["-m", "medcare.train", *argv, *launch, "--output", tmp_path / mode, "--per_device_train_batch_size",
              "2"])
    assert run_train(argv + ["--output", tmp_path / "one", "--per_device_train_batch_size", "4"]) == 0
    assert_same_adapters(tmp_path / mode, tmp_path / "one")
    shared = {k.replace(".shared.", ".knowledge."): v for k, v in read_stage(env["stage1"]).tensors.items()}
    moved = trained(tmp_path / mode, shared, "knowledge")
    assert (moved == 0.0) if freeze else (moved > 1e-4)


def test_orth_penalty_under_fsdp2_has_the_single_process_gradient(tmp_path):
    torchrun([os.path.join(HERE, "distributed_worker.py"), "orth", str(tmp_path)])
    got = load_file(str(tmp_path / "grads.safetensors"))
    values = json.loads((tmp_path / "values.json").read_text())
    assert values["sharded"] == ["DTensor"]  # the parameters really were sharded

    sys.path.insert(0, HERE)
    from distributed_worker import batch, build_model

    def grads(with_penalty: bool):
        model = build_model()
        ce = sum(model(input_ids=batch(r), labels=batch(r)).loss for r in range(2)) / 2  # FSDP averages ranks
        penalty = orth_loss(model)
        (ce + penalty if with_penalty else ce).backward()
        return {f"{n}.{a}": getattr(m, a).grad for n, m in adapter_modules(model) for a in ("lora_a", "lora_b")}, \
            float(penalty.detach())

    want, penalty = grads(True)
    without, _ = grads(False)
    assert values["penalty"] == pytest.approx(penalty, rel=1e-6)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    # The penalty's own gradient is a large part of A's: a detached (zero-gradient) penalty would fail above.
    a_keys = [k for k in want if k.endswith("lora_a")]
    assert min(float((want[k] - without[k]).norm() / want[k].norm()) for k in a_keys) > 0.1
