"""The Triton backend on a GPU: real sizes in bf16/fp16/fp32, poisoned outputs, torch.compile, determinism.

The CPU suite runs the same kernels under TRITON_INTERPRET=1 on small shapes; these run where the compiler does.
"""

from __future__ import annotations

import pytest
import torch
from kernel_testing import (
    assert_within_rule,
    leaves,
    lora_inputs,
    molora_inputs,
    reversed_reduction,
    run_with_grads,
    unreverse,
)

import medcare_kernels as mk
from medcare_kernels import reference

pytestmark = pytest.mark.gpu

TRAINABLE = (0, 3, 4, 5, 6)
DIN_POSITIONS = (0, 1, 3, 5)
NAMES = ("x", "weight", "bias", "router_weight", "router_bias", "lora_a", "lora_b")
# (T, Din, Dout, E, K, R, Rs): a Qwen-like slice at real token counts, plus odd sizes that miss every tile.
GPU_MOLORA = [(4096, 1024, 2752, 8, 2, 16, 32), (1000, 77, 130, 8, 2, 16, 32), (37, 512, 300, 3, 3, 8, 0),
              (1, 256, 128, 1, 1, 16, 16), (777, 2752, 1024, 8, 2, 16, 32)]
GEMM_PATHS = ["fused", "cublas"]
# The fused-GEMM path autotunes per shape (slow to compile): it gets the first two shapes, cuBLAS all of them.
GRID = [(gemm, *shape) for shape in GPU_MOLORA for gemm in GEMM_PATHS if gemm == "cublas" or shape in GPU_MOLORA[:2]]


def _kw(E, K, R):
    return dict(num_experts=E, top_k=K, expert_rank=R, scaling=2.0)


def _poison_allocator():
    """Fill freed cached blocks with NaN so an output element the kernels never write shows up as NaN."""
    junk = torch.full((64 * 1024 * 1024,), float("nan"), device="cuda")
    del junk


@pytest.mark.parametrize("gemm, T, d_in, d_out, E, K, R, Rs", GRID)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_molora_triton_gpu_matches_reference(monkeypatch, gemm, T, d_in, d_out, E, K, R, Rs, dtype):
    monkeypatch.setenv("MEDCARE_TRITON_GEMM", gemm)
    base = molora_inputs(T, d_in, d_out, E, R, Rs, dtype=torch.float64, device="cuda")
    kw = _kw(E, K, R)
    fused_in = leaves(base, dtype=dtype, trainable=TRAINABLE)
    _poison_allocator()
    with mk.use_backend("triton"):
        y, grads, g = run_with_grads(lambda *t: mk.molora_linear(*t, **kw), fused_in)
    ref_in = leaves(base, dtype=dtype, trainable=TRAINABLE)
    y_ref, grads_ref, _ = run_with_grads(lambda *t: reference.molora_linear(*t, **kw), ref_in, g)
    rev_in = reversed_reduction(leaves(base, dtype=dtype, trainable=TRAINABLE), DIN_POSITIONS)
    y_rev, grads_rev, _ = run_with_grads(lambda *t: reference.molora_linear(*t, **kw), rev_in, g)
    grads_rev = unreverse(grads_rev, DIN_POSITIONS)
    truth_in = leaves(base, trainable=TRAINABLE)
    y_true, grads_true, _ = run_with_grads(lambda *t: reference.molora_linear(*t, **kw), truth_in, g)
    assert_within_rule("y", y, (y_ref, y_rev), y_true)
    for i in TRAINABLE:
        assert_within_rule(f"d {NAMES[i]}", grads[i], (grads_ref[i], grads_rev[i]), grads_true[i])


@pytest.mark.parametrize("gemm", GEMM_PATHS)
@pytest.mark.parametrize("T, d_in, d_out, R", [(4096, 1024, 2752, 64), (1000, 77, 130, 16), (1, 256, 512, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_lora_triton_gpu_matches_reference(monkeypatch, gemm, T, d_in, d_out, R, dtype):
    monkeypatch.setenv("MEDCARE_TRITON_GEMM", gemm)
    base = lora_inputs(T, d_in, d_out, R, dtype=torch.float64, device="cuda")
    trainable = (0, 3, 4)
    _poison_allocator()
    with mk.use_backend("triton"):
        y, grads, g = run_with_grads(lambda *t: mk.lora_linear(*t, scaling=2.0), leaves(base, dtype=dtype,
                                                                                         trainable=trainable))
    y_ref, grads_ref, _ = run_with_grads(lambda *t: reference.lora_linear(*t, scaling=2.0),
                                         leaves(base, dtype=dtype, trainable=trainable), g)
    rev = (0, 1, 3)
    y_rev, grads_rev, _ = run_with_grads(lambda *t: reference.lora_linear(*t, scaling=2.0),
                                         reversed_reduction(leaves(base, dtype=dtype, trainable=trainable), rev), g)
    grads_rev = unreverse(grads_rev, rev)
    y_true, grads_true, _ = run_with_grads(lambda *t: reference.lora_linear(*t, scaling=2.0),
                                           leaves(base, trainable=trainable), g)
    assert_within_rule("y", y, (y_ref, y_rev), y_true)
    for i in trainable:
        assert_within_rule(f"grad {i}", grads[i], (grads_ref[i], grads_rev[i]), grads_true[i])


def _molora_step(inputs, kw):
    with mk.use_backend("triton"):
        y, grads, _ = run_with_grads(lambda *t: mk.molora_linear(*t, **kw), inputs)
    return y, grads


@pytest.mark.parametrize("gemm", GEMM_PATHS)
def test_molora_triton_is_deterministic(monkeypatch, gemm):
    monkeypatch.setenv("MEDCARE_TRITON_GEMM", gemm)
    base = molora_inputs(2048, 1024, 2752, 8, 16, 32, dtype=torch.bfloat16, device="cuda")
    kw = _kw(8, 2, 16)
    y1, g1 = _molora_step(leaves(base, trainable=TRAINABLE), kw)
    y2, g2 = _molora_step(leaves(base, trainable=TRAINABLE), kw)
    assert torch.equal(y1, y2)
    for i in TRAINABLE:
        assert torch.equal(g1[i], g2[i]), f"d {NAMES[i]} differs between two identical runs"


def test_molora_triton_compiles_fullgraph():
    base = molora_inputs(512, 256, 384, 8, 16, 32, dtype=torch.bfloat16, device="cuda")
    kw = _kw(8, 2, 16)

    def step(*t):
        return mk.molora_linear(*t, **kw).float().square().mean()

    with mk.use_backend("triton"):
        eager_in, comp_in = leaves(base, trainable=TRAINABLE), leaves(base, trainable=TRAINABLE)
        step(*eager_in).backward()
        compiled = torch.compile(step, fullgraph=True)
        compiled(*comp_in).backward()
    for i in TRAINABLE:
        torch.testing.assert_close(comp_in[i].grad, eager_in[i].grad, rtol=0, atol=0)


def test_routing_is_fp32_under_bf16_overflow_risk():
    """Router logits far beyond bf16's precision still pick the right experts: the router runs in fp32."""
    T, d_in, d_out, E, K, R, Rs = 256, 512, 256, 8, 2, 16, 32
    x, w, b, rw, rb, a, bb = molora_inputs(T, d_in, d_out, E, R, Rs, dtype=torch.bfloat16, device="cuda")
    rb = torch.arange(E, dtype=torch.float32, device="cuda") * 1e-2 + 1.0e3   # steps bf16 cannot hold at 1e3
    with mk.use_backend("triton"):
        _, idx = mk.molora_linear(x, w, b, rw, rb, a, bb, **_kw(E, K, R), return_indices=True)
    _, want = reference.route_topk(x.float() @ rw.t() + rb, K)
    assert torch.equal(idx, want)
