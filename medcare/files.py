"""Writing files so that a crash or a kill never leaves a torn one: atomic replace of single files, atomic
publication of whole directories, and the checksums that stage directories and caches record."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable

from .loading import UserError


class OutputExistsError(UserError):
    """A directory that would be overwritten is not empty."""


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """write(tmp_path), fsync, then rename over `path`: readers see the old file or the new one, never half."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes owner-only files; outputs get the usual permissions
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_tree(path: str) -> None:
    """fsync every file and directory under `path` (then `path` itself): its content is on disk before a
    rename makes it visible."""
    for root, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(root)


def publish_checkpoint(staging: str, final: str) -> None:
    """Move a completely written checkpoint directory into place: fsync its files, rename it over `final`
    (an older directory of that name, e.g. from an overwritten run, is removed first), fsync the parent."""
    fsync_tree(staging)
    if os.path.lexists(final):
        shutil.rmtree(final)
    os.replace(staging, final)
    _fsync_dir(os.path.dirname(os.path.abspath(final)))


def publish_dir(build: Callable[[str], None], output_dir: str) -> None:
    """build(tmp_dir) then rename it to output_dir, so a crash never leaves a half-written export behind.
    An existing non-empty output_dir is refused, never overwritten."""
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise OutputExistsError(f"{output_dir} already exists and is not empty; choose a new --output")
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.tmp-", dir=parent)
    try:
        build(tmp)
        mask = _umask()
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes an owner-only directory; a served model must be readable
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o666 & ~mask)
        if os.path.isdir(output_dir):
            os.rmdir(output_dir)  # empty, checked above
        os.replace(tmp, output_dir)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str, value, indent: int | None = 1) -> None:
    """`value` as UTF-8 JSON (characters unescaped), written atomically; parent directories are created."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=indent, ensure_ascii=False)

    atomic_write(path, write)
