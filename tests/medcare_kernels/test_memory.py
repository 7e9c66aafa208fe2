"""Memory properties (not timings): what autograd keeps alive between forward and backward."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import (
    GATE_UP_TRAINABLE,
    backends_for,
    call_backend,
    gate_up_call,
    gate_up_inputs,
    leaves,
    lora_inputs,
    molora_inputs,
    slow_under_interpreter,
)

import medcare_kernels as mk


def saved_bytes_beyond_inputs(fn, inputs) -> tuple[int, int]:
    """(bytes autograd saves for backward that are not the inputs themselves, number of saved tensors).
    Storages are counted once, however many views of them are saved."""
    input_ptrs = {t.untyped_storage().data_ptr() for t in inputs if t is not None}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in input_ptrs:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(seen.values()), len(seen)


@pytest.mark.parametrize("backend", slow_under_interpreter(backends_for("molora_linear")))
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_molora_saves_only_low_rank_activations_beyond_x(backend, dropout):
    T, d_in, d_out, E, K, R, Rs = 256, 256, 512, 8, 2, 4, 8
    inputs = leaves(molora_inputs(T, d_in, d_out, E, R, Rs), trainable=(0, 3, 4, 5, 6))
    kw = dict(num_experts=E, top_k=K, expert_rank=R, scaling=2.0, dropout=dropout)
    extra, _ = saved_bytes_beyond_inputs(lambda *t: call_backend(backend, mk.molora_linear, *t, **kw), inputs)
    elt = 4
    # h [T, E*R+Rs] plus router state [T, E] (probs) and [T, K] (indices): O(T*(E*R+Rs)).
    budget = T * (E * R + Rs) * elt + T * E * 4 + T * K * 8 + 16 * 1024
    assert extra <= budget, f"saved {extra} B beyond the inputs, budget {budget} B"
    assert extra < T * E * d_out * elt / 10, "something of size T*E*Dout is being kept"
    assert extra < T * d_in * elt, "a copy of x (e.g. a dropout mask or dropped-out x) is being kept"


@pytest.mark.parametrize("backend", slow_under_interpreter(backends_for("molora_gate_up")))
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_molora_gate_up_saves_x_once_and_low_rank_activations(backend, dropout):
    T, d_in, d_out, E, K, R, Rs = 256, 256, 512, 8, 2, 4, 8
    inputs = leaves(gate_up_inputs(T, d_in, d_out, E, R, Rs, Rs), trainable=GATE_UP_TRAINABLE)
    kw = dict(num_experts=E, top_k=K, expert_rank=R, scaling=2.0, dropout=dropout)
    fn = gate_up_call(lambda *a, **k: call_backend(backend, mk.molora_gate_up, *a, **k), **kw)
    extra, _ = saved_bytes_beyond_inputs(fn, inputs)
    elt = 4
    # Per projection h [T, E*R+Rs], probs [T, E] fp32, indices [T, K]; x itself is the caller's (never copied).
    budget = 2 * (T * (E * R + Rs) * elt + T * E * 4 + T * K * 8) + 16 * 1024
    assert extra <= budget, f"saved {extra} B beyond the inputs, budget {budget} B"
    assert extra < T * d_in * elt, "a copy of x (e.g. a dropout mask or dropped-out x) is being kept"


@pytest.mark.parametrize("backend", slow_under_interpreter(backends_for("lora_linear")))
def test_lora_saves_only_the_low_rank_activation_beyond_x(backend):
    T, d_in, d_out, R = 256, 256, 512, 16
    inputs = leaves(lora_inputs(T, d_in, d_out, R), trainable=(0, 3, 4))
    extra, _ = saved_bytes_beyond_inputs(
        lambda *t: call_backend(backend, mk.lora_linear, *t, scaling=2.0, dropout=0.05), inputs)
    assert extra <= T * R * 4 + 16 * 1024, f"saved {extra} B beyond the inputs"


def test_reference_keeps_more_than_the_torch_backend():
    """The counter sees real differences: the reference keeps expert-width temporaries the backend does not."""
    T, d_in, d_out, E, K, R, Rs = 128, 32, 256, 8, 2, 4, 8
    inputs = leaves(molora_inputs(T, d_in, d_out, E, R, Rs), trainable=(0, 3, 4, 5, 6))
    kw = dict(num_experts=E, top_k=K, expert_rank=R, scaling=2.0)
    ref, _ = saved_bytes_beyond_inputs(lambda *t: mk.reference.molora_linear(*t, **kw), inputs)
    ours, _ = saved_bytes_beyond_inputs(lambda *t: call_backend("torch", mk.molora_linear, *t, **kw), inputs)
    assert ours < ref
