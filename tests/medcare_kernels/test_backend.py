"""Backend selection: use_backend, MEDCARE_KERNELS_BACKEND, clear errors for what is not built."""

from __future__ import annotations

import pytest
import torch

import medcare_kernels as mk
from medcare_kernels import _backend


def test_default_is_auto_and_auto_runs_on_cpu(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    assert mk.current_backend() == "auto"
    gates, idx = mk.route_topk(torch.randn(3, 4), 2)
    assert gates.shape == (3, 4)


def test_context_manager_overrides_env_and_restores(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "torch")
    assert mk.current_backend() == "torch"
    with mk.use_backend("auto"):
        assert mk.current_backend() == "auto"
        with mk.use_backend("torch"):
            assert mk.current_backend() == "torch"
        assert mk.current_backend() == "auto"
    assert mk.current_backend() == "torch"


def test_bad_names_are_value_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"use_backend\(name\) must be one of auto, torch, triton, ext; got 'cuda'"):
        with mk.use_backend("cuda"):
            pass
    monkeypatch.setenv(_backend.ENV_VAR, "fast")
    with pytest.raises(ValueError, match=r"\$MEDCARE_KERNELS_BACKEND must be one of .*; got 'fast'"):
        mk.route_topk(torch.randn(2, 3), 1)


@pytest.mark.parametrize("name", ["triton", "ext"])
def test_unbuilt_backends_raise_clearly_when_requested(name, monkeypatch):
    # Emptied here whatever this install built: CI builds every backend, and the error paths must still run.
    monkeypatch.setitem(_backend._registry, name, {})
    monkeypatch.setitem(_backend._unavailable, name, "the reason it was not built")
    assert mk.available_backends()[name] == "the reason it was not built"
    with pytest.raises(mk.BackendUnavailableError,
                       match=rf"backend '{name}' is not available: the reason it was not built"):
        with mk.use_backend(name):
            pass
    monkeypatch.setenv(_backend.ENV_VAR, name)
    with pytest.raises(mk.BackendUnavailableError, match=rf"backend '{name}' was requested but is not available"):
        mk.orth_penalty([torch.randn(2, 3)], [torch.randn(2, 3)])
    monkeypatch.setenv(_backend.ENV_VAR, "auto")  # auto falls back to the torch backend
    torch.testing.assert_close(mk.orth_penalty([torch.ones(2, 3)], [torch.ones(2, 3)]), torch.tensor(12.0))


def test_available_backends_explains_each():
    status = mk.available_backends()
    assert set(status) == {"torch", "triton", "ext"}
    assert status["torch"].startswith("available (linear_cross_entropy, lora_linear, molora_gate_up, molora_linear, "
                                    "orth_penalty, route_topk")
    # HAS_EXT says exactly whether the compiled ops are registered, and the status line agrees with both
    assert mk.HAS_EXT == bool(_backend._registry["ext"])
    if mk.HAS_EXT:
        assert status["ext"] == "available (orth_penalty, route_topk)"
    else:
        assert not status["ext"].startswith("available") and status["ext"]
