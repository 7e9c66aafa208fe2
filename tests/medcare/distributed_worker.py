"""Worker for tests/medcare/test_distributed.py, launched with torchrun (gloo on CPU):

    python -m torch.distributed.run --nproc_per_node 2 tests/medcare/distributed_worker.py orth OUT_DIR

`orth`: a tiny stage-2 model sharded with FSDP2 (`fully_shard` on every decoder layer and the root), each
rank a different batch; loss = CE + the orthogonality penalty collected inside the projections' forward
(OrthPenaltyCollector, what the trainer does under FSDP). Rank 0 writes the gathered gradients of every
adapter parameter, the penalty and each rank's CE to OUT_DIR; the test recomputes them on one process."""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from pipeline_testing import input_ids, randomize_adapters, stage2_config, tiny_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from medcare.inject import adapter_modules, apply_stage2  # noqa: E402
from medcare.losses import OrthPenaltyCollector  # noqa: E402
from medcare.train import close_process_group, exit_process  # noqa: E402

VOCAB, KNOWLEDGE_RANK = 97, 8


def build_model():
    """The same stage-2 model on every process (and in the test): seeded, adapters randomised."""
    model = tiny_model("qwen2", VOCAB, seed=0)
    apply_stage2(model, stage2_config(), knowledge_rank=KNOWLEDGE_RANK)
    torch.manual_seed(1)
    randomize_adapters(model, std=0.1)
    return model.train()


def batch(rank: int) -> torch.Tensor:
    return input_ids(VOCAB, batch=2, length=7, seed=100 + rank)


def orth(out_dir: str) -> None:
    from torch.distributed.fsdp import fully_shard

    rank = dist.get_rank()
    model = build_model()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    ids = batch(rank)
    with OrthPenaltyCollector(model) as collector:
        ce = model(input_ids=ids, labels=ids).loss
    penalty = collector.total()
    (ce + penalty).backward()
    grads = {}
    for name, module in adapter_modules(model):
        for attr in ("lora_a", "lora_b"):
            grad = getattr(module, attr).grad
            grads[f"{name}.{attr}"] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).contiguous()
    ces = [torch.zeros(1) for _ in range(dist.get_world_size())]
    dist.all_gather(ces, ce.detach().reshape(1))
    if rank == 0:
        save_file(grads, os.path.join(out_dir, "grads.safetensors"))
        with open(os.path.join(out_dir, "values.json"), "w") as f:
            json.dump({"penalty": float(penalty.detach()), "ce": [float(c) for c in ces],
                       "sharded": [type(m.lora_a).__name__ for _, m in adapter_modules(model)][:1]}, f)


def main(command: str, out_dir: str) -> NoReturn:
    """Runs `command` on every rank and ends the way `python -m medcare.train` does under torchrun: a barrier
    (rank 0 may still be writing) and the group destroyed, then exit_process, which skips the interpreter
    finalization that a gloo worker thread can abort (see medcare.train.exit_process). A rank that failed
    skips the barrier (its peer would wait for it forever); the short timeout turns the peer's wait into an
    error instead of a hang."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    finished = False
    try:
        {"orth": orth}[command](out_dir)
        finished = True
    finally:
        close_process_group(finished)
    exit_process(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
