"""molora_linear, every backend against medcare_kernels.reference: output and every gradient."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import (
    MOLORA_DIN_POSITIONS,
    MOLORA_NAMES,
    MOLORA_SHAPES,
    MOLORA_TRAINABLE,
    assert_compiled_matches_eager,
    assert_matches_reference,
    assert_within_rule,
    backends_for,
    call_backend,
    gradcheck,
    leaves,
    maybe_triton_mask,
    molora_inputs,
    reversed_reduction,
    rng_after_one_draw,
    run_with_grads,
    unreverse,
)

import medcare_kernels as mk
from medcare_kernels import reference

BACKENDS = backends_for("molora_linear")
# The Triton backend's GEMM paths (_triton_gemm.gemm_sum): `auto` is `fused` under the interpreter.
BACKEND_GEMM = [(b, "auto") for b in BACKENDS] + [("triton", g) for g in ("cublas", "add", "epilogue")
                                                 if "triton" in BACKENDS]
NAMES, TRAINABLE, DIN_POSITIONS = MOLORA_NAMES, MOLORA_TRAINABLE, MOLORA_DIN_POSITIONS


def _kw(E, K, R, dropout=0.0):
    return dict(num_experts=E, top_k=K, expert_rank=R, scaling=2.0, dropout=dropout)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T, d_in, d_out, E, K, R, Rs", MOLORA_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_molora_matches_reference(backend, T, d_in, d_out, E, K, R, Rs, dtype):
    base = molora_inputs(T, d_in, d_out, E, R, Rs, dtype=torch.float64)
    kw = _kw(E, K, R)
    grads = assert_matches_reference(lambda *t: call_backend(backend, mk.molora_linear, *t, **kw),
                                     lambda *t: reference.molora_linear(*t, **kw), base, dtype=dtype,
                                     trainable=TRAINABLE, din_positions=DIN_POSITIONS, names=NAMES)
    assert grads[1] is None and grads[2] is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_molora_gradcheck_float64(backend, bias):
    inputs = leaves(molora_inputs(6, 10, 7, 4, 3, 2, dtype=torch.float64, bias=bias, router_bias=bias))
    kw = _kw(4, 2, 3)
    assert gradcheck(backend, lambda *t: call_backend(backend, mk.molora_linear, *t, **kw), inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_molora_3d_input_and_fp32_adapters_with_bf16_activations(backend):
    base = molora_inputs(0, 24, 40, 4, 4, 8, dtype=torch.float64, lead=(3, 5))
    kw = _kw(4, 2, 4)
    # The module layout of medcare: bf16 activations and base weight, fp32 router and adapters.
    mixed = [t.to(torch.bfloat16) if i in (0, 1, 2) else t.float() for i, t in enumerate(base)]
    fused_in, ref_in = leaves(mixed, trainable=TRAINABLE), leaves(mixed, trainable=TRAINABLE)
    y, grads, g = run_with_grads(lambda *t: call_backend(backend, mk.molora_linear, *t, **kw), fused_in)
    y_ref, grads_ref, _ = run_with_grads(lambda *t: reference.molora_linear(*t, **kw), ref_in, g)
    truth_in = leaves(base, trainable=TRAINABLE)
    y_true, grads_true, _ = run_with_grads(lambda *t: reference.molora_linear(*t, **kw), truth_in, g)
    assert y.shape == (3, 5, 40) and y.dtype == torch.bfloat16
    for i in TRAINABLE:
        assert grads[i].dtype == fused_in[i].dtype, f"d {NAMES[i]} must come back in the parameter's dtype"
    assert_within_rule("y", y, y_ref.to(y.dtype), y_true)


@pytest.mark.parametrize("backend, gemm", BACKEND_GEMM)
def test_molora_dropout_matches_reference_with_the_same_seed(backend, gemm, monkeypatch):
    monkeypatch.setenv("MEDCARE_TRITON_GEMM", gemm)
    base = molora_inputs(11, 20, 9, 3, 2, 4, dtype=torch.float64)
    kw = _kw(3, 2, 2, dropout=0.3)
    fused_in, ref_in = leaves(base, trainable=TRAINABLE), leaves(base, trainable=TRAINABLE)
    y, grads, g = run_with_grads(lambda *t: call_backend(backend, mk.molora_linear, *t, **kw), fused_in, seed=5)
    after_fused = torch.get_rng_state()
    with maybe_triton_mask(backend, 5):  # the Triton ops regenerate their own (Philox) mask
        y_ref, grads_ref, _ = run_with_grads(lambda *t: reference.molora_linear(*t, **kw), ref_in, g, seed=5)
    torch.testing.assert_close(y, y_ref)
    for i in TRAINABLE:
        torch.testing.assert_close(grads[i], grads_ref[i], msg=f"d {NAMES[i]}")
    # One draw in all: backward regenerated the mask without moving the global generator.
    one_draw = rng_after_one_draw(backend, 5, lambda: reference.molora_linear(*leaves(base), **kw))
    assert torch.equal(after_fused, one_draw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_molora_ties_route_to_lower_experts(backend):
    x, w, b, rw, rb, a, bb = molora_inputs(5, 12, 6, 4, 3, 0, dtype=torch.float64)
    rw, rb = torch.zeros_like(rw), torch.zeros_like(rb)            # every router probability equal
    kw = _kw(4, 2, 3)
    y = call_backend(backend, mk.molora_linear, x, w, b, rw, rb, a, bb, **kw)
    want = torch.nn.functional.linear(x, w, b) + 2.0 * 0.5 * (x @ a[:6].T) @ bb[:, :6].T
    torch.testing.assert_close(y, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_molora_zero_tokens(backend):
    inputs = leaves(molora_inputs(0, 8, 5, 2, 2, 2, dtype=torch.float32), trainable=TRAINABLE)
    y = call_backend(backend, mk.molora_linear, *inputs, **_kw(2, 1, 2))
    assert y.shape == (0, 5)
    y.sum().backward()
    assert inputs[5].grad.abs().sum() == 0


@pytest.mark.parametrize("backend", backends_for("molora_linear"))
def test_return_indices_matches_route_topk(backend):
    """return_indices=True gives the routing decision the op used: exactly route_topk of the router logits."""
    t, din, dout, e, k, r, rs = 37, 24, 20, 4, 2, 3, 2
    x = torch.randn(2, t, din)
    w, rw, rb = torch.randn(dout, din), torch.randn(e, din), torch.randn(e)
    a, b = torch.randn(e * r + rs, din), torch.randn(dout, e * r + rs)
    with mk.use_backend(backend):
        y, idx = mk.molora_linear(x, w, None, rw, rb, a, b, num_experts=e, top_k=k, expert_rank=r, scaling=2.0,
                                  return_indices=True)
        y_only = mk.molora_linear(x, w, None, rw, rb, a, b, num_experts=e, top_k=k, expert_rank=r, scaling=2.0)
    _, want = mk.reference.route_topk(x @ rw.t() + rb, k)
    assert idx.shape == (2, t, k) and idx.dtype == torch.int64
    assert torch.equal(idx, want)
    torch.testing.assert_close(y, y_only, rtol=0, atol=0)


@pytest.mark.slow  # inductor compiles forward and backward around the interpreted kernels, ~20 s
@pytest.mark.skipif("triton" not in BACKENDS, reason="the triton backend is not built here")
def test_triton_molora_compiles_fullgraph_and_matches_eager():
    """The Triton ops are torch.library custom ops and backend selection is a traced constant, so a model
    calling molora_linear compiles without graph breaks (here under the interpreter; on GPU in test_triton_gpu)."""
    base = molora_inputs(16, 32, 24, 4, 4, 8)
    kw = _kw(4, 2, 4)

    def loss(*t):
        return mk.molora_linear(*t, **kw).square().mean()

    assert_compiled_matches_eager(loss, base, TRAINABLE, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_molora_many_experts(backend):
    """E=64, K=8: the routing tiles of the fused kernels grow with E (and shrink their token block)."""
    T, d_in, d_out, E, K, R, Rs = 9, 16, 12, 64, 8, 2, 4
    base = molora_inputs(T, d_in, d_out, E, R, Rs, dtype=torch.float64)
    kw = _kw(E, K, R)
    y, grads, g = run_with_grads(lambda *t: call_backend(backend, mk.molora_linear, *t, **kw),
                                 leaves(base, dtype=torch.float32, trainable=TRAINABLE))
    y_ref, grads_ref, _ = run_with_grads(lambda *t: reference.molora_linear(*t, **kw),
                                         leaves(base, dtype=torch.float32, trainable=TRAINABLE), g)
    y_true, grads_true, _ = run_with_grads(lambda *t: reference.molora_linear(*t, **kw),
                                           leaves(base, trainable=TRAINABLE), g)
    rev = unreverse(run_with_grads(lambda *t: reference.molora_linear(*t, **kw), reversed_reduction(
        leaves(base, dtype=torch.float32, trainable=TRAINABLE), DIN_POSITIONS), g)[1], DIN_POSITIONS)
    assert_within_rule("y", y, y_ref, y_true)
    for i in TRAINABLE:
        assert_within_rule(f"d {NAMES[i]}", grads[i], (grads_ref[i], rev[i]), grads_true[i])
