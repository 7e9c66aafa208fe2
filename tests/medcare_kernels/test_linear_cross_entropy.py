"""linear_cross_entropy: the chunked LM loss head against the reference (the plain head), and the reference
against a per-row loop; what it never allocates; its argument errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import medcare_kernels as mk
from medcare_kernels import reference
from medcare_kernels.ops import linear_cross_entropy_torch as lce

# (leading shape, Din, V): T = 1, odd widths, a vocabulary larger than a chunk
SHAPES = [((1,), 16, 24), ((3, 7), 13, 101), ((2, 33), 77, 130), ((4, 16), 32, 1000)]


def _labels(shape, vocab, pattern: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, shape, generator=g)
    flat = labels.view(-1)
    if pattern == "padding":  # about half unlabelled, scattered, as with prompts and padding
        flat[torch.rand(flat.shape, generator=g) < 0.5] = -100
    elif pattern == "row_without_labels" and labels.dim() == 2:
        labels[0] = -100
        labels[-1, labels.shape[1] // 2:] = -100
    elif pattern == "none":
        flat[:] = -100
    return labels


def _inputs(shape, din, vocab, dtype, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, din, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    w = (torch.randn(vocab, din, generator=g, dtype=torch.float64) / math.sqrt(din)).to(dtype).requires_grad_()
    b = (torch.randn(vocab, generator=g, dtype=torch.float64) * 0.1).to(dtype).requires_grad_() if bias else None
    return x, w, b


def _loss_and_grads(fn, x, w, b, labels, scale=1.3, **kw):
    loss = fn(x, w, b, labels, **kw)
    wrt = [t for t in (x, w, b) if t is not None]
    return [loss.detach(), *torch.autograd.grad(loss * scale, wrt)]


def _upcast(t):
    return t.detach().double().requires_grad_() if t is not None else None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,din,vocab", SHAPES)
@pytest.mark.parametrize("pattern", ["all", "padding", "row_without_labels"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_the_plain_head(dtype, shape, din, vocab, pattern, reduction):
    x, w, b = _inputs(shape, din, vocab, dtype, bias=vocab % 2 == 1)
    labels = _labels(shape, vocab, pattern)
    got = _loss_and_grads(mk.linear_cross_entropy, x, w, b, labels, reduction=reduction, chunk_size=5)
    ref = _loss_and_grads(reference.linear_cross_entropy, x, w, b, labels, reduction=reduction)
    exact = _loss_and_grads(reference.linear_cross_entropy, _upcast(x), _upcast(w), _upcast(b), labels,
                            reduction=reduction)
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for name, g, r, e in zip(("loss", "dx", "dw", "db"), got, ref, exact, strict=False):
        err, ref_err = (g.double() - e).abs().max().item(), (r.double() - e).abs().max().item()
        bound = 2 * ref_err + (1e-12 if dtype == torch.float64 else 1e-6) * (1 + e.abs().max().item())
        assert err <= bound, f"{name}: error {err:.2e} vs the plain head's {ref_err:.2e}"


@pytest.mark.parametrize("chunk_size", [1, 3, 64, None])
def test_chunking_does_not_change_the_result(chunk_size):
    x, w, b = _inputs((3, 11), 24, 257, torch.float64, bias=True)
    labels = _labels((3, 11), 257, "padding")
    got = _loss_and_grads(mk.linear_cross_entropy, x, w, b, labels, chunk_size=chunk_size)
    ref = _loss_and_grads(reference.linear_cross_entropy, x, w, b, labels)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


def test_unlabelled_rows_get_exactly_zero_gradient():
    x, w, _ = _inputs((2, 9), 8, 50, torch.float32, bias=False)
    labels = _labels((2, 9), 50, "row_without_labels")
    dx = _loss_and_grads(mk.linear_cross_entropy, x, w, None, labels)[1]
    assert torch.equal(dx[labels == -100], torch.zeros_like(dx[labels == -100]))
    assert (dx[labels != -100].abs().sum(-1) > 0).all()


def test_no_labelled_row_at_all_is_nan_mean_and_zero_sum_like_torch():
    x, w, b = _inputs((2, 5), 8, 30, torch.float32, bias=True)
    labels = _labels((2, 5), 30, "none")
    assert torch.isnan(mk.linear_cross_entropy(x, w, b, labels)) and torch.isnan(
        reference.linear_cross_entropy(x, w, b, labels))
    loss, dx, dw, db = _loss_and_grads(mk.linear_cross_entropy, x, w, b, labels, reduction="sum")
    assert loss.item() == 0.0 and not dx.any() and not dw.any() and not db.any()


def test_frozen_weight_gets_no_gradient_and_input_only_grad_is_right():
    x, w, _ = _inputs((3, 8), 16, 64, torch.float64, bias=False)
    w.requires_grad_(False)
    labels = _labels((3, 8), 64, "padding")
    dx = torch.autograd.grad(mk.linear_cross_entropy(x, w, None, labels, chunk_size=4), x)[0]
    ref = torch.autograd.grad(reference.linear_cross_entropy(x, w, None, labels), x)[0]
    torch.testing.assert_close(dx, ref, rtol=1e-12, atol=1e-12)


def test_bf16_upcasts_the_logits_like_the_plain_head():
    x, w, _ = _inputs((4, 16), 32, 500, torch.bfloat16, bias=False)
    labels = _labels((4, 16), 500, "padding")
    got = _loss_and_grads(mk.linear_cross_entropy, x, w, None, labels, chunk_size=7)
    ref = _loss_and_grads(reference.linear_cross_entropy, x, w, None, labels)
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)  # same bf16 logits, same fp32 softmax
    for g, r in zip(got[1:], ref[1:], strict=True):
        torch.testing.assert_close(g.float(), r.float(), rtol=2e-2, atol=2e-3)


def test_reference_is_the_per_row_negative_log_likelihood():
    x, w, b = _inputs((2, 6), 8, 20, torch.float64, bias=True)
    labels = _labels((2, 6), 20, "padding")
    terms = [-(torch.log_softmax(x[i, t] @ w.T + b, -1)[labels[i, t]])
             for i in range(2) for t in range(6) if labels[i, t] != -100]
    torch.testing.assert_close(reference.linear_cross_entropy(x, w, b, labels, reduction="sum"), sum(terms))
    torch.testing.assert_close(reference.linear_cross_entropy(x, w, b, labels), sum(terms) / len(terms))


class _LargestOutput(TorchDispatchMode):
    """The element count of the largest tensor any op produced: nothing bigger was ever allocated by an op."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_never_allocates_logits_of_all_rows():
    rows, din, vocab, chunk = 512, 16, 4096, 32
    x, w, _ = _inputs((rows,), din, vocab, torch.float32, bias=False)
    labels = _labels((rows,), vocab, "padding")
    with _LargestOutput() as seen:
        loss = mk.linear_cross_entropy(x, w, None, labels, chunk_size=chunk)
        loss.backward()
    assert seen.largest <= max(chunk * vocab, vocab * din), f"an op produced {seen.largest} elements"
    with _LargestOutput() as plain:
        reference.linear_cross_entropy(x, w, None, labels).backward()
    assert plain.largest >= rows * vocab  # the check above can fail: the plain head does allocate [T, V]


def test_default_chunk_holds_256_mib_of_float32_logits():
    assert lce.chunk_rows(151_936) == 441 and lce.chunk_rows(49_152) == 1365 and lce.chunk_rows(10**9) == 16
    assert lce.chunk_rows(151_936, 7) == 7


@pytest.mark.parametrize("call,match", [
    (lambda x, w, y: mk.linear_cross_entropy(x, w[:, :5], None, y), r"x must have shape \[..., Din\]"),
    (lambda x, w, y: mk.linear_cross_entropy(x, w, None, y.float()), r"labels must be an int64 tensor"),
    (lambda x, w, y: mk.linear_cross_entropy(x, w, None, y[:, :3]), r"labels must have x's leading shape"),
    (lambda x, w, y: mk.linear_cross_entropy(x, w, None, y, reduction="none"), r"reduction must be 'mean' or"),
    (lambda x, w, y: mk.linear_cross_entropy(x, w, None, y, chunk_size=0), r"chunk_size must be an int >= 1"),
    (lambda x, w, y: mk.linear_cross_entropy(x, w, torch.zeros(3), y), r"bias must have shape \[Dout\]"),
    (lambda x, w, y: mk.linear_cross_entropy(x, w, None, y + 40), r"labels must be ignore_index \(-100\) or in"),
])
def test_bad_arguments_name_the_argument(call, match):
    x, w = torch.randn(2, 4, 8), torch.randn(40, 8)
    with pytest.raises(ValueError, match=match):
        call(x, w, torch.randint(0, 40, (2, 4)))


def test_under_autocast_the_head_gemm_runs_in_the_autocast_dtype():
    x, w, _ = _inputs((2, 8), 16, 64, torch.float32, bias=False)
    labels = _labels((2, 8), 64, "all")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mk.linear_cross_entropy(x, w, None, labels)
    ref = F.cross_entropy(F.linear(x.bfloat16(), w.bfloat16()).float().view(-1, 64), labels.view(-1))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.autograd.grad(got, x)[0].dtype == torch.float32
