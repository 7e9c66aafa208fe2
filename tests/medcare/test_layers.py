"""medcare.layers: LoRALinear / MoLoRALinear against the math (zero-B identity, delta_weight, merge/unmerge,
named packed adapters, freezing, dropout modes) and against medcare_kernels.reference on the same tensors."""

from __future__ import annotations

import pytest
import torch
from pipeline_testing import one_thread
from torch import nn

from medcare.layers import LoRALinear, MoLoRALinear
from medcare_kernels import reference

DIN, DOUT = 20, 24
E, K, R, RS = 4, 2, 3, 5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    yield from one_thread()


def base_linear(bias: bool = True) -> nn.Linear:
    layer = nn.Linear(DIN, DOUT, bias=bias)
    layer.requires_grad_(False)
    return layer


def lora(dropout: float = 0.0, bias: bool = True) -> LoRALinear:
    return LoRALinear(base_linear(bias), {"knowledge": 3, "alignment": 5}, scaling=1.5, dropout=dropout)


def molora(dropout: float = 0.0, shared_rank: int = RS, bias: bool = True) -> MoLoRALinear:
    return MoLoRALinear(base_linear(bias), num_experts=E, top_k=K, expert_rank=R, shared_rank=shared_rank,
                        scaling=2.0, dropout=dropout)


@torch.no_grad()
def fill(module: nn.Module, std: float = 0.3) -> None:
    for p in module.parameters(recurse=False):
        p.normal_(std=std)


def x_input(*lead: int) -> torch.Tensor:
    return torch.randn(*(lead or (2, 7)), DIN)


# ------------------------------------------------------------------------------------- zero B = identity
@pytest.mark.parametrize("bias", [True, False])
def test_fresh_lora_is_the_base_layer(bias):
    torch.manual_seed(0)
    m = lora(bias=bias)
    assert torch.count_nonzero(m.lora_b) == 0 and torch.count_nonzero(m.lora_a) > 0
    x = x_input(3, 5)
    torch.testing.assert_close(m(x), m.base_layer(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bias", [True, False])
def test_fresh_molora_is_the_base_layer(bias):
    torch.manual_seed(0)
    m = molora(bias=bias)
    assert torch.count_nonzero(m.lora_b) == 0 and torch.count_nonzero(m.lora_a) > 0
    assert torch.count_nonzero(m.router_weight) > 0
    x = x_input(3, 5)
    torch.testing.assert_close(m(x), m.base_layer(x), rtol=0, atol=1e-6)


def test_shapes_of_packed_parameters():
    torch.manual_seed(0)
    m, ml = lora(), molora()
    assert m.lora_a.shape == (8, DIN) and m.lora_b.shape == (DOUT, 8)
    assert ml.lora_a.shape == (E * R + RS, DIN) and ml.lora_b.shape == (DOUT, E * R + RS)
    assert ml.router_weight.shape == (E, DIN) and ml.router_bias.shape == (E,)
    assert ml.router_weight.dtype == torch.float32 and ml.router_bias.dtype == torch.float32
    assert ml.base_layer.weight.shape == (DOUT, DIN)


# ------------------------------------------------------------------------------------------ delta weight
def test_lora_delta_weight_is_s_B_A_over_all_packed_adapters():
    torch.manual_seed(0)
    m = lora()
    fill(m)
    want = 1.5 * (m.lora_b.detach() @ m.lora_a.detach())
    ak, bk = m.adapter("knowledge")
    aa, ba = m.adapter("alignment")
    torch.testing.assert_close(want, 1.5 * (bk @ ak + ba @ aa).detach(), rtol=1e-5, atol=1e-6)
    got = m.delta_weight()
    assert got.dtype == torch.float32 and got.shape == (DOUT, DIN) and not got.requires_grad
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_molora_delta_weight_is_the_shared_lora_only():
    torch.manual_seed(0)
    m = molora()
    fill(m)
    a_s, b_s = m.lora_a.detach()[E * R:], m.lora_b.detach()[:, E * R:]
    torch.testing.assert_close(m.delta_weight(), 2.0 * b_s @ a_s, rtol=1e-6, atol=1e-7)
    # The routed experts play no part in it.
    with torch.no_grad():
        m.lora_b[:, : E * R].normal_()
        m.lora_a[: E * R].normal_()
    torch.testing.assert_close(m.delta_weight(), 2.0 * b_s @ a_s, rtol=1e-6, atol=1e-7)


def test_molora_expert_and_shared_views_follow_the_packed_layout():
    torch.manual_seed(0)
    m = molora()
    fill(m)
    for e in range(E):
        a, b = m.expert(e)
        assert torch.equal(a, m.lora_a[e * R:(e + 1) * R]) and torch.equal(b, m.lora_b[:, e * R:(e + 1) * R])
    a, b = m.shared()
    assert a.shape == (RS, DIN) and b.shape == (DOUT, RS)
    assert torch.equal(a, m.lora_a[E * R:]) and torch.equal(b, m.lora_b[:, E * R:])
    with pytest.raises(IndexError):
        m.expert(E)


def test_molora_without_shared_lora_has_zero_delta():
    torch.manual_seed(0)
    m = molora(shared_rank=0)
    fill(m)
    assert m.lora_a.shape == (E * R, DIN)
    assert torch.count_nonzero(m.delta_weight()) == 0


# ----------------------------------------------------------------------------------------- merge/unmerge
def test_lora_merge_unmerge():
    torch.manual_seed(0)
    m = lora()
    fill(m)
    w0 = m.base_layer.weight.detach().clone()
    x = x_input(3, 5)
    y0 = m(x).detach()
    m.merge()
    assert m.merged
    torch.testing.assert_close(m.base_layer.weight, w0 + m.delta_weight(), rtol=0, atol=1e-6)
    torch.testing.assert_close(m(x), y0, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        m.merge()
    m.unmerge()
    assert not m.merged
    torch.testing.assert_close(m.base_layer.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(m(x), y0, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="not merged"):
        m.unmerge()


def test_molora_merge_still_routes_the_experts():
    torch.manual_seed(0)
    m = molora()
    fill(m)
    w0 = m.base_layer.weight.detach().clone()
    x = x_input(3, 5)
    y0 = m(x).detach()
    # Sanity: the routed experts contribute, so "merged = base + shared only" would be detectably wrong.
    shared_only = (m.base_layer(x) + x @ m.delta_weight().T).detach()
    assert (y0 - shared_only).abs().max() > 1e-2
    m.merge()
    torch.testing.assert_close(m.base_layer.weight, w0 + m.delta_weight(), rtol=0, atol=1e-6)
    torch.testing.assert_close(m(x), y0, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError):
        m.merge()
    m.unmerge()
    torch.testing.assert_close(m.base_layer.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(m(x), y0, rtol=1e-5, atol=1e-5)


def test_merged_molora_router_still_gets_gradients():
    torch.manual_seed(0)
    m = molora()
    fill(m)
    m.merge()
    m(x_input()).square().sum().backward()
    assert m.router_weight.grad is not None and m.router_weight.grad.abs().sum() > 0
    assert m.lora_b.grad[:, : E * R].abs().sum() > 0


# ----------------------------------------------------------------------------------- named adapters
def test_adapter_views_and_set_adapter():
    torch.manual_seed(0)
    m = lora()
    assert m.adapter_slice("knowledge") == slice(0, 3) and m.adapter_slice("alignment") == slice(3, 8)
    a, b = torch.randn(5, DIN), torch.randn(DOUT, 5)
    m.set_adapter("alignment", a, b)
    assert torch.equal(m.lora_a[3:], a) and torch.equal(m.lora_b[:, 3:], b)
    ak, bk = m.adapter("knowledge")
    assert torch.count_nonzero(bk) == 0  # the other slot is untouched
    ak2, bk2 = torch.randn(3, DIN), torch.randn(DOUT, 3)
    m.set_adapter("knowledge", ak2, bk2)
    got_a, got_b = m.adapter("knowledge")
    assert torch.equal(got_a, ak2) and torch.equal(got_b, bk2)
    assert torch.equal(m.lora_a[3:], a)  # and the alignment slot is still what was set
    # Views: writing through adapter() writes the packed parameter.
    with torch.no_grad():
        m.adapter("alignment")[1].fill_(0.25)
    assert torch.all(m.lora_b[:, 3:] == 0.25)
    with pytest.raises(ValueError, match="alignment"):
        m.set_adapter("alignment", torch.randn(4, DIN), b)
    with pytest.raises(KeyError):
        m.adapter("nope")


def test_freeze_adapter_zeroes_only_the_frozen_slice():
    torch.manual_seed(0)
    m = lora()
    fill(m)
    m.freeze_adapter("knowledge")
    m(x_input()).square().sum().backward()
    ga, gb = m.lora_a.grad, m.lora_b.grad
    assert torch.count_nonzero(ga[:3]) == 0 and torch.count_nonzero(gb[:, :3]) == 0
    assert torch.count_nonzero(ga[3:]) == ga[3:].numel() and torch.count_nonzero(gb[:, 3:]) == gb[:, 3:].numel()


def test_freeze_adapter_leaves_the_other_gradient_unchanged():
    torch.manual_seed(0)
    m, ref = lora(), lora()
    fill(m)
    ref.load_state_dict(m.state_dict())
    m.freeze_adapter("alignment")
    x = x_input()
    m(x).square().sum().backward()
    ref(x).square().sum().backward()
    torch.testing.assert_close(m.lora_a.grad[:3], ref.lora_a.grad[:3])
    torch.testing.assert_close(m.lora_b.grad[:, :3], ref.lora_b.grad[:, :3])
    assert torch.count_nonzero(m.lora_a.grad[3:]) == 0 and torch.count_nonzero(m.lora_b.grad[:, 3:]) == 0
    assert torch.count_nonzero(ref.lora_a.grad[3:]) > 0
    with pytest.raises(KeyError):
        m.freeze_adapter("nope")


# --------------------------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("make", [lora, molora], ids=["lora", "molora"])
def test_eval_mode_has_no_dropout(make):
    torch.manual_seed(0)
    m = make(dropout=0.5)
    fill(m)
    m.eval()
    x = x_input()
    y1, y2 = m(x), m(x)
    assert torch.equal(y1, y2)
    m.dropout = 0.0
    torch.testing.assert_close(m(x), y1, rtol=0, atol=0)  # eval with p=0.5 == p=0


@pytest.mark.parametrize("make", [lora, molora], ids=["lora", "molora"])
def test_train_mode_applies_dropout_to_the_adapter_input_only(make):
    torch.manual_seed(0)
    m = make(dropout=0.5)
    fill(m)
    x = x_input()
    m.eval()
    y_eval = m(x).detach()
    m.train()
    y1, y2 = m(x).detach(), m(x).detach()
    assert not torch.allclose(y1, y2) and not torch.allclose(y1, y_eval)
    # The base GEMM (and router) never see dropout: with B = 0 training output is the base output.
    with torch.no_grad():
        m.lora_b.zero_()
    torch.testing.assert_close(m(x), m.base_layer(x), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------ against reference
@pytest.mark.parametrize("train", [False, True])
def test_lora_module_equals_reference(train):
    torch.manual_seed(0)
    m = lora(dropout=0.3)
    fill(m)
    m.train(train)
    x = torch.randn(2, 5, DIN, requires_grad=True)
    torch.manual_seed(7)
    y = m(x)
    y.backward(torch.ones_like(y))
    grads = [t.grad.clone() for t in (x, m.lora_a, m.lora_b)]
    xr = x.detach().clone().requires_grad_(True)
    a, b = m.lora_a.detach().clone().requires_grad_(True), m.lora_b.detach().clone().requires_grad_(True)
    torch.manual_seed(7)
    yr = reference.lora_linear(xr, m.base_layer.weight, m.base_layer.bias, a, b, scaling=1.5,
                               dropout=0.3 if train else 0.0)
    yr.backward(torch.ones_like(yr))
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    for g, gr in zip(grads, (xr.grad, a.grad, b.grad), strict=True):
        torch.testing.assert_close(g, gr, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("train", [False, True])
def test_molora_module_equals_reference(train):
    torch.manual_seed(0)
    m = molora(dropout=0.3)
    fill(m)
    m.train(train)
    x = torch.randn(2, 5, DIN, requires_grad=True)
    torch.manual_seed(7)
    y = m(x)
    y.backward(torch.ones_like(y))
    params = (x, m.router_weight, m.router_bias, m.lora_a, m.lora_b)
    grads = [t.grad.clone() for t in params]
    leaves = [t.detach().clone().requires_grad_(True) for t in params]
    xr, rw, rb, a, b = leaves
    torch.manual_seed(7)
    yr = reference.molora_linear(xr, m.base_layer.weight, m.base_layer.bias, rw, rb, a, b, num_experts=E,
                                 top_k=K, expert_rank=R, scaling=2.0, dropout=0.3 if train else 0.0)
    yr.backward(torch.ones_like(yr))
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    for g, leaf in zip(grads, leaves, strict=True):
        torch.testing.assert_close(g, leaf.grad, rtol=1e-5, atol=1e-5)
    assert m.router_weight.grad.abs().sum() > 0


def test_molora_equals_a_per_token_loop():
    """The module against the stage-1 formula written out per token (softmax, top-K, renormalise)."""
    torch.manual_seed(0)
    m = molora().double()
    fill(m)
    x = torch.randn(6, DIN, dtype=torch.float64)
    with torch.no_grad():
        y = m(x)
        w, bias = m.base_layer.weight, m.base_layer.bias
        for t in range(x.shape[0]):
            p = torch.softmax(m.router_weight @ x[t] + m.router_bias, -1)
            top = torch.topk(p, K).indices
            gates = p[top] / p[top].sum()
            want = w @ x[t] + bias
            for g, e in zip(gates, top.tolist(), strict=True):
                a, b = m.expert(e)
                want = want + 2.0 * g * (b @ (a @ x[t]))
            a_s, b_s = m.shared()
            want = want + 2.0 * (b_s @ (a_s @ x[t]))
            torch.testing.assert_close(y[t], want, rtol=1e-10, atol=1e-10)


def test_constructor_validation():
    torch.manual_seed(0)
    with pytest.raises(ValueError):
        MoLoRALinear(base_linear(), num_experts=2, top_k=3, expert_rank=2, shared_rank=2, scaling=1.0)
    with pytest.raises(ValueError):
        LoRALinear(base_linear(), {"a": 0}, scaling=1.0)
    with pytest.raises(TypeError):
        LoRALinear(nn.Conv1d(2, 2, 1), {"a": 2}, scaling=1.0)
