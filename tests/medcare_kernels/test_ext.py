"""The compiled extension (csrc/, torch.ops.medcare.*): its ops against the reference, values and gradients,
torch.library.opcheck, odd shapes, bad arguments; on a GPU also bf16, large T and CUDA == CPU implementation.

The shared backend tests (test_route_topk.py, test_orth_penalty.py) also run the `ext` backend through the
public API; these tests call the ops themselves, where the public API's validation cannot shield them.
"""

from __future__ import annotations

import pytest
import torch
from kernel_testing import call_backend, orth_model_spec, orth_pairs

import medcare_kernels as mk
from medcare_kernels import _backend, _ext, reference

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason=f"extension not built: {_ext.LOAD_ERROR}")
ops = torch.ops.medcare if _ext.HAS_EXT else None
CUDA = torch.device("cuda")


def _copies(tensors, device=None):
    return [t.detach().to(device or t.device).requires_grad_() for t in tensors]


# ---------------------------------------------------------------------------------------------- route_topk

ROUTE_SHAPES = [((1, 1), 1), ((1, 8), 2), ((37, 8), 8), ((5, 7, 3), 2), ((64, 33), 5), ((130, 64), 8), ((9, 5), 5)]


def _route_check(logits, K, *, grad_tol=None):
    """ops.route_topk against the reference: indices exact, gates, stats, and d_logits for a random d_gates."""
    fused_in, ref_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    gates, idx, stats = ops.route_topk(fused_in, K)
    want_gates, want_idx = reference.route_topk(ref_in, K)
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(gates, want_gates, rtol=1e-6, atol=1e-7)
    acc = want_gates.dtype
    assert stats.shape == (*logits.shape[:-1], 2) and stats.dtype == acc
    torch.testing.assert_close(stats[..., 0], logits.to(acc).amax(-1))
    torch.testing.assert_close(stats[..., 1], (logits.to(acc) - stats[..., :1]).exp().sum(-1))
    c = torch.randn(gates.shape, dtype=acc, device=logits.device)
    (gates * c).sum().backward()
    (want_gates * c).sum().backward()
    assert fused_in.grad.dtype == logits.dtype
    torch.testing.assert_close(fused_in.grad, ref_in.grad, **(grad_tol or {}))


@pytest.mark.parametrize("shape, K", ROUTE_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_route_topk_op_matches_reference(shape, K, dtype):
    tol = dict(rtol=1e-6, atol=1e-7) if dtype in (torch.float32, torch.float64) else None
    _route_check(torch.randn(shape, dtype=torch.float64).to(dtype), K, grad_tol=tol)


def test_route_topk_op_ties_go_to_the_lower_index():
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0, 2.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    gates, idx, _ = ops.route_topk(logits, 3)
    assert idx.tolist() == [[1, 2, 4], [0, 1, 2]]
    torch.testing.assert_close(gates[1], torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0, 0.0]))
    bf = torch.randint(-2, 3, (200, 8)).to(torch.bfloat16)  # many exact ties, as bf16 routers produce
    _route_check(bf, 3)


def test_route_topk_op_empty_and_gradcheck():
    gates, idx, stats = ops.route_topk(torch.empty(0, 6), 2)
    assert gates.shape == (0, 6) and idx.shape == (0, 2) and stats.shape == (0, 2)
    logits = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.route_topk(t, 3)[0], (logits,))

def test_second_order_gradients_raise_instead_of_silently_vanishing():
    """The backward ops have no derivative: a double backward through the op (its registered autograd) or the
    ext backend must raise, not return a gradient that silently misses the second-order term."""
    logits = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    a, b = torch.randn(3, 7, requires_grad=True), torch.randn(2, 7, requires_grad=True)
    firsts = {
        "op route_topk": lambda: ops.route_topk(logits, 3)[0].square().sum(),
        "op orth_penalty": lambda: ops.orth_penalty([a], [b])[0],
    }
    with mk.use_backend("ext"):
        firsts["ext route_topk"] = lambda: mk.route_topk(logits, 3)[0].square().sum()
        firsts["ext orth_penalty"] = lambda: mk.orth_penalty([a], [b])
        for name, first in firsts.items():
            grads = torch.autograd.grad(first(), [t for t in (logits, a, b) if t.requires_grad], create_graph=True,
                                        allow_unused=True)
            grad = next(g for g in grads if g is not None and g.requires_grad)
            with pytest.raises(RuntimeError, match="has no derivative: second-order gradients"):
                grad.square().sum().backward()
                pytest.fail(f"{name}: a second-order backward did not raise")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_topk_opcheck(dtype):
    for shape, K in [((7, 8), 2), ((2, 3, 5), 5), ((1, 1), 1)]:
        logits = torch.randn(shape).to(dtype).requires_grad_()
        torch.library.opcheck(ops.route_topk.default, (logits, K))
    gates, idx, stats = ops.route_topk(torch.randn(6, 8).to(dtype), 2)
    torch.library.opcheck(ops.route_topk_backward.default, (torch.randn(6, 8), torch.randn(6, 8).to(dtype), idx, stats))


@pytest.mark.parametrize("args, match", [
    ((torch.randn(4, 8), 0), "top_k must be in"),
    ((torch.randn(4, 8), 9), "top_k must be in"),
    ((torch.randn(4, 0), 1), r"shape \[..., E\] with E >= 1"),
    ((torch.randn(()), 1), r"shape \[..., E\] with E >= 1"),
    ((torch.randint(0, 3, (4, 8)), 2), "must be float16, bfloat16, float32 or float64"),
])
def test_route_topk_op_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        ops.route_topk(*args)


def test_route_topk_backward_op_rejects_bad_arguments():
    logits = torch.randn(4, 8)
    _, idx, stats = ops.route_topk(logits, 2)
    with pytest.raises(ValueError, match="d_gates must be"):
        ops.route_topk_backward(torch.randn(4, 7), logits, idx, stats)
    with pytest.raises(ValueError, match="indices must be int64"):
        ops.route_topk_backward(torch.randn(4, 8), logits, idx.int(), stats)
    with pytest.raises(ValueError, match="stats must be"):
        ops.route_topk_backward(torch.randn(4, 8), logits, idx, stats[:, :1])
    with pytest.raises(ValueError, match=r"indices must lie in \[0, E = 8\)"):
        ops.route_topk_backward(torch.randn(4, 8), logits, idx + 7, stats)


# --------------------------------------------------------------------------------------------- orth_penalty

ORTH_SPECS = {
    "one-pair-din77": [(1, 1, 77)],
    "84-pairs-mixed-widths": orth_model_spec(28, 4, 24, 40),
    "mixed-ranks": [(3, 5, 10), (4, 4, 9), (64, 2, 33), (1, 64, 77)],
    "rank64-long-din": [(64, 64, 2100), (16, 32, 1025)],
}


def _orth_check(a_base, a_orth, *, need=(True, True), g=3.0):
    """ops.orth_penalty + its backward against the reference: loss, signs, both gradients (scaled by g)."""
    rb, ro = _copies(a_base), _copies(a_orth)
    loss, signs = ops.orth_penalty(a_base, a_orth)
    want = reference.orth_penalty(rb, ro)
    assert loss.shape == () and loss.dtype == want.dtype
    torch.testing.assert_close(loss, want, rtol=1e-5 if want.dtype == torch.float32 else 1e-12, atol=1e-6)
    want_signs = torch.cat([(a.detach().to(want.dtype) @ b.detach().to(want.dtype).T).sign().flatten()
                            for a, b in zip(a_base, a_orth)])
    assert torch.equal(signs, want_signs)
    (g * loss).backward()
    (g * want).backward()
    for side, got, ref, needed in [("a_base", a_base, rb, need[0]), ("a_orth", a_orth, ro, need[1])]:
        for i, (p, q) in enumerate(zip(got, ref)):
            if not needed:
                assert p.grad is None
                continue
            assert p.grad.dtype == p.dtype and p.grad.shape == p.shape
            torch.testing.assert_close(p.grad, q.grad, msg=f"d {side}[{i}]")


@pytest.mark.parametrize("spec", list(ORTH_SPECS.values()), ids=list(ORTH_SPECS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_orth_penalty_op_matches_reference(spec, dtype):
    _orth_check(*orth_pairs(spec, dtype))


def test_orth_penalty_op_frozen_side_gets_no_gradient():
    a_base, a_orth = orth_pairs(ORTH_SPECS["mixed-ranks"], torch.float32)
    _orth_check([t.detach() for t in a_base], a_orth, need=(False, True))
    a_base, a_orth = orth_pairs(ORTH_SPECS["mixed-ranks"], torch.float32)
    _orth_check(a_base, [t.detach() for t in a_orth], need=(True, False))


def test_orth_penalty_op_zero_product_and_empty_ranks():
    a, b = torch.tensor([[1.0, 0.0]], requires_grad=True), torch.tensor([[0.0, 1.0]], requires_grad=True)
    loss, signs = ops.orth_penalty([a], [b])
    loss.backward()
    assert loss.item() == 0.0 and signs.tolist() == [0.0]
    assert a.grad.abs().sum() == 0 and b.grad.abs().sum() == 0  # sign(0) = 0, as torch.abs
    _orth_check(*orth_pairs([(0, 3, 5), (2, 2, 5)], torch.float32))


def test_orth_penalty_op_gradcheck():
    a_base, a_orth = orth_pairs([(3, 2, 6), (3, 5, 5), (1, 1, 77)], torch.float64)
    n = len(a_base)
    assert torch.autograd.gradcheck(lambda *t: ops.orth_penalty(list(t[:n]), list(t[n:]))[0], (*a_base, *a_orth))


def test_orth_penalty_opcheck():
    for spec, dtype in [(ORTH_SPECS["mixed-ranks"], torch.float32), ([(2, 3, 9)] * 3, torch.bfloat16)]:
        a_base, a_orth = orth_pairs(spec, dtype)
        torch.library.opcheck(ops.orth_penalty.default, (a_base, a_orth))
        _, signs = ops.orth_penalty(a_base, a_orth)
        args = (torch.tensor(2.0), signs, [t.detach() for t in a_base], [t.detach() for t in a_orth])
        torch.library.opcheck(ops.orth_penalty_backward.default, (*args, True, True))
        torch.library.opcheck(ops.orth_penalty_backward.default, (*args, False, True))


def test_orth_penalty_op_rejects_bad_arguments():
    a, b = torch.randn(4, 10), torch.randn(4, 10)
    with pytest.raises(ValueError, match="are empty"):  # empty lists cannot reach an op: no tensor to dispatch on
        call_backend("ext", mk.orth_penalty, [], [])
    cases = [
        (([a], [b, b]), "must pair up"),
        (([a.flatten()], [b]), r"a_base\[0\] must be 2-D"),
        (([a], [torch.randn(4, 9)]), r"a_orth\[0\] must have shape \[R2, 10\]"),
        (([a, a], [b, b.double()]), "must share one dtype; pair 1"),
        (([a.int()], [b.int()]), "must be float16, bfloat16, float32 or float64"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            ops.orth_penalty(*args)
    _, signs = ops.orth_penalty([a], [b])
    with pytest.raises(ValueError, match=r"signs must be Float \[16\]"):
        ops.orth_penalty_backward(torch.tensor(1.0), signs[:3], [a], [b], True, True)


def test_ext_backend_casts_mixed_dtypes_and_keeps_each_gradient_dtype():
    a_base = [torch.randn(4, 12, dtype=torch.bfloat16, requires_grad=True)]
    a_orth = [torch.randn(3, 12, dtype=torch.float32, requires_grad=True)]
    got = call_backend("ext", mk.orth_penalty, a_base, a_orth)
    want = reference.orth_penalty([t.detach() for t in a_base], [t.detach() for t in a_orth])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    got.backward()
    assert a_base[0].grad.dtype == torch.bfloat16 and a_orth[0].grad.dtype == torch.float32


def test_ext_backend_orth_gradients_accumulate_and_respect_frozen_sides():
    """The backend's own autograd.Function: a second backward adds onto the first (each .grad is a view of one
    buffer per side; accumulating into one must not touch its neighbours), and a frozen side gets nothing."""
    spec = ORTH_SPECS["mixed-ranks"]
    a_base, a_orth = orth_pairs(spec, torch.float32)
    rb, ro = _copies(a_base), _copies(a_orth)
    for _ in range(2):
        call_backend("ext", mk.orth_penalty, a_base, a_orth).backward()
        reference.orth_penalty(rb, ro).backward()
    for got, want in zip(a_base + a_orth, rb + ro, strict=True):
        torch.testing.assert_close(got.grad, want.grad)
    frozen = [t.detach() for t in a_base]
    call_backend("ext", mk.orth_penalty, frozen, _copies(a_orth)).backward()
    assert all(t.grad is None for t in frozen)


def test_ext_backend_compiles_fullgraph():
    """torch.compile(fullgraph=True) traces the backend's autograd.Functions around the ops (fake impls)."""
    a_base, a_orth = orth_pairs(ORTH_SPECS["mixed-ranks"], torch.float32)
    logits = torch.randn(37, 8, requires_grad=True)

    def step(a_base, a_orth, logits):
        gates, _ = mk.route_topk(logits, 2)
        return mk.orth_penalty(a_base, a_orth) + (gates * gates).sum()

    # The outputs of a custom op must not alias each other (an error when this flag is on, as under CI=1).
    with mk.use_backend("ext"), torch._functorch.config.patch(error_on_custom_op_aliasing=True):
        torch._dynamo.reset()
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        got = compiled(a_base, a_orth, logits)
        got.backward()
    rb, ro, rl = _copies(a_base), _copies(a_orth), logits.detach().clone().requires_grad_()
    want = reference.orth_penalty(rb, ro) + (reference.route_topk(rl, 2)[0] ** 2).sum()
    want.backward()
    torch.testing.assert_close(got, want)
    for g, w in zip([*a_base, *a_orth, logits], [*rb, *ro, rl], strict=True):
        torch.testing.assert_close(g.grad, w.grad)


def test_ext_backend_is_registered_and_auto_prefers_it_on_cuda_only():
    assert set(_backend._registry["ext"]) == {"route_topk", "orth_penalty"}
    assert "available" in mk.available_backends()["ext"]
    assert _backend.AUTO_ORDER["cuda"][0] == "ext"
    with mk.use_backend("auto"):  # CPU: the torch backend stays the auto choice
        assert _backend.resolve("route_topk", torch.device("cpu")) is _backend._registry["torch"]["route_topk"]
    with pytest.raises(mk.BackendUnavailableError, match="has no molora_linear"), mk.use_backend("ext"):
        _backend.resolve("molora_linear", torch.device("cpu"))


# ----------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("shape, K", ROUTE_SHAPES + [((65536, 8), 2), ((65536, 64), 8), ((3, 4096, 16), 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_route_topk_cuda_matches_reference_and_cpu_impl(shape, K, dtype):
    logits = torch.randn(shape, dtype=torch.float64).to(dtype)
    # CUDA's expf and the CPU's exp differ by an ulp or two; over 65536 tokens one fp32 gate or gradient lands
    # ~1e-5 relative apart after renormalisation (seen on an H100: 1.2e-7 absolute on a 0.009 gate).
    tol = {torch.float32: dict(rtol=1e-5, atol=2e-7), torch.float64: dict(rtol=1e-6, atol=1e-7)}.get(dtype)
    _route_check(logits.to(CUDA), K, grad_tol=tol)
    cpu, gpu = ops.route_topk(logits, K), ops.route_topk(logits.to(CUDA), K)
    assert torch.equal(cpu[1], gpu[1].cpu())
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=1e-5, atol=2e-7)
    torch.testing.assert_close(gpu[2].cpu(), cpu[2], rtol=1e-6, atol=1e-6)
    dg = torch.randn(shape, dtype=cpu[0].dtype)
    d_cpu = ops.route_topk_backward(dg, logits, cpu[1], cpu[2])
    d_gpu = ops.route_topk_backward(dg.to(CUDA), logits.to(CUDA), gpu[1], gpu[2])
    torch.testing.assert_close(d_gpu.cpu(), d_cpu, **(tol or {}))


@pytest.mark.gpu
def test_route_topk_cuda_opcheck_ties_and_limits():
    for dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(ops.route_topk.default, (torch.randn(33, 8, device=CUDA).to(dtype).requires_grad_(), 2))
    _route_check(torch.randint(-2, 3, (4096, 8), device=CUDA).to(torch.bfloat16), 3)
    with pytest.raises(ValueError, match="E <= 64 experts and top_k <= 8"):
        ops.route_topk(torch.randn(4, 65, device=CUDA), 2)
    with mk.use_backend("ext"), pytest.raises(mk.BackendUnavailableError, match="cannot run route_topk on CUDA"):
        mk.route_topk(torch.randn(4, 65, device=CUDA), 2)
    gates, _ = mk.route_topk(torch.randn(4, 65, device=CUDA), 2)  # auto: the torch backend takes over
    assert gates.shape == (4, 65)


@pytest.mark.gpu
@pytest.mark.parametrize("spec", list(ORTH_SPECS.values()) + [orth_model_spec(28, 32, 3584, 18944)],
                         ids=list(ORTH_SPECS) + ["qwen2-7b-rank32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_orth_penalty_cuda_matches_reference_and_cpu_impl(spec, dtype):
    a_base, a_orth = orth_pairs(spec, dtype, device=CUDA)
    cpu_base, cpu_orth = _copies(a_base, "cpu"), _copies(a_orth, "cpu")
    _orth_check(a_base, a_orth)
    loss_cpu, signs_cpu = ops.orth_penalty(cpu_base, cpu_orth)
    loss_gpu, signs_gpu = ops.orth_penalty([t.detach() for t in a_base], [t.detach() for t in a_orth])
    torch.testing.assert_close(loss_gpu.cpu(), loss_cpu, rtol=1e-5 if dtype != torch.float64 else 1e-12, atol=0)
    assert (signs_gpu.cpu() != signs_cpu).float().mean() < 1e-3  # entries within rounding of 0 may differ
    loss_cpu.backward()
    for p in a_base + a_orth:
        p.grad = None
    ops.orth_penalty(a_base, a_orth)[0].backward()
    for p, q in zip(a_base + a_orth, cpu_base + cpu_orth):
        torch.testing.assert_close(p.grad.cpu(), q.grad, rtol=1e-2 if dtype == torch.bfloat16 else 1e-4, atol=1e-2)


@pytest.mark.gpu
def test_orth_penalty_cuda_is_deterministic_opchecks_and_limits():
    a_base, a_orth = orth_pairs(orth_model_spec(4, 32, 3584, 18944), torch.float32, device=CUDA)
    first = ops.orth_penalty(a_base, a_orth)[0]
    assert all(torch.equal(first, ops.orth_penalty(a_base, a_orth)[0]) for _ in range(5))
    small_base, small_orth = orth_pairs(ORTH_SPECS["mixed-ranks"], torch.bfloat16, device=CUDA)
    torch.library.opcheck(ops.orth_penalty.default, (small_base, small_orth))
    _, signs = ops.orth_penalty(small_base, small_orth)
    args = (torch.tensor(2.0, device=CUDA), signs, [t.detach() for t in small_base], [t.detach() for t in small_orth])
    torch.library.opcheck(ops.orth_penalty_backward.default, (*args, True, False))
    big = [torch.randn(65, 8, device=CUDA)]
    with pytest.raises(ValueError, match="ranks <= 64"):
        ops.orth_penalty(big, big)
    with mk.use_backend("ext"), pytest.raises(mk.BackendUnavailableError, match="rank 65 > 64"):
        mk.orth_penalty(big, big)
    torch.testing.assert_close(mk.orth_penalty(big, big), reference.orth_penalty(big, big))  # auto: torch
