"""route_topk, every backend against medcare_kernels.reference."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import backends_for, call_backend

import medcare_kernels as mk
from medcare_kernels import reference

BACKENDS = backends_for("route_topk")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, K", [((1, 1), 1), ((37, 8), 2), ((4, 9, 6), 6), ((300, 64), 8), ((5, 3), 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_route_topk_matches_reference(backend, shape, K, dtype):
    logits = torch.randn(shape, dtype=torch.float64).to(dtype)
    ref_in = logits.clone().requires_grad_()
    fused_in = logits.clone().requires_grad_()
    gates, idx = call_backend(backend, mk.route_topk, fused_in, K)
    want_gates, want_idx = reference.route_topk(ref_in, K)
    assert gates.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert idx.shape == (*shape[:-1], K) and idx.dtype == torch.int64
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(gates, want_gates, rtol=1e-6, atol=1e-7)
    c = torch.randn(gates.shape, dtype=gates.dtype)
    (gates * c).sum().backward()
    (want_gates * c).sum().backward()
    assert fused_in.grad.dtype == dtype
    tol = dict(rtol=1e-6, atol=1e-7) if dtype in (torch.float32, torch.float64) else {}
    torch.testing.assert_close(fused_in.grad, ref_in.grad, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_topk_ties_and_gradcheck(backend):
    gates, idx = call_backend(backend, mk.route_topk, torch.zeros(3, 5), 2)
    assert idx.tolist() == [[0, 1]] * 3
    logits = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: call_backend(backend, mk.route_topk, t, 3)[0], (logits,))
