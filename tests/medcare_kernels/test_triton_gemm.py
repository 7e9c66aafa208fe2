"""The Triton ops' GEMM paths (_triton_gemm.gemm_sum) and the dropout input-gradient kernel
(_triton_dropout.lowrank_dx / input_grad), each against a float64 torch computation: every path must give the
same sum, whichever kernel writes the output first. CPU under TRITON_INTERPRET=1; odd sizes miss every tile."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import backends_for

if "triton" not in backends_for("lora_linear"):
    pytest.skip("the Triton backend does not run here (TRITON_INTERPRET=1 on CPU, or a CUDA device)",
                allow_module_level=True)

from medcare_kernels.ops import _triton_dropout, _triton_gemm  # noqa: E402

PATHS = _triton_gemm.GEMM_PATHS


def _rand(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("n_bases, bias, k2", [(1, True, 21), (1, False, 0), (2, False, 9), (2, True, 40)])
def test_gemm_sum_every_path_gives_the_same_sum(path, n_bases, bias, k2):
    m, n, k = 37, 45, 29
    bases = [(_rand(m, k + i, seed=i), _rand(n, k + i, seed=10 + i)) for i in range(n_bases)]
    s, b = (_rand(m, k2, seed=20), _rand(n, k2, seed=21)) if k2 else (None, None)
    bvec = _rand(n, seed=30) if bias else None
    want = sum(a @ w.t() for a, w in bases) + (s @ b.t() if k2 else 0) + (bvec if bias else 0)
    got = _triton_gemm.gemm_sum(bases, s, b, bvec, path=path)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("path", PATHS)
def test_gemm_sum_takes_transposed_views_as_an_input_gradient_does(path):
    dy, w, dhl, a_ext = _rand(19, 33, seed=1), _rand(33, 26, seed=2), _rand(19, 11, seed=3), _rand(11, 26, seed=4)
    got = _triton_gemm.gemm_sum([(dy, w.t())], dhl, a_ext.t(), path=path)
    torch.testing.assert_close(got, dy @ w + dhl @ a_ext)


def test_gemm_path_reads_the_environment_and_names_a_bad_value(monkeypatch):
    monkeypatch.setenv("MEDCARE_TRITON_GEMM", " Add ")
    assert _triton_gemm.gemm_path(torch.device("cpu")) == "add"
    monkeypatch.setenv("MEDCARE_TRITON_GEMM", "auto")
    assert _triton_gemm.gemm_path(torch.device("cpu")) == "fused"   # the interpreter on CPU runs gemm2
    monkeypatch.setenv("MEDCARE_TRITON_GEMM", "cutlass")
    with pytest.raises(ValueError, match=r"MEDCARE_TRITON_GEMM must be .*epilogue.*'cutlass'"):
        _triton_gemm.gemm_path(torch.device("cpu"))


@pytest.mark.parametrize("r", [5, 16, 40])          # ranks below, at and past the interpreter's 16-row step
@pytest.mark.parametrize("with_router", [False, True])
@pytest.mark.parametrize("into", [False, True])
def test_lowrank_dx_is_the_masked_low_rank_term(r, with_router, into):
    t, din, e, p = 23, 70, 3, 0.3
    seed = torch.tensor([7], dtype=torch.int64)
    # ds and dl as the ops pass them: column slices of one [T, R + E] buffer ([dh | d_logits], row stride R + E)
    dhl = _rand(t, r + e, seed=1)
    ds, a = dhl[:, :r], _rand(r, din, seed=2)
    dl, wr = (dhl[:, r:], _rand(e, din, seed=4)) if with_router else (None, None)
    keep = _triton_dropout.keep_mask(seed, t, din, p, torch.device("cpu"))
    want = torch.where(keep, ds @ a / (1 - p), 0.0) + (dl @ wr if with_router else 0)
    out = _rand(t, din, seed=5) if into else None
    if into:
        want = want + out
    got = _triton_dropout.lowrank_dx(ds, a, seed, p, dl, wr, out=out)
    torch.testing.assert_close(got, want)
    if into:
        assert got is out


@pytest.mark.parametrize("path", PATHS)
def test_input_grad_with_dropout_is_the_same_on_every_path(path, monkeypatch):
    monkeypatch.setenv("MEDCARE_TRITON_GEMM", path)
    t, din, dout, r, e, p = 21, 38, 27, 12, 4, 0.25
    seed = torch.tensor([3], dtype=torch.int64)
    dy, w = _rand(t, dout, seed=1), _rand(dout, din, seed=2)
    dy2, w2 = _rand(t, dout + 3, seed=6), _rand(dout + 3, din, seed=7)
    ds, a, dl, wr = _rand(t, r, seed=3), _rand(r, din, seed=4), _rand(t, e, seed=5), _rand(e, din, seed=8)
    keep = _triton_dropout.keep_mask(seed, t, din, p, torch.device("cpu"))
    want = dy @ w + dy2 @ w2 + torch.where(keep, ds @ a / (1 - p), 0.0) + dl @ wr
    got = _triton_dropout.input_grad([(dy, w.t()), (dy2, w2.t())], ds, a, seed, p, dl, wr)
    torch.testing.assert_close(got, want)
