"""orth_penalty, every backend against medcare_kernels.reference: value and both gradients."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import backends_for, call_backend, orth_model_spec, orth_pairs

import medcare_kernels as mk
from medcare_kernels import reference

BACKENDS = backends_for("orth_penalty")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", [[(1, 1, 77)], orth_model_spec(28, 4, 24, 40), [(3, 5, 10), (4, 4, 9), (3, 5, 10)]],
                         ids=["one-pair", "84-pairs", "mixed-ranks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_orth_penalty_matches_reference(backend, spec, dtype):
    a_base, a_orth = orth_pairs(spec, dtype)
    rb = [t.detach().clone().requires_grad_() for t in a_base]
    ro = [t.detach().clone().requires_grad_() for t in a_orth]
    got = call_backend(backend, mk.orth_penalty, a_base, a_orth)
    want = reference.orth_penalty(rb, ro)
    assert got.shape == () and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-5 if dtype != torch.float64 else 1e-12, atol=0)
    (3.0 * got).backward()
    (3.0 * want).backward()
    for name, u, v in [("a_base", a_base, rb), ("a_orth", a_orth, ro)]:
        for i, (p, q) in enumerate(zip(u, v)):
            assert p.grad.dtype == dtype
            torch.testing.assert_close(p.grad, q.grad, msg=f"d {name}[{i}]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_orth_penalty_frozen_base_and_gradcheck(backend):
    a_base, a_orth = orth_pairs([(3, 2, 6), (3, 2, 5)], torch.float64)
    assert torch.autograd.gradcheck(lambda *t: call_backend(backend, mk.orth_penalty, t[:2], t[2:]),
                                    tuple(a_base + a_orth))
    frozen = [t.detach() for t in a_base]
    call_backend(backend, mk.orth_penalty, frozen, a_orth).backward()
    assert all(t.grad is None for t in frozen) and all(t.grad is not None for t in a_orth)


@pytest.mark.parametrize("backend", BACKENDS)
def test_orth_penalty_sign_of_zero_is_zero(backend):
    a = torch.tensor([[1.0, 0.0]], requires_grad=True)
    b = torch.tensor([[0.0, 1.0]], requires_grad=True)   # A B^T = 0 exactly
    got = call_backend(backend, mk.orth_penalty, [a], [b])
    got.backward()
    assert got.item() == 0.0 and a.grad.abs().sum() == 0 and b.grad.abs().sum() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_orth_penalty_accumulates_in_fp32_under_autocast(backend):
    a_base, a_orth = orth_pairs(orth_model_spec(2, 8, 64, 96), torch.float32)
    want = reference.orth_penalty(a_base, a_orth)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = call_backend(backend, mk.orth_penalty, a_base, a_orth)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
