"""The training loss head: the LM loss at supervised positions only, a chunk at a time, never the logits of
all tokens (medcare_kernels.linear_cross_entropy).

A Hugging Face causal LM computes logits [batch, length, vocab] at every position and upcasts them to float32
before its loss: with Qwen's 151,936-token vocabulary, batch 4 x 2048 is 5 GB of logits and as much again for
their gradient, while assistant-only labels supervise only some positions. `install(model)` changes, on the
instance (never the class):

    model.lm_head        -> ChunkedLMHead: the same weight (and bias) Parameter, so tied embeddings stay tied
                            and FSDP / DeepSpeed ZeRO-3 gather it for this module's forward and backward.
    model.loss_function  -> passes the head's loss through (any other logits go to the model's own loss).
    a forward pre-hook   -> a training-mode forward called with `labels=` hands them to the head.

In training mode a forward with labels then returns the loss as `loss` (and, in place of logits, the 0-d
sum it was divided from: no logits are computed). Without labels, or in eval mode, the head computes plain logits, so
generation and evaluation are unchanged. The loss is exactly the model's: the labels are shifted as the
model shifts them, the sum over supervised positions is divided by num_items_in_batch when the Trainer
passes it, else by their count (ForCausalLMLoss).

Only architectures whose forward is `logits = lm_head(hidden)` then `loss_function(logits, labels, ...)`
with nothing in between (no soft-capping, no logit scaling) take the head (SUPPORTED); others keep theirs.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

import medcare_kernels as mk

IGNORE_INDEX = -100
# Forward checked to be `logits = self.lm_head(hidden)` followed by `self.loss_function(logits, labels, ...)`.
SUPPORTED = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")
_SCALED = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class ChunkedLMHead(nn.Module):
    """The model's lm_head (same Parameters): plain logits, or the chunked loss when labels were handed in."""

    def __init__(self, lm_head: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = lm_head.in_features, lm_head.out_features
        self.weight = lm_head.weight
        self.bias = lm_head.bias
        self.labels: torch.Tensor | None = None  # set by the model's forward pre-hook, taken by forward
        self.count: torch.Tensor | None = None  # supervised positions of the loss sum forward just returned

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        labels, self.labels = self.labels, None
        if labels is None or tuple(labels.shape) != tuple(hidden.shape[:-1]):
            return F.linear(hidden, self.weight, self.bias)
        targets = F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX).to(hidden.device)  # position t predicts t+1
        with _backend_with_this_op(hidden.device):
            total = mk.linear_cross_entropy(hidden, self.weight, self.bias, targets, ignore_index=IGNORE_INDEX,
                                            reduction="sum")
        self.count = (targets != IGNORE_INDEX).sum()
        return total

    def take(self, logits) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(sum, count) when `logits` is the loss this head just returned, else None; forgets it either way.
        The sum is `logits` itself, not the tensor forward returned: DeepSpeed ZeRO-3 passes module outputs
        through an autograd Function of its own (to gather the parameters again for backward), so the model
        may hold a new 0-d tensor, and the loss must be built from that one."""
        mine = self.count is not None and torch.is_tensor(logits) and logits.dim() == 0
        found = (logits, self.count) if mine else None
        self.count = None
        return found


def _backend_with_this_op(device: torch.device):
    """The chosen kernel backend, or torch when an explicitly chosen one has no linear_cross_entropy."""
    try:
        mk.resolved_backend("linear_cross_entropy", device)
    except mk.BackendUnavailableError:
        return mk.use_backend("torch")
    return contextlib.nullcontext()


class _PassThroughLoss:
    """model.loss_function: the head's loss divided as ForCausalLMLoss divides; other logits go to `original`."""

    def __init__(self, head: ChunkedLMHead, original):
        self.head, self.original = head, original

    def __call__(self, logits, labels, vocab_size: int, num_items_in_batch=None, ignore_index: int = IGNORE_INDEX,
                 shift_labels=None, **kwargs):
        found = self.head.take(logits)
        if found is None:
            return self.original(logits=logits, labels=labels, vocab_size=vocab_size,
                                 num_items_in_batch=num_items_in_batch, ignore_index=ignore_index,
                                 shift_labels=shift_labels, **kwargs)
        total, count = found
        if num_items_in_batch is None:
            return total / count
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch


def _hand_labels_to_head(head: ChunkedLMHead):
    def hook(module, args, kwargs):
        labels, keep = kwargs.get("labels"), kwargs.get("logits_to_keep", 0)
        all_positions = keep is None or (isinstance(keep, int) and keep == 0)
        head.labels = labels if (module.training and labels is not None and all_positions
                                 and kwargs.get("shift_labels") is None) else None
        head.count = None
    return hook


def unsupported(model) -> str | None:
    """Why the chunked head would not compute this model's own loss exactly, or None when it would."""
    name = type(model).__name__
    if name not in SUPPORTED:
        return f"{name} is not one of the architectures it is checked on ({', '.join(SUPPORTED)})"
    if type(getattr(model, "lm_head", None)) is not nn.Linear:
        return f"{name}.lm_head is {type(getattr(model, 'lm_head', None)).__name__}, not nn.Linear"
    scaled = [k for k in _SCALED if getattr(model.config, k, None) not in (None, 1, 1.0)]
    if scaled:
        return f"its config scales the logits ({', '.join(scaled)})"
    return None


class Installed:
    """What install() changed; remove() puts the model's own head and loss back."""

    def __init__(self, model, head: ChunkedLMHead, original_head: nn.Linear, loss_fn: _PassThroughLoss,
                 had_loss_function: bool, handle):
        self.model, self.head, self._original, self._loss_fn = model, head, original_head, loss_fn
        self._had_loss_function, self._handle = had_loss_function, handle

    def remove(self) -> None:
        self._handle.remove()
        self.model.lm_head = self._original
        if self._had_loss_function:
            self.model.loss_function = self._loss_fn.original
        else:
            del self.model._loss_function


def install(model) -> Installed:
    """Give `model` the chunked loss head (see the module docstring); raises ValueError naming why not."""
    why = unsupported(model)
    if why:
        raise ValueError(f"the chunked loss head does not apply: {why}")
    original = model.lm_head
    head = ChunkedLMHead(original)
    had = "_loss_function" in vars(model)
    loss_fn = _PassThroughLoss(head, model.loss_function)
    model.lm_head = head
    model.loss_function = loss_fn
    handle = model.register_forward_pre_hook(_hand_labels_to_head(head), with_kwargs=True)
    return Installed(model, head, original, loss_fn, had, handle)
