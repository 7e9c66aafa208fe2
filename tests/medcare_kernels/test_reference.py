"""The oracle of the oracle: medcare_kernels.reference against deliberately dumb per-token loops, float64,
outputs and every gradient. If these fail, every other kernel test is meaningless."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import LORA_SHAPES, MOLORA_SHAPES, leaves, lora_inputs, molora_inputs

from medcare_kernels import reference

F64 = torch.float64


def loop_topk(p_row: list[float], k: int) -> list[int]:
    """Experts by decreasing probability, ties to the lower index, in plain Python."""
    return sorted(range(len(p_row)), key=lambda e: (-p_row[e], e))[:k]


def loop_route(logits, k):
    gates = torch.zeros_like(logits, dtype=F64)
    picks = []
    for t in range(logits.shape[0]):
        p = torch.softmax(logits[t].double(), dim=0)
        sel = loop_topk(p.tolist(), k)
        z = sum(p[e] for e in sel)
        for e in sel:
            gates[t, e] = p[e] / z
        picks.append(sel)
    return gates, torch.tensor(picks)


def loop_molora(x, w, b, rw, rb, a, bb, E, K, R, s):
    rows = []
    for t in range(x.shape[0]):
        xt = x[t]
        logits = rw @ xt + (rb if rb is not None else 0)
        p = torch.softmax(logits, dim=0)
        sel = loop_topk(p.tolist(), K)
        z = sum(p[e] for e in sel)
        y = w @ xt + (b if b is not None else 0)
        for e in sel:
            y = y + s * (p[e] / z) * (bb[:, e * R:(e + 1) * R] @ (a[e * R:(e + 1) * R] @ xt))
        if a.shape[0] > E * R:
            y = y + s * (bb[:, E * R:] @ (a[E * R:] @ xt))
        rows.append(y)
    return torch.stack(rows)


def loop_lora(x, w, b, a, bb, s):
    return torch.stack([w @ x[t] + (b if b is not None else 0) + s * (bb @ (a @ x[t])) for t in range(x.shape[0])])


def loop_orth(a_base, a_orth):
    total = torch.zeros((), dtype=F64)
    for a, b in zip(a_base, a_orth):
        for j in range(a.shape[0]):
            for k in range(b.shape[0]):
                total = total + (a[j] * b[k]).sum().abs()
    return total


def compare_with_grads(f_ref, f_loop, inputs):
    ins_ref, ins_loop = leaves(inputs), leaves(inputs)
    y_ref, y_loop = f_ref(*ins_ref), f_loop(*ins_loop)
    torch.testing.assert_close(y_ref, y_loop, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y_ref)
    y_ref.backward(g)
    y_loop.backward(g)
    for i, (u, v) in enumerate(zip(ins_ref, ins_loop)):
        if u is not None:
            torch.testing.assert_close(u.grad, v.grad, rtol=1e-9, atol=1e-10, msg=f"grad of input {i}")


@pytest.mark.parametrize("T, d_in, d_out, E, K, R, Rs", MOLORA_SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_reference_molora_matches_loop(T, d_in, d_out, E, K, R, Rs, bias):
    inputs = molora_inputs(T, d_in, d_out, E, R, Rs, dtype=F64, bias=bias, router_bias=bias)
    kw = dict(num_experts=E, top_k=K, expert_rank=R, scaling=2.0)
    compare_with_grads(lambda *t: reference.molora_linear(*t, **kw),
                       lambda *t: loop_molora(*t, E, K, R, 2.0), inputs)


@pytest.mark.parametrize("T, d_in, d_out, R", LORA_SHAPES)
def test_reference_lora_matches_loop(T, d_in, d_out, R):
    inputs = lora_inputs(T, d_in, d_out, R, dtype=F64)
    compare_with_grads(lambda *t: reference.lora_linear(*t, scaling=0.5), lambda *t: loop_lora(*t, 0.5), inputs)


@pytest.mark.parametrize("T, E, K", [(1, 1, 1), (17, 8, 2), (5, 6, 6), (9, 64, 8)])
def test_reference_route_topk_matches_loop(T, E, K):
    logits = torch.randn(T, E, dtype=F64)
    gates, idx = reference.route_topk(logits, K)
    want_gates, want_idx = loop_route(logits, K)
    torch.testing.assert_close(gates, want_gates, rtol=1e-12, atol=1e-12)
    assert torch.equal(idx, want_idx)


def test_reference_route_topk_ties_go_to_lower_index():
    logits = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0, 5.0]])
    gates, idx = reference.route_topk(logits, 2)
    assert idx.tolist() == [[1, 2], [0, 1], [4, 0]]
    assert gates.dtype == torch.float32
    torch.testing.assert_close(gates[1], torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0]))


def test_reference_route_topk_gradient_is_through_renormalised_weights():
    logits = torch.randn(4, 6, dtype=F64, requires_grad=True)
    gates, idx = reference.route_topk(logits, 3)
    c = torch.randn(4, 6, dtype=F64)
    (gates * c).sum().backward()
    # Hand derivation: w = p_I / Z; dp_I = (c_I - <c_I, w>) / Z; dl = p (dp - <dp, p>).
    p = torch.softmax(logits.detach(), -1)
    sel = torch.zeros_like(p).scatter(-1, idx, 1.0)
    z = (p * sel).sum(-1, keepdim=True)
    w = p * sel / z
    dp = sel * (c - (c * w).sum(-1, keepdim=True)) / z
    torch.testing.assert_close(logits.grad, p * (dp - (dp * p).sum(-1, keepdim=True)))


def test_reference_orth_penalty_matches_loop():
    a_base = [torch.randn(r, d, dtype=F64) for r, d in [(4, 10), (3, 7), (4, 10)]]
    a_orth = [torch.randn(r, d, dtype=F64) for r, d in [(5, 10), (3, 7), (2, 10)]]
    compare_with_grads(lambda *t: reference.orth_penalty(t[:3], t[3:]),
                       lambda *t: loop_orth(t[:3], t[3:]), a_base + a_orth)


def test_reference_orth_penalty_accumulates_bf16_in_fp32():
    a, b = torch.randn(8, 64).bfloat16(), torch.randn(8, 64).bfloat16()
    got = reference.orth_penalty([a], [b])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), loop_orth([a.double()], [b.double()]), rtol=1e-5, atol=0)


def test_reference_dropout_is_inverted_and_shared_by_all_packed_adapters():
    x = torch.randn(200, 30, dtype=F64)
    w = torch.zeros(5, 30, dtype=F64)
    a = torch.eye(30, dtype=F64)[:2].repeat(2, 1)          # two packed adapters reading the same features
    b = torch.zeros(5, 4, dtype=F64)
    b[0, 0] = b[1, 2] = 1.0                                # out0 <- adapter 1 row 0, out1 <- adapter 2 row 0
    torch.manual_seed(3)
    y = reference.lora_linear(x, w, None, a, b, scaling=1.0, dropout=0.5)
    assert torch.equal(y[:, 0], y[:, 1])                   # one draw for both adapters
    kept = y[:, 0] != 0
    torch.testing.assert_close(y[kept, 0], 2.0 * x[kept, 0])
    assert 0.3 < kept.double().mean().item() < 0.7
