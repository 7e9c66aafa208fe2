"""The Triton backend on a GPU: real sizes in bf16/fp16/fp32, poisoned outputs, torch.compile, determinism.

The CPU suite runs the same kernels under TRITON_INTERPRET=1 on small shapes; these run where the compiler does.
"""

from __future__ import annotations

import pytest
import torch
from kernel_testing import (
    MOLORA_DIN_POSITIONS,
    MOLORA_NAMES,
    MOLORA_TRAINABLE,
    assert_compiled_matches_eager,
    assert_matches_reference,
    assert_within_rule,
    leaves,
    lora_inputs,
    molora_inputs,
    reference_draws_triton_mask,
    run_with_grads,
)

import medcare_kernels as mk
from medcare_kernels import reference
from medcare_kernels.ops._triton_gemm import DEFAULT_GEMM, GEMM_PATHS

pytestmark = pytest.mark.gpu

TRAINABLE, DIN_POSITIONS, NAMES = MOLORA_TRAINABLE, MOLORA_DIN_POSITIONS, MOLORA_NAMES
# (T, Din, Dout, E, K, R, Rs): a Qwen-like slice at real token counts, plus odd sizes that miss every tile.
GPU_MOLORA = [(4096, 1024, 2752, 8, 2, 16, 32), (1000, 77, 130, 8, 2, 16, 32), (37, 512, 300, 3, 3, 8, 0),
              (1, 256, 128, 1, 1, 16, 16), (777, 2752, 1024, 8, 2, 16, 32)]
# Every GEMM path (_triton_gemm.GEMM_PATHS) on the first two shapes, the default one on all (gemm2 autotunes per
# shape, slow to compile).
GRID = [(gemm, *shape) for shape in GPU_MOLORA for gemm in GEMM_PATHS
        if gemm == DEFAULT_GEMM or shape in GPU_MOLORA[:2]]


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

    def fused(*t):
        _poison_allocator()
        with mk.use_backend("triton"):
            return mk.molora_linear(*t, **kw)

    assert_matches_reference(fused, lambda *t: reference.molora_linear(*t, **kw), base, dtype=dtype,
                             trainable=TRAINABLE, din_positions=DIN_POSITIONS, names=NAMES)


@pytest.mark.parametrize("gemm", GEMM_PATHS)
@pytest.mark.parametrize("T, d_in, d_out, R", [(4096, 1024, 2752, 64), (1000, 77, 130, 16), (1, 256, 512, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_lora_triton_gpu_matches_reference(monkeypatch, gemm, T, d_in, d_out, R, dtype):
    monkeypatch.setenv("MEDCARE_TRITON_GEMM", gemm)
    base = lora_inputs(T, d_in, d_out, R, dtype=torch.float64, device="cuda")

    def fused(*t):
        _poison_allocator()
        with mk.use_backend("triton"):
            return mk.lora_linear(*t, scaling=2.0)

    assert_matches_reference(fused, lambda *t: reference.lora_linear(*t, scaling=2.0), base, dtype=dtype,
                             trainable=(0, 3, 4), din_positions=(0, 1, 3),
                             names=("x", "weight", "bias", "lora_a", "lora_b"))


@pytest.mark.parametrize("gemm", GEMM_PATHS)          # the dX kernel writes (epilogue) or accumulates (others)
@pytest.mark.parametrize("dropout", [0.05, 0.5])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_lora_triton_gpu_dropout_matches_reference_under_its_mask(monkeypatch, gemm, dropout, dtype):
    """The Philox-dropout kernels (shrink, wgrad, dX) at a real size against the reference given their mask."""
    monkeypatch.setenv("MEDCARE_TRITON_GEMM", gemm)
    base = lora_inputs(4096, 1024, 2752, 64, dtype=torch.float64, device="cuda")
    kw = dict(scaling=2.0, dropout=dropout)

    def fused(*t):
        _poison_allocator()
        with mk.use_backend("triton"):
            return mk.lora_linear(*t, **kw)

    trainable = (0, 3, 4)
    y, grads, g = run_with_grads(fused, leaves(base, dtype=dtype, trainable=trainable))
    with reference_draws_triton_mask(1234):
        y_ref, grads_ref, _ = run_with_grads(lambda *t: reference.lora_linear(*t, **kw),
                                             leaves(base, dtype=dtype, trainable=trainable), g)
        y_true, grads_true, _ = run_with_grads(lambda *t: reference.lora_linear(*t, **kw),
                                               leaves(base, trainable=trainable), g)
    assert_within_rule("y", y, y_ref, y_true)
    for i, name in zip(trainable, ("x", "lora_a", "lora_b"), strict=True):
        assert_within_rule(f"d {name}", grads[i], grads_ref[i], grads_true[i])


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


def test_gemm2_autotunes_once_per_token_bucket_not_per_token_count():
    """A training run sees a new T at almost every step: gemm2's autotuner keys on T's power-of-two bucket."""
    from medcare_kernels.ops import _triton_gemm

    w, b = torch.randn(384, 256, device="cuda", dtype=torch.bfloat16), torch.randn(384, 48, device="cuda",
                                                                                   dtype=torch.bfloat16)
    kernel = _triton_gemm._skinny_kernel
    for t in (1000, 1001, 1017, 1024):
        x, s = torch.randn(t, 256, device="cuda", dtype=torch.bfloat16), torch.randn(t, 48, device="cuda",
                                                                                   dtype=torch.bfloat16)
        y = _triton_gemm.gemm_sum([(x, w)], s, b, path="epilogue")
        torch.testing.assert_close(y.float(), x.float() @ w.float().t() + s.float() @ b.float().t(), rtol=2e-2,
                                   atol=2e-1)
        if t == 1000:
            tuned = len(kernel.cache)
    assert len(kernel.cache) == tuned, "each token count was autotuned anew"


def test_molora_triton_compiles_fullgraph():
    base = molora_inputs(512, 256, 384, 8, 16, 32, dtype=torch.bfloat16, device="cuda")
    kw = _kw(8, 2, 16)

    def step(*t):
        return mk.molora_linear(*t, **kw).float().square().mean()

    assert_compiled_matches_eager(step, base, TRAINABLE, rtol=0, atol=0)


def test_routing_is_fp32_under_bf16_overflow_risk():
    """Router logits far beyond bf16's precision still pick the right experts: the router runs in fp32."""
    T, d_in, d_out, E, K, R, Rs = 256, 512, 256, 8, 2, 16, 32
    x, w, b, rw, rb, a, bb = molora_inputs(T, d_in, d_out, E, R, Rs, dtype=torch.bfloat16, device="cuda")
    rb = torch.arange(E, dtype=torch.float32, device="cuda") * 1e-2 + 1.0e3   # steps bf16 cannot hold at 1e3
    with mk.use_backend("triton"):
        _, idx = mk.molora_linear(x, w, b, rw, rb, a, bb, **_kw(E, K, R), return_indices=True)
    _, want = reference.route_topk(x.float() @ rw.t() + rb, K)
    assert torch.equal(idx, want)
