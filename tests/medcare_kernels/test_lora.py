"""lora_linear, every backend against medcare_kernels.reference: output and every gradient."""

from __future__ import annotations

import contextlib

import pytest
import torch
from kernel_testing import (
    LORA_SHAPES,
    assert_within_rule,
    backends_for,
    call_backend,
    gradcheck,
    leaves,
    lora_inputs,
    reference_draws_triton_mask,
    run_with_grads,
)

import medcare_kernels as mk
from medcare_kernels import reference

BACKENDS = backends_for("lora_linear")
# The Triton backend's GEMM paths (_triton_gemm.gemm_sum): `auto` is `fused` under the interpreter.
BACKEND_GEMM = [(b, "auto") for b in BACKENDS] + [("triton", g) for g in ("cublas", "add", "epilogue")
                                                 if "triton" in BACKENDS]
NAMES = ("x", "weight", "bias", "lora_a", "lora_b")
TRAINABLE = (0, 3, 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T, d_in, d_out, R", LORA_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_lora_matches_reference(backend, T, d_in, d_out, R, dtype, bias):
    base = lora_inputs(T, d_in, d_out, R, dtype=torch.float64, bias=bias)
    kw = dict(scaling=2.0)
    y, grads, g = run_with_grads(lambda *t: call_backend(backend, mk.lora_linear, *t, **kw),
                                 leaves(base, dtype=dtype, trainable=TRAINABLE))
    y_ref, grads_ref, _ = run_with_grads(lambda *t: reference.lora_linear(*t, **kw),
                                         leaves(base, dtype=dtype, trainable=TRAINABLE), g)
    y_true, grads_true, _ = run_with_grads(lambda *t: reference.lora_linear(*t, **kw),
                                           leaves(base, trainable=TRAINABLE), g)
    assert_within_rule("y", y, y_ref, y_true)
    for i in TRAINABLE:
        assert_within_rule(f"d {NAMES[i]}", grads[i], grads_ref[i], grads_true[i])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_lora_gradcheck_float64_3d(backend, dropout):
    inputs = leaves(lora_inputs(0, 9, 6, 3, dtype=torch.float64, lead=(2, 3)))

    def f(*t):
        torch.manual_seed(11)  # gradcheck re-runs forward: the same mask every time
        return call_backend(backend, mk.lora_linear, *t, scaling=1.5, dropout=dropout)

    assert gradcheck(backend, f, inputs)


@pytest.mark.parametrize("backend, gemm", BACKEND_GEMM)
@pytest.mark.parametrize("dropout", [0.05, 0.5])
def test_lora_dropout_matches_reference_with_the_same_seed(backend, gemm, dropout, monkeypatch):
    """The torch backend drops what the reference drops under one torch seed; the Triton backend regenerates its
    own (Philox) mask in every kernel that reads drop(x), so the reference is given that mask."""
    monkeypatch.setenv("MEDCARE_TRITON_GEMM", gemm)
    base = lora_inputs(0, 20, 9, 6, dtype=torch.float64, lead=(4, 5))
    kw = dict(scaling=2.0, dropout=dropout)
    y, grads, g = run_with_grads(lambda *t: call_backend(backend, mk.lora_linear, *t, **kw), leaves(base), seed=9)
    with reference_draws_triton_mask(9) if backend == "triton" else contextlib.nullcontext():
        y_ref, grads_ref, _ = run_with_grads(lambda *t: reference.lora_linear(*t, **kw), leaves(base), g, seed=9)
    assert not torch.equal(y, run_with_grads(lambda *t: reference.lora_linear(*t, scaling=2.0), leaves(base), g)[0])
    torch.testing.assert_close(y, y_ref)
    for i, name in enumerate(NAMES):
        torch.testing.assert_close(grads[i], grads_ref[i], msg=f"d {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_under_autocast_runs_in_the_autocast_dtype(backend):
    x, w, b, a, bb = leaves(lora_inputs(7, 16, 8, 4), trainable=(0, 3, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = call_backend(backend, mk.lora_linear, x, w, b, a, bb, scaling=2.0)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == a.grad.dtype == bb.grad.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = reference.lora_linear(x.detach().bfloat16(), w.bfloat16(), b.bfloat16(), a.detach().bfloat16(),
                                     bb.detach().bfloat16(), scaling=2.0)
    torch.testing.assert_close(y, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_outputs_can_be_modified_in_place_like_f_linear(backend):
    """A drop-in for nn.Linear: the result is a fresh tensor, not a view autograd forbids modifying."""
    x, w, b, a, bb = leaves(lora_inputs(0, 8, 5, 2, lead=(2, 3)), trainable=(0, 3, 4))
    y = call_backend(backend, mk.lora_linear, x, w, b, a, bb, scaling=2.0)
    y.mul_(2.0)
    y.sum().backward()
    torch.testing.assert_close(a.grad, reference_grad_a(x, w, b, a, bb))


def reference_grad_a(x, w, b, a, bb):
    a2 = a.detach().clone().requires_grad_()
    (2.0 * reference.lora_linear(x.detach(), w, b, a2, bb.detach(), scaling=2.0)).sum().backward()
    return a2.grad


@pytest.mark.skipif("triton" not in BACKENDS, reason="the Triton backend is not available here")
def test_triton_dropout_mask_is_a_fair_seeded_draw():
    """The Philox mask the Triton kernels regenerate: keep rate 1-p, the same under one seed, new under another,
    no repeated rows or columns (the offsets cover the flattened [T, Din] input), and drawn from torch's seed."""
    from medcare_kernels.ops import _triton_dropout

    keep = _triton_dropout.keep_mask(5, 96, 80, 0.25, torch.device("cpu"))
    assert abs(keep.float().mean().item() - 0.75) < 0.02
    assert torch.equal(keep, _triton_dropout.keep_mask(5, 96, 80, 0.25, torch.device("cpu")))
    assert (keep != _triton_dropout.keep_mask(6, 96, 80, 0.25, torch.device("cpu"))).float().mean() > 0.3
    assert not torch.equal(keep[0], keep[1]) and not torch.equal(keep[:, 0], keep[:, 1])
    torch.manual_seed(3)
    first = _triton_dropout.draw_seed(torch.device("cpu"))
    torch.manual_seed(3)
    assert torch.equal(first, _triton_dropout.draw_seed(torch.device("cpu"))) and first.dtype == torch.int64
    # Four columns share one Philox evaluation: their lanes must still be independent draws.
    lanes = keep.reshape(96, 20, 4).float()
    assert all(abs(lanes[..., i].mean().item() - 0.75) < 0.04 for i in range(4))
    assert not torch.equal(lanes[..., 0], lanes[..., 1]) and not torch.equal(lanes[..., 1], lanes[..., 2])
    # Din not a multiple of 4: the last group's spare lanes fall outside the row, rows stay distinct draws.
    odd = _triton_dropout.keep_mask(5, 50, 77, 0.25, torch.device("cpu"))
    assert abs(odd.float().mean().item() - 0.75) < 0.03 and not torch.equal(odd[0], odd[1])


@pytest.mark.skipif("triton" not in BACKENDS, reason="the Triton backend is not available here")
def test_triton_lora_with_dropout_compiles_fullgraph_and_matches_eager():
    """The per-call dropout seed is drawn from torch's CPU generator before the custom op: no graph break, and
    under the same torch seed the compiled step drops (and differentiates) exactly as eager does."""
    base = lora_inputs(0, 16, 24, 8, dtype=torch.float32, lead=(2, 8))

    def loss(*t):
        return mk.lora_linear(*t, scaling=2.0, dropout=0.25).square().mean()

    eager_in, comp_in = leaves(base), leaves(base)
    with mk.use_backend("triton"):
        torch.manual_seed(4)
        want = loss(*eager_in)
        want.backward()
        torch._dynamo.reset()
        torch.manual_seed(4)
        got = torch.compile(loss, fullgraph=True, backend="aot_eager")(*comp_in)
        got.backward()
    torch.testing.assert_close(got, want)
    for i in TRAINABLE:
        torch.testing.assert_close(comp_in[i].grad, eager_in[i].grad, msg=f"d {NAMES[i]}")
