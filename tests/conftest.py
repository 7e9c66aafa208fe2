"""Shared test setup: seeding, the `gpu` marker, and (for interpreter runs) TRITON_INTERPRET before imports."""

from __future__ import annotations

import os

import pytest
import torch

# Triton kernels are tested on CPU through the interpreter, which must be switched on before any kernel is
# decorated, i.e. before medcare_kernels is imported; on a machine with a GPU the real compiler is used.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
