"""Bad calls raise ValueError naming the argument and the expected shape, before any kernel runs."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import lora_inputs, molora_inputs

import medcare_kernels as mk

KW = dict(num_experts=4, top_k=2, expert_rank=3, scaling=2.0)


def _molora(**changes):
    args = dict(zip(("x", "weight", "bias", "router_weight", "router_bias", "lora_a", "lora_b"),
                    molora_inputs(5, 10, 7, 4, 3, 2)))
    kw = dict(KW)
    for k, v in changes.items():
        (kw if k in kw or k == "dropout" else args)[k] = v
    return mk.molora_linear(*args.values(), **kw)


MOLORA_BAD = {
    "x last dim": (dict(x=torch.randn(5, 11)), r"x must have shape \[\.\.\., Din\] with Din = weight.shape\[1\] = 10"),
    "x dtype": (dict(x=torch.ones(5, 10, dtype=torch.int64)), r"x must be float16, bfloat16, float32 or float64"),
    "x not tensor": (dict(x=[[1.0] * 10]), r"x must be a torch.Tensor, got list"),
    "weight 1-D": (dict(weight=torch.randn(70)), r"weight must be 2-D \[Dout, Din\], got \[70\]"),
    "bias": (dict(bias=torch.randn(8)), r"bias must have shape \[Dout\] = \[7\], got \[8\]"),
    "router_weight": (dict(router_weight=torch.randn(5, 10)),
                      r"router_weight must have shape \[num_experts, Din\] = \[4, 10\], got \[5, 10\]"),
    "router_bias": (dict(router_bias=torch.randn(3)), r"router_bias must have shape \[num_experts\] = \[4\]"),
    "lora_a too few rows": (dict(lora_a=torch.randn(11, 10)),
                            r"lora_a must have shape \[num_experts\*expert_rank \+ shared_rank, Din\] = "
                            r"\[4\*3 \+ Rs \(Rs >= 0\), 10\], got \[11, 10\]"),
    "lora_a Din": (dict(lora_a=torch.randn(14, 9)), r"lora_a must have shape .* got \[14, 9\]"),
    "lora_b": (dict(lora_b=torch.randn(7, 13)),
               r"lora_b must have shape \[Dout, num_experts\*expert_rank \+ shared_rank\] = \[7, 14\], got \[7, 13\]"),
    "top_k > E": (dict(top_k=5), r"top_k must be <= num_experts = 4, got 5"),
    "top_k 0": (dict(top_k=0), r"top_k must be an int >= 1, got 0"),
    "num_experts float": (dict(num_experts=4.0), r"num_experts must be an int >= 1, got 4.0"),
    "expert_rank": (dict(expert_rank=-1), r"expert_rank must be an int >= 1"),
    "scaling nan": (dict(scaling=float("nan")), r"scaling must be a finite float, got nan"),
    "dropout 1": (dict(dropout=1.0), r"dropout must be a float in \[0, 1\), got 1.0"),
    "device": (dict(lora_b=torch.randn(7, 14, device="meta")), r"lora_b is on meta but x is on cpu"),
}


@pytest.mark.parametrize("case", list(MOLORA_BAD), ids=list(MOLORA_BAD))
def test_molora_bad_arguments(case):
    changes, pattern = MOLORA_BAD[case]
    with pytest.raises(ValueError, match=r"^molora_linear: " + pattern):
        _molora(**changes)


def _gate_up(**changes):
    """molora_gate_up with one change: a keyword, or "gate"/"up" -> {index: replacement} for that projection."""
    x, *t = molora_inputs(5, 10, 7, 4, 3, 2)
    gate, up = list(t), [u.clone() if u is not None else None for u in t]
    kw = dict(KW)
    for k, v in changes.items():
        if k in ("gate", "up"):
            target = gate if k == "gate" else up
            if isinstance(v, dict):
                for i, r in v.items():
                    target[i] = r
            else:
                gate, up = (v, up) if k == "gate" else (gate, v)
        elif k == "x":
            x = v
        else:
            kw[k] = v
    return mk.molora_gate_up(x, gate, up, **kw)


GATE_UP_BAD = {
    "up lora_a rows": (dict(up={4: torch.randn(11, 10)}),
                       r"up\[4\] \(lora_a\) must have shape \[num_experts\*expert_rank \+ shared_rank, Din\] = "
                       r"\[4\*3 \+ Rs \(Rs >= 0\), 10\], got \[11, 10\]"),
    "gate router_weight": (dict(gate={2: torch.randn(5, 10)}),
                           r"gate\[2\] \(router_weight\) must have shape \[num_experts, Din\] = \[4, 10\]"),
    "up bias": (dict(up={1: torch.randn(8)}), r"up\[1\] \(bias\) must have shape \[Dout\] = \[7\], got \[8\]"),
    "up Din": (dict(up={0: torch.randn(7, 11)}),
               r"up\[0\] \(weight\) must have shape \[Dout, Din\] with Din = gate\[0\] \(weight\).shape\[1\] = 10 "
               r"\(gate and up read the same x\), got \[7, 11\]"),
    "x Din": (dict(x=torch.randn(5, 11)),
              r"x must have shape \[\.\.\., Din\] with Din = gate\[0\] \(weight\).shape\[1\] = 10, got \[5, 11\]"),
    "dtype": (dict(up={5: torch.randn(7, 14, dtype=torch.float64)}),
              r"up\[5\] \(lora_b\) is torch.float64 but gate\[5\] \(lora_b\) is torch.float32; gate and up must"),
    "device": (dict(up={5: torch.randn(7, 14, device="meta")}), r"up\[5\] \(lora_b\) is on meta but x is on cpu"),
    "up not a tuple": (dict(up=torch.randn(3)), r"up must be a tuple \(weight, bias, router_weight, router_bias, "
                                                r"lora_a, lora_b\), got Tensor"),
    "gate too short": (dict(gate=(torch.randn(7, 10),)), r"gate must be a tuple .*, got 1 items"),
    "top_k": (dict(top_k=5), r"top_k must be <= num_experts = 4, got 5"),
    "dropout": (dict(dropout=1.0), r"dropout must be a float in \[0, 1\), got 1.0"),
}


@pytest.mark.parametrize("case", list(GATE_UP_BAD), ids=list(GATE_UP_BAD))
def test_molora_gate_up_bad_arguments(case):
    changes, pattern = GATE_UP_BAD[case]
    with pytest.raises(ValueError, match=r"^molora_gate_up: " + pattern):
        _gate_up(**changes)


def test_lora_bad_arguments():
    x, w, b, a, bb = lora_inputs(4, 8, 6, 2)
    with pytest.raises(ValueError, match=r"lora_a must have shape \[R, Din\] = \[R, 8\], got \[2, 9\]"):
        mk.lora_linear(x, w, b, torch.randn(2, 9), bb, scaling=1.0)
    with pytest.raises(ValueError, match=r"lora_b must have shape \[Dout, R\] = \[6, 2\], got \[6, 3\]"):
        mk.lora_linear(x, w, b, a, torch.randn(6, 3), scaling=1.0)
    with pytest.raises(ValueError, match=r"^lora_linear: x must have at least one dimension"):
        mk.lora_linear(torch.tensor(1.0), w, b, a, bb, scaling=1.0)
    with pytest.raises(ValueError, match=r"^lora_linear: dropout must be a float in \[0, 1\), got -0.1"):
        mk.lora_linear(x, w, b, a, bb, scaling=1.0, dropout=-0.1)


def test_route_topk_bad_arguments():
    with pytest.raises(ValueError, match=r"^route_topk: top_k must be <= E = logits.shape\[-1\] = 4, got 5"):
        mk.route_topk(torch.randn(3, 4), 5)
    with pytest.raises(ValueError, match=r"^route_topk: logits must be float16, bfloat16, float32 or float64"):
        mk.route_topk(torch.ones(3, 4, dtype=torch.int32), 1)
    with pytest.raises(ValueError, match=r"^route_topk: logits must have shape \[\.\.\., E\] with E >= 1"):
        mk.route_topk(torch.randn(3, 0), 1)


def test_orth_penalty_bad_arguments():
    a = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"^orth_penalty: a_base and a_orth must pair up, got 2 and 1 tensors"):
        mk.orth_penalty([a, a], [a])
    with pytest.raises(ValueError, match=r"a_orth\[0\] must have shape \[R2, Din\] = \[R2, 8\] \(the Din of a_base"):
        mk.orth_penalty([a], [torch.randn(4, 9)])
    with pytest.raises(ValueError, match=r"^orth_penalty: a_base must be a sequence"):
        mk.orth_penalty(a, [a])
    with pytest.raises(ValueError, match=r"^orth_penalty: a_base and a_orth are empty"):
        mk.orth_penalty([], [])
    with pytest.raises(ValueError, match=r"a_base\[1\] must be 2-D \[R1, Din\], got \[8\]"):
        mk.orth_penalty([a, torch.randn(8)], [a, a])
