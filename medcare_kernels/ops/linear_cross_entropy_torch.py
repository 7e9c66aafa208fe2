"""linear_cross_entropy, torch backend: a language-model loss head that never holds the logits of all tokens.

Fused: the head GEMM, the float32 upcast, logsumexp and the pick of the label's logit, over the labelled rows
only (rows labelled ignore_index are dropped before any GEMM: with assistant-only labels that is about half
of them), a chunk of C rows at a time; and, while a chunk's logits are at hand and autograd will need them,
its gradient: dlogits = softmax - onehot (float32, cast to x's dtype as autograd does for the plain head),
dx_rows = dlogits W, dW += dlogits^T x_rows, db += sum(dlogits). Backward then only scales these by the
incoming gradient (/ N for the mean) and scatters dx_rows back to their rows.

Why gradients in forward rather than logits recomputed in backward: both keep peak extra memory to one
chunk's [C, V] in float32 (sized by CHUNK_BYTES), never [T, V]; this way each chunk costs two GEMMs instead of
three (one fewer [C, Din] x [Din, V] per chunk), and backward needs neither x nor the weight, so FSDP / ZeRO-3
need not gather the head's weight again for it. One exp pass over a chunk serves its loss and its gradient.
The gradients are computed whenever the inputs require grad; a forward without a backward wastes them.

Saved for backward: dx_rows [N, Din] (x's dtype; the size of the x rows the plain head would save), the row
index [N], and for a trainable weight / bias their float32 gradients [V, Din] / [V].
The logits of a chunk are exactly the plain head's (same GEMM in x's dtype, same upcast), so loss and
gradients agree with medcare_kernels.reference.linear_cross_entropy to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..reference import router_dtype

CHUNK_BYTES = 256 * 2**20  # float32 logits of one chunk: 441 rows of a 151,936-token vocabulary
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
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        dx_rows = torch.empty_like(x_rows) if need_x else None
        dw = torch.zeros(weight.shape, dtype=acc, device=x.device) if need_w else None
        db = torch.zeros(weight.shape[0], dtype=acc, device=x.device) if need_b else None
        total = torch.zeros((), dtype=acc, device=x.device)
        for s in range(0, n, chunk):
            xc, tc = x_rows[s:s + chunk], targets[s:s + chunk, None]
            logits = _chunk_logits(xc, weight, bias)
            picked = logits.gather(1, tc)
            top = logits.amax(dim=-1, keepdim=True)
            exps = logits.sub_(top).exp_()  # in place, one exp pass serves the loss and the gradient
            sums = exps.sum(dim=-1, keepdim=True)
            total += (top + sums.log() - picked).sum()  # logsumexp - the label's logit
            if need_x or need_w or need_b:
                probs = exps.div_(sums)
                probs.scatter_add_(1, tc, torch.full_like(sums, -1.0))
                _chunk_grads(probs.to(x.dtype), xc, weight, dx_rows, dw, db, s)
        ctx.save_for_backward(dx_rows, dw, db, rows)
        ctx.shape, ctx.mean, ctx.n, ctx.dtypes = x.shape, mean, n, (weight.dtype, None if bias is None else bias.dtype)
        return total / n if mean else total

    @staticmethod
    def backward(ctx, grad):
        dx_rows, dw, db, rows = ctx.saved_tensors
        scale = grad / ctx.n if ctx.mean else grad
        dx = None
        if dx_rows is not None:
            shape = ctx.shape
            dx = torch.zeros((shape.numel() // shape[-1], shape[-1]), dtype=dx_rows.dtype, device=dx_rows.device)
            scaled = (dx_rows.to(scale.dtype) * scale).to(dx_rows.dtype) if dx_rows.numel() else dx_rows
            dx = dx.index_copy_(0, rows, scaled).view(shape)
        dw = None if dw is None else (dw * scale).to(ctx.dtypes[0])
        db = None if db is None else (db * scale).to(ctx.dtypes[1])
        return dx, dw, db, None, None, None, None


def _chunk_grads(dlogits, xc, weight, dx_rows, dw, db, start: int) -> None:
    """The unscaled gradients of one chunk: dlogits [C, V] (x's dtype) = softmax - onehot."""
    if dx_rows is not None:
        dx_rows[start:start + dlogits.shape[0]] = dlogits @ weight
    if dw is not None:
        dw.addmm_(dlogits.T.to(dw.dtype), xc.to(dw.dtype))
    if db is not None:
        db += dlogits.sum(0, dtype=db.dtype)


def linear_cross_entropy(x, weight, bias, labels, *, ignore_index: int = -100, reduction: str = "mean",
                         chunk_size: int | None = None) -> torch.Tensor:
    weight = weight.to(x.dtype)  # the GEMM runs in x's dtype, as F.linear under autocast would
    bias = None if bias is None else bias.to(x.dtype)
    return LinearCrossEntropyFunction.apply(x, weight, bias, labels, ignore_index, reduction == "mean",
                                            chunk_rows(weight.shape[0], chunk_size))
