"""Helpers for kernel tests: input builders, the tolerance rule of docs/design.md §5, and the backends under test."""

from __future__ import annotations

import contextlib
import os
from unittest import mock

import pytest
import torch

import medcare_kernels as mk
from medcare_kernels import _backend, reference

# Odd shapes on purpose: T=1, Din=77, Dout=130, E=1, K=E, Rs=0 (docs/design.md §5).
# (T, Din, Dout, E, K, R, Rs)
MOLORA_SHAPES = [
    (1, 16, 24, 4, 2, 4, 8),
    (37, 77, 130, 8, 2, 4, 8),
    (13, 32, 40, 1, 1, 4, 4),
    (9, 24, 16, 4, 4, 2, 6),
    (21, 40, 33, 3, 2, 5, 0),
]
# (T, Din, Dout, R)
LORA_SHAPES = [(1, 16, 24, 4), (37, 77, 130, 8), (64, 48, 20, 16), (5, 7, 3, 1)]


def backends_for(op: str, device: str = "cpu") -> list[str]:
    """Every non-auto backend that implements `op` and runs on `device` here: all are held to the same tests."""
    dev = torch.device(device)
    names = []
    for name in ("torch", "triton", "ext"):
        if op in _backend._registry[name] and _backend._runs_on(name, dev):
            names.append(name)
    return names


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def gradcheck(backend: str, fn, inputs) -> bool:
    """torch.autograd.gradcheck in float64 (eps 1e-6, atol 1e-6). Under the Triton interpreter the Triton backend
    uses fast_mode: one random projection u^T J v, numerical vs analytical, instead of the full Jacobian (a
    column per input element, each a Python-interpreted launch: 40 s instead of under 1 s). A wrong gradient
    still fails it but for a measure-zero choice of u, v; the elementwise gradient checks against the
    reference at every shape run beside it."""
    return torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-6,
                                    fast_mode=backend == "triton" and INTERPRETED)


def slow_under_interpreter(backends: list[str]) -> list:
    """`backends` as pytest params, the Triton one marked `slow` where it runs under TRITON_INTERPRET (each
    kernel launch is Python, so a float64 gradcheck or a saved-memory count costs seconds to tens of seconds).
    The fast tier still runs every Triton op against the reference at small shapes; the full suite runs these."""
    return [pytest.param(b, marks=pytest.mark.slow) if b == "triton" and INTERPRETED else b for b in backends]


def orth_model_spec(layers: int, rank: int, hidden: int, ffn: int) -> list[tuple[int, int, int]]:
    """(r1, r2, Din) of every layer's gate/up (Din = hidden) and down (Din = ffn) projections: the pairs a
    stage-2 model's orthogonality penalty sums over."""
    return [(rank, rank, d) for _ in range(layers) for d in (hidden, hidden, ffn)]


def orth_pairs(spec, dtype, device="cpu") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(a_base, a_orth): leaf A matrices, one pair per (r1, r2, Din) of `spec`."""
    a_base = [torch.randn(r1, d, dtype=dtype, device=device, requires_grad=True) for r1, _, d in spec]
    a_orth = [torch.randn(r2, d, dtype=dtype, device=device, requires_grad=True) for _, r2, d in spec]
    return a_base, a_orth


def molora_inputs(T, d_in, d_out, E, R, Rs, *, dtype=torch.float32, device="cpu", bias=True, router_bias=True,
                  lead=None, adapter_dtype=None):
    """Random inputs of realistic scale (B non-zero, unlike at init, so every gradient is exercised)."""
    adt = adapter_dtype or dtype
    shape = (T, d_in) if lead is None else (*lead, d_in)
    x = torch.randn(shape, dtype=dtype, device=device)
    w = torch.randn(d_out, d_in, dtype=dtype, device=device) / d_in**0.5
    b = torch.randn(d_out, dtype=dtype, device=device) if bias else None
    rw = torch.randn(E, d_in, dtype=torch.float32 if adt != torch.float64 else adt, device=device)
    rb = torch.randn(E, dtype=rw.dtype, device=device) if router_bias else None
    a = torch.randn(E * R + Rs, d_in, dtype=adt, device=device) / d_in**0.5
    bb = torch.randn(d_out, E * R + Rs, dtype=adt, device=device) / (E * R + Rs) ** 0.5
    return x, w, b, rw, rb, a, bb


def lora_inputs(T, d_in, d_out, R, *, dtype=torch.float32, device="cpu", bias=True, lead=None):
    shape = (T, d_in) if lead is None else (*lead, d_in)
    x = torch.randn(shape, dtype=dtype, device=device)
    w = torch.randn(d_out, d_in, dtype=dtype, device=device) / d_in**0.5
    b = torch.randn(d_out, dtype=dtype, device=device) if bias else None
    a = torch.randn(R, d_in, dtype=dtype, device=device) / d_in**0.5
    bb = torch.randn(d_out, R, dtype=dtype, device=device) / R**0.5
    return x, w, b, a, bb


def leaves(tensors, *, dtype=None, trainable=None):
    """Fresh leaf copies (optionally cast) with requires_grad on the positions in `trainable`."""
    out = []
    for i, t in enumerate(tensors):
        if t is None:
            out.append(None)
            continue
        c = t.detach().clone() if dtype is None else t.detach().to(dtype)
        out.append(c.requires_grad_(trainable is None or i in trainable))
    return out


def run_with_grads(fn, inputs, grad_out=None, seed=1234):
    """Call fn(*inputs), backprop a fixed random upstream gradient; return (y, [grad per input], grad_out).
    fn may return a tuple of outputs (molora_gate_up): grad_out is then a tuple, one per output."""
    torch.manual_seed(seed)
    y = fn(*inputs)
    ys = tuple(y) if isinstance(y, (tuple, list)) else (y,)
    if grad_out is None:
        gen = torch.Generator().manual_seed(7)
        grad_out = tuple(torch.randn(t.shape, dtype=torch.float64, generator=gen) for t in ys)
        grad_out = grad_out if isinstance(y, (tuple, list)) else grad_out[0]
    gs = tuple(grad_out) if isinstance(y, (tuple, list)) else (grad_out,)
    torch.autograd.backward(ys, [g.to(device=t.device, dtype=t.dtype) for g, t in zip(gs, ys)])
    grads = [None if t is None or t.grad is None else t.grad for t in inputs]
    return y, grads, grad_out


def max_err(a: torch.Tensor, truth: torch.Tensor) -> float:
    return (a.double() - truth.double()).abs().max().item() if a.numel() else 0.0


def assert_within_rule(name: str, fused: torch.Tensor, same_dtype_ref, truth: torch.Tensor):
    """docs/design.md §5: the fused error is at most 2x the same-dtype PyTorch error against float64, plus one ulp
    of the output's scale (so exact reference results do not demand exact fused results).

    `same_dtype_ref` may be a tuple of equally valid same-dtype evaluations (e.g. with the reduction order
    reversed): the reference error is then their largest, so one evaluation's lucky rounding does not set the
    bar (seen at T=1, where the router gradient cancels and one summation order happened to land 20x closer)."""
    refs = same_dtype_ref if isinstance(same_dtype_ref, (tuple, list)) else (same_dtype_ref,)
    assert fused.shape == truth.shape, f"{name}: shape {tuple(fused.shape)} != {tuple(truth.shape)}"
    assert fused.dtype == refs[0].dtype, f"{name}: dtype {fused.dtype} != {refs[0].dtype}"
    assert torch.isfinite(fused).all(), f"{name}: non-finite values"
    eps = torch.finfo(fused.dtype).eps
    scale = truth.abs().max().item() if truth.numel() else 0.0
    err, ref_err = max_err(fused, truth), max(max_err(r, truth) for r in refs)
    bound = 2.0 * ref_err + eps * scale
    assert err <= bound, f"{name}: error {err:.3e} > 2 x reference error {ref_err:.3e} + 1 ulp ({bound:.3e})"


def reversed_reduction(inputs, din_positions):
    """The same inputs with the Din axis reversed in the tensors at `din_positions` (last axis): the result is
    mathematically identical, but every reduction over Din runs in another order."""
    out = []
    for i, t in enumerate(inputs):
        if t is not None and i in din_positions:
            t = t.detach().flip(-1).requires_grad_(t.requires_grad)
        out.append(t)
    return out


def unreverse(grads, din_positions):
    return [g.flip(-1) if (g is not None and i in din_positions) else g for i, g in enumerate(grads)]


# molora_linear's arguments: their names, the ones that train, and the ones with a Din axis.
MOLORA_NAMES = ("x", "weight", "bias", "router_weight", "router_bias", "lora_a", "lora_b")
MOLORA_TRAINABLE = (0, 3, 4, 5, 6)   # weight and bias stay frozen, as in training
MOLORA_DIN_POSITIONS = (0, 1, 3, 5)  # x, weight, router_weight, lora_a


def assert_matches_reference(fused, ref, base, *, dtype, trainable, din_positions, names, out_names=("y",)):
    """docs/design.md §5 on y and every trainable gradient: `fused` on `base` cast to `dtype` against the same-dtype
    reference (also with the Din reductions reversed) and the float64 reference. Returns fused's gradients.
    With several out_names, fused and ref return that many outputs and each is held to the rule."""
    y, grads, g = run_with_grads(fused, leaves(base, dtype=dtype, trainable=trainable))
    y_ref, grads_ref, _ = run_with_grads(ref, leaves(base, dtype=dtype, trainable=trainable), g)
    rev_in = reversed_reduction(leaves(base, dtype=dtype, trainable=trainable), din_positions)
    y_rev, grads_rev, _ = run_with_grads(ref, rev_in, g)
    grads_rev = unreverse(grads_rev, din_positions)
    y_true, grads_true, _ = run_with_grads(ref, leaves(base, trainable=trainable), g)
    if len(out_names) == 1:
        y, y_ref, y_rev, y_true = (y,), (y_ref,), (y_rev,), (y_true,)
    for k, name in enumerate(out_names):
        assert_within_rule(name, y[k], (y_ref[k], y_rev[k]), y_true[k])
    for i in trainable:
        assert_within_rule(f"d {names[i]}", grads[i], (grads_ref[i], grads_rev[i]), grads_true[i])
    return grads


def assert_compiled_matches_eager(loss, base, trainable, *, rtol, atol):
    """loss(*inputs) eager and under torch.compile(fullgraph=True) on the Triton backend: the same gradients."""
    eager_in, comp_in = leaves(base, trainable=trainable), leaves(base, trainable=trainable)
    with mk.use_backend("triton"):
        loss(*eager_in).backward()
        torch.compile(loss, fullgraph=True)(*comp_in).backward()
    for i in trainable:
        torch.testing.assert_close(comp_in[i].grad, eager_in[i].grad, rtol=rtol, atol=atol)


def call_backend(backend: str, fn, *args, **kwargs):
    with mk.use_backend(backend):
        return fn(*args, **kwargs)


# molora_gate_up's arguments flattened: x, then gate's and up's (weight, bias, router_weight, router_bias, lora_a,
# lora_b); `gate_up_call` turns a function of the 13 tensors into the op's (x, gate, up) call.
GATE_UP_NAMES = ("x", *(f"gate.{n}" for n in MOLORA_NAMES[1:]), *(f"up.{n}" for n in MOLORA_NAMES[1:]))
GATE_UP_TRAINABLE = (0, 3, 4, 5, 6, 9, 10, 11, 12)
GATE_UP_DIN_POSITIONS = (0, 1, 3, 5, 7, 9, 11)


def gate_up_inputs(T, d_in, d_out, E, R, rs_gate, rs_up, **kw):
    """x and two MoLoRA projections of it (same E and R; the shared ranks may differ), flattened to 13 tensors."""
    x, *gate = molora_inputs(T, d_in, d_out, E, R, rs_gate, **kw)
    _, *up = molora_inputs(T, d_in, d_out, E, R, rs_up, **kw)
    return [x, *gate, *up]


def gate_up_call(fn, **kw):
    """f(*13 tensors) = fn(x, gate, up, **kw): molora_gate_up's signature for run_with_grads and friends."""
    return lambda *t: fn(t[0], t[1:7], t[7:13], **kw)


@contextlib.contextmanager
def reference_draws_triton_mask(torch_seed: int):
    """Inside, medcare_kernels.reference drops the elements the Triton backend drops when its op runs right after
    torch.manual_seed(torch_seed): that backend regenerates a Philox mask from a seed it draws with the generator
    of x's device (ops/_triton_dropout.py), not the torch backend's reference.dropout_keep_mask draw."""
    from medcare_kernels.ops import _triton_dropout

    def keep(x, p):
        if p == 0.0:
            return None
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            torch.manual_seed(torch_seed)
            seed = _triton_dropout.draw_seed(x.device)
        din = x.shape[-1]
        return _triton_dropout.keep_mask(seed, x.numel() // max(din, 1), din, p, x.device).reshape(x.shape)

    with mock.patch.object(reference, "dropout_keep_mask", keep):
        yield


def rng_after_one_draw(backend: str, torch_seed: int, reference_fn) -> torch.Tensor:
    """The CPU generator's state after one dropout draw of `backend` right after torch.manual_seed(torch_seed):
    the Triton ops draw one seed (their backward regenerates the mask from it); the torch backend draws what
    `reference_fn()` (a reference call) draws, its backward redrawing from a saved state."""
    from medcare_kernels.ops import _triton_dropout

    torch.manual_seed(torch_seed)
    if backend == "triton":
        _triton_dropout.draw_seed(torch.device("cpu"))
    else:
        reference_fn()
    return torch.get_rng_state()


def maybe_triton_mask(backend: str, torch_seed: int):
    """reference_draws_triton_mask for the Triton backend, nothing for the others (they draw as the reference)."""
    return reference_draws_triton_mask(torch_seed) if backend == "triton" else contextlib.nullcontext()
