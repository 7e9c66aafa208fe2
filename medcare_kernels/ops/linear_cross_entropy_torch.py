"""linear_cross_entropy, torch backend: a language-model loss head that never holds the logits of all tokens.

Fused: the head GEMM, the float32 upcast, logsumexp and the pick of the label's logit, over the labelled rows
only (rows labelled ignore_index are dropped before any GEMM: with assistant-only labels that is about half
of them), a chunk of C rows at a time. Forward keeps per row only the logsumexp [N] (float32).

Saved for backward: the labelled rows of x [N, Din] (a gathered copy, smaller than the x the plain head
saves), their labels and logsumexp [N], and weight / bias (parameters: no copies). Backward recomputes each
chunk's logits and forms dlogits = g * (softmax - onehot) in float32, cast to x's dtype as autograd does for
the plain head, then dx_rows = dlogits W, dW += dlogits^T x_rows, db += sum(dlogits). Peak extra memory is one
chunk's [C, V] in float32 (plus its cast), never [T, V]: the chunk is sized by CHUNK_BYTES.

The logits of a chunk are exactly the plain head's (same GEMM in x's dtype, same upcast), so loss and
gradients agree with medcare_kernels.reference.linear_cross_entropy to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference import router_dtype

CHUNK_BYTES = 128 * 2**20  # float32 logits of one chunk: 220 rows of a 151,936-token vocabulary
MIN_CHUNK = 16


def chunk_rows(vocab: int, chunk_size: int | None = None) -> int:
    """Rows per chunk: chunk_size when given, else as many as keep one chunk's float32 logits in CHUNK_BYTES."""
    return chunk_size if chunk_size else max(MIN_CHUNK, CHUNK_BYTES // (4 * vocab))


def _chunk_logits(x_rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    acc = router_dtype(x_rows.dtype)
    return F.linear(x_rows, weight, bias).to(acc)


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, labels, ignore_index: int, mean: bool, chunk: int):
        # x [..., Din]; weight [V, Din] (x's dtype); bias [V] | None; labels [...] int64
        x2, lab = x.reshape(-1, x.shape[-1]), labels.reshape(-1)
        rows = (lab != ignore_index).nonzero().squeeze(1)
        x_rows, targets = x2.index_select(0, rows), lab.index_select(0, rows)
        n = rows.numel()
        if n and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
            raise ValueError(f"linear_cross_entropy: labels must be ignore_index ({ignore_index}) or in "
                             f"[0, {weight.shape[0]}), got values from {int(targets.min())} to {int(targets.max())}")
        acc = router_dtype(x.dtype)
        lse = torch.empty(n, dtype=acc, device=x.device)
        total = torch.zeros((), dtype=acc, device=x.device)
        for s in range(0, n, chunk):
            logits = _chunk_logits(x_rows[s:s + chunk], weight, bias)
            lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
            total += (lse[s:s + chunk] - logits.gather(1, targets[s:s + chunk, None]).squeeze(1)).sum()
        ctx.save_for_backward(x_rows, targets, lse, rows, weight, bias)
        ctx.shape, ctx.mean, ctx.chunk = x.shape, mean, chunk
        return total / n if mean else total

    @staticmethod
    def backward(ctx, grad):
        x_rows, targets, lse, rows, weight, bias = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        n, chunk = rows.numel(), ctx.chunk
        scale = grad.to(lse.dtype) / n if ctx.mean else grad.to(lse.dtype)
        dx_rows = torch.empty_like(x_rows) if need_x else None
        dw = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_w else None
        db = torch.zeros(weight.shape[0], dtype=lse.dtype, device=weight.device) if need_b else None
        for s in range(0, n, chunk):
            xc, tc = x_rows[s:s + chunk], targets[s:s + chunk]
            probs = _chunk_logits(xc, weight, bias).sub_(lse[s:s + chunk, None]).exp_()
            probs[torch.arange(tc.numel(), device=tc.device), tc] -= 1.0
            dlogits = probs.mul_(scale).to(x_rows.dtype)
            if need_x:
                dx_rows[s:s + chunk] = dlogits @ weight
            if need_w:
                dw.addmm_(dlogits.T.to(dw.dtype), xc.to(dw.dtype))
            if need_b:
                db += dlogits.sum(0, dtype=db.dtype)
        dx = None
        if need_x:
            dx = torch.zeros((ctx.shape.numel() // ctx.shape[-1], ctx.shape[-1]), dtype=x_rows.dtype,
                             device=x_rows.device).index_copy_(0, rows, dx_rows).view(ctx.shape)
        return (dx, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype),
                None, None, None, None)


def linear_cross_entropy(x, weight, bias, labels, *, ignore_index: int = -100, reduction: str = "mean",
                         chunk_size: int | None = None) -> torch.Tensor:
    weight = weight.to(x.dtype)  # the GEMM runs in x's dtype, as F.linear under autocast would
    bias = None if bias is None else bias.to(x.dtype)
    return LinearCrossEntropyFunction.apply(x, weight, bias, labels, ignore_index, reduction == "mean",
                                            chunk_rows(weight.shape[0], chunk_size))
