"""What every command of medcare shares: the user-error type and loading a base model, its tokenizer and config.

`UserError` is a mistake in the command line, a file or a directory. Every error type of the training layer
that a user can cause derives from it (ConfigError, DataError, CheckpointError, InjectionError, EvalError), so
each command reports any of them as one line and exit status 2, never as a traceback.

Models load from a Hugging Face model directory (or hub id) in a dtype chosen once for all commands:
`auto` is bf16 on a GPU that supports it, else float32.
"""

from __future__ import annotations

import argparse
import os
import re

import torch

DTYPES = ("auto", "float32", "bfloat16", "float16")


class UserError(ValueError):
    """A mistake in the command line, files or directories: reported as one line, exit status 2."""


class CommandParser(argparse.ArgumentParser):
    """argparse whose usage errors are UserErrors: the command reports them as its one line, exit status 2."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


def bf16_ok(device: torch.device | None = None) -> bool:
    """Whether bf16 is the natural compute dtype here: a CUDA device (the given one, else any) that has it."""
    if device is not None and device.type != "cuda":
        return False
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_dtype(name: str, device: torch.device | None = None, option: str = "--model_dtype") -> torch.dtype:
    """torch dtype of a dtype option (`option` names it in the error)."""
    if name == "auto":
        return torch.bfloat16 if bf16_ok(device) else torch.float32
    if name not in DTYPES:
        raise UserError(f"{option} must be one of {', '.join(DTYPES)}, got {name!r}")
    return getattr(torch, name)


def resolve_device(name: str, option: str = "--device") -> torch.device:
    """`auto` (cuda when available), cpu, cuda, cuda:N."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{option} {name!r} is not a device (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{option} {name}: no CUDA device on this machine")
    return device


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_model_dir(path: str) -> None:
    """A local model directory must hold config.json; anything else must at least look like a hub id."""
    if os.path.exists(path):
        if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(f"{path}: not a Hugging Face model directory (no config.json)")
    elif not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        raise UserError(f"{path}: no such model directory")


def load_config(path: str):
    from transformers import AutoConfig

    check_model_dir(path)
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{path}: cannot load the model config ({_first_line(exc)})") from None


def load_tokenizer(path: str):
    """The model's tokenizer; one without a pad token pads with its eos token (padding is masked anyway)."""
    from transformers import AutoTokenizer

    check_model_dir(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{path}: cannot load the tokenizer ({_first_line(exc)})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    check_model_dir(path)
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{path}: cannot load the model ({_first_line(exc)})") from None


def load_model_and_tokenizer(path: str, dtype: torch.dtype):
    return load_model(path, dtype), load_tokenizer(path)


def checkpoint_dtype(path: str) -> torch.dtype:
    """The dtype a model directory's config says its weights are stored in (float32 when it does not say)."""
    dt = getattr(load_config(path), "dtype", None) or torch.float32
    return getattr(torch, dt) if isinstance(dt, str) else dt
