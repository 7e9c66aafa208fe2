"""Argument checks shared by every backend: each failure is a ValueError naming the argument and the
expected shape, raised before any kernel runs (a fused kernel must never see an out-of-bounds shape)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _fail(op: str, msg: str):
    raise ValueError(f"{op}: {msg}")


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(d) for d in t.shape) + "]"


def _tensor(op: str, name: str, t, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        _fail(op, f"{name} must be a torch.Tensor{' or None' if optional else ''}, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        _fail(op, f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _expect(op: str, name: str, t, expected: tuple[int, ...], what: str) -> None:
    if t is not None and tuple(t.shape) != expected:
        want = "[" + ", ".join(str(d) for d in expected) + "]"
        _fail(op, f"{name} must have shape {what} = {want}, got {_shape(t)}")


def _same_device(op: str, named: dict) -> None:
    ref_name, ref = next(iter(named.items()))
    for name, t in named.items():
        if t is not None and t.device != ref.device:
            _fail(op, f"{name} is on {t.device} but {ref_name} is on {ref.device}; all tensors must share a device")


def _positive_int(op: str, name: str, v, minimum: int = 1) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        _fail(op, f"{name} must be an int >= {minimum}, got {v!r}")


def _scalars(op: str, scaling, dropout) -> None:
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        _fail(op, f"scaling must be a finite float, got {scaling!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        _fail(op, f"dropout must be a float in [0, 1), got {dropout!r}")


def _linear_args(op: str, x, weight, bias, names: Sequence[str] = ("x", "weight", "bias")) -> tuple[int, int]:
    nx, nw, nb = names
    _tensor(op, nx, x)
    _tensor(op, nw, weight)
    _tensor(op, nb, bias, optional=True)
    if x.dim() < 1:
        _fail(op, f"{nx} must have at least one dimension [..., Din], got a 0-d tensor")
    if weight.dim() != 2:
        _fail(op, f"{nw} must be 2-D [Dout, Din], got {_shape(weight)}")
    d_out, d_in = weight.shape
    if x.shape[-1] != d_in:
        _fail(op, f"{nx} must have shape [..., Din] with Din = {nw}.shape[1] = {d_in}, got {_shape(x)}")
    _expect(op, nb, bias, (d_out,), "[Dout]")
    return d_in, d_out


def check_lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout) -> None:
    op = "lora_linear"
    d_in, d_out = _linear_args(op, x, weight, bias)
    _tensor(op, "lora_a", lora_a)
    _tensor(op, "lora_b", lora_b)
    if lora_a.dim() != 2 or lora_a.shape[1] != d_in:
        _fail(op, f"lora_a must have shape [R, Din] = [R, {d_in}], got {_shape(lora_a)}")
    _expect(op, "lora_b", lora_b, (d_out, lora_a.shape[0]), "[Dout, R]")
    _scalars(op, scaling, dropout)
    _same_device(op, {"x": x, "weight": weight, "bias": bias, "lora_a": lora_a, "lora_b": lora_b})


MOLORA_ARGS = ("x", "weight", "bias", "router_weight", "router_bias", "lora_a", "lora_b")


def check_molora_linear(x, weight, bias, router_weight, router_bias, lora_a, lora_b, num_experts, top_k,
                        expert_rank, scaling, dropout) -> int:
    """Validate a molora_linear call and return the shared rank Rs = lora_a.shape[0] - E*R."""
    return _molora_args("molora_linear", MOLORA_ARGS, x, weight, bias, router_weight, router_bias, lora_a, lora_b,
                        num_experts, top_k, expert_rank, scaling, dropout)


def _molora_args(op, names, x, weight, bias, router_weight, router_bias, lora_a, lora_b, num_experts, top_k,
                 expert_rank, scaling, dropout) -> int:
    """One MoLoRA projection's checks, each message naming the argument by `names` (MOLORA_ARGS' order)."""
    nx, nw, nb, nrw, nrb, na, nlb = names
    d_in, d_out = _linear_args(op, x, weight, bias, (nx, nw, nb))
    _positive_int(op, "num_experts", num_experts)
    _positive_int(op, "top_k", top_k)
    _positive_int(op, "expert_rank", expert_rank)
    if top_k > num_experts:
        _fail(op, f"top_k must be <= num_experts = {num_experts}, got {top_k}")
    _tensor(op, nrw, router_weight)
    _tensor(op, na, lora_a)
    _tensor(op, nlb, lora_b)
    _tensor(op, nrb, router_bias, optional=True)
    e, r = num_experts, expert_rank
    _expect(op, nrw, router_weight, (e, d_in), "[num_experts, Din]")
    _expect(op, nrb, router_bias, (e,), "[num_experts]")
    if lora_a.dim() != 2 or lora_a.shape[1] != d_in or lora_a.shape[0] < e * r:
        _fail(op, f"{na} must have shape [num_experts*expert_rank + shared_rank, Din] = "
                  f"[{e}*{r} + Rs (Rs >= 0), {d_in}], got {_shape(lora_a)}")
    _expect(op, nlb, lora_b, (d_out, lora_a.shape[0]), "[Dout, num_experts*expert_rank + shared_rank]")
    _scalars(op, scaling, dropout)
    _same_device(op, dict(zip(names, (x, weight, bias, router_weight, router_bias, lora_a, lora_b), strict=True)))
    return lora_a.shape[0] - e * r


def check_molora_gate_up(x, gate, up, num_experts, top_k, expert_rank, scaling, dropout) -> None:
    """gate and up are each molora_linear's (weight, bias, router_weight, router_bias, lora_a, lora_b); they
    read the same x, so they must share its Din and device (each projection's tensors are checked against x),
    and they must store each tensor in the same dtype."""
    op = "molora_gate_up"
    for name, proj in (("gate", gate), ("up", up)):
        if isinstance(proj, torch.Tensor) or not isinstance(proj, Sequence) or len(proj) != 6:
            got = f"{len(proj)} items" if isinstance(proj, Sequence) and not isinstance(proj, torch.Tensor) else \
                type(proj).__name__
            _fail(op, f"{name} must be a tuple (weight, bias, router_weight, router_bias, lora_a, lora_b), got {got}")
    names = {p: ("x",) + tuple(f"{p}[{i}] ({n})" for i, n in enumerate(MOLORA_ARGS[1:])) for p in ("gate", "up")}
    _molora_args(op, names["gate"], x, *gate, num_experts, top_k, expert_rank, scaling, dropout)
    w_g, w_u = gate[0], up[0]
    _tensor(op, names["up"][1], w_u)
    if w_u.dim() == 2 and w_u.shape[1] != w_g.shape[1]:
        _fail(op, f"{names['up'][1]} must have shape [Dout, Din] with Din = gate[0] (weight).shape[1] = "
                  f"{w_g.shape[1]} (gate and up read the same x), got {_shape(w_u)}")
    _molora_args(op, names["up"], x, *up, num_experts, top_k, expert_rank, scaling, dropout)
    for i, (g, u) in enumerate(zip(gate, up, strict=True)):
        if g is not None and u is not None and g.dtype != u.dtype:
            _fail(op, f"{names['up'][i + 1]} is {u.dtype} but {names['gate'][i + 1]} is {g.dtype}; gate and up "
                      f"must store each tensor in the same dtype")


def check_route_topk(logits, top_k) -> None:
    op = "route_topk"
    _tensor(op, "logits", logits)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        _fail(op, f"logits must have shape [..., E] with E >= 1, got {_shape(logits)}")
    _positive_int(op, "top_k", top_k)
    if top_k > logits.shape[-1]:
        _fail(op, f"top_k must be <= E = logits.shape[-1] = {logits.shape[-1]}, got {top_k}")


def _pairs_look_valid(a_base: Sequence, a_orth: Sequence) -> bool:
    """Every check of the loop in check_orth_penalty, without building a message per tensor (the penalty is
    called every step over ~170 tensors, and this runs before a kernel of a few dozen microseconds)."""
    dev = a_base[0].device if isinstance(a_base[0], torch.Tensor) else None
    return all(isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype in _FLOATS
               and b.dtype in _FLOATS and a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[1]
               and a.device == dev and b.device == dev for a, b in zip(a_base, a_orth, strict=True))


def check_orth_penalty(a_base: Sequence, a_orth: Sequence) -> None:
    op = "orth_penalty"
    for name, seq in (("a_base", a_base), ("a_orth", a_orth)):
        if isinstance(seq, torch.Tensor) or not isinstance(seq, Sequence):
            _fail(op, f"{name} must be a sequence (list or tuple) of 2-D tensors, got {type(seq).__name__}")
    if len(a_base) != len(a_orth):
        _fail(op, f"a_base and a_orth must pair up, got {len(a_base)} and {len(a_orth)} tensors")
    if not a_base:
        _fail(op, "a_base and a_orth are empty; expected at least one (A_base, A_orth) pair")
    if _pairs_look_valid(a_base, a_orth):
        return  # the common case in one cheap pass; the loop below finds and names what is wrong
    for i, (a, b) in enumerate(zip(a_base, a_orth, strict=True)):
        _tensor(op, f"a_base[{i}]", a)
        _tensor(op, f"a_orth[{i}]", b)
        if a.dim() != 2:
            _fail(op, f"a_base[{i}] must be 2-D [R1, Din], got {_shape(a)}")
        if b.dim() != 2 or b.shape[1] != a.shape[1]:
            _fail(op, f"a_orth[{i}] must have shape [R2, Din] = [R2, {a.shape[1]}] (the Din of a_base[{i}]), "
                      f"got {_shape(b)}")
        if a.device != a_base[0].device or b.device != a_base[0].device:
            _fail(op, f"pair {i} is on {a.device}/{b.device} but a_base[0] is on {a_base[0].device}; "
                      f"all tensors must share a device")


def check_linear_cross_entropy(x, weight, bias, labels, ignore_index, reduction, chunk_size) -> None:
    op = "linear_cross_entropy"
    _linear_args(op, x, weight, bias)
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64:
        _fail(op, f"labels must be an int64 tensor, got {getattr(labels, 'dtype', type(labels).__name__)}")
    if tuple(labels.shape) != tuple(x.shape[:-1]):
        _fail(op, f"labels must have x's leading shape {list(x.shape[:-1])}, got {_shape(labels)}")
    _same_device(op, {"x": x, "weight": weight, "bias": bias, "labels": labels})
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        _fail(op, f"ignore_index must be an int, got {ignore_index!r}")
    if reduction not in ("mean", "sum"):
        _fail(op, f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if chunk_size is not None:
        _positive_int(op, "chunk_size", chunk_size)
