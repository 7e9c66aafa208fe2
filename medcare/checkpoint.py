"""Stage directories: their adapter tensors (gathered from / scattered to sharded parameters), saving and
reading them, and import of the original implementation's stage-1 artifacts (the model a directory describes
is built by medcare.stage_model). Nothing here unpickles: tensors are safetensors, metadata is JSON, and the original
implementation's `non_lora_trainables.bin` is read with torch.load(weights_only=True).

A stage directory holds
    adapter.safetensors     adapter tensors, keyed "<module>.<role>.<tensor>" with <module> the HF module name,
                            e.g. model.layers.3.mlp.up_proj.experts.lora_a [E*R, Din]; roles:
                            attention | experts | shared | router (stage 1), knowledge | alignment (stage 2);
                            stage 2 also carries stage 1's attention LoRA, which export merges
    medcare_adapter.json    stage, base model (path and architecture fingerprint), configs, scalings,
                            library version, and the sha256 of adapter.safetensors (verified on load)
Both files are written atomically (temporary name, fsync, rename): a crash never leaves a torn directory,
and tensors that are not finite are never written. Training checkpoints (checkpoint-N) are built under a
temporary name and renamed into place whole (`files.publish_checkpoint`), so a kill during a save leaves the
previous checkpoint as the newest one. Under FSDP2 the adapter parameters are DTensors: reading gathers them,
loading scatters the full tensors back to each rank's shard (every rank must call both).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .config import Stage1Config, Stage2Config
from .files import atomic_write, sha256_file
from .inject import adapter_modules
from .layers import MoLoRALinear
from .loading import UserError

ADAPTER_FILE = "adapter.safetensors"
MANIFEST_FILE = "medcare_adapter.json"
FORMAT = "medcare-adapter"
FORMAT_VERSION = 1
FINGERPRINT_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "vocab_size")


class CheckpointError(UserError):
    """A stage directory, model directory or official checkpoint that cannot be used, with the reason."""


# ------------------------------------------------------------------------------------- fingerprints
def model_fingerprint(config) -> dict:
    """What must match between a stage directory and the model it is applied to."""
    fp = {k: getattr(config, k, None) for k in FINGERPRINT_KEYS}
    fp["architectures"] = list(getattr(config, "architectures", None) or [])
    return fp



# ------------------------------------------------------------------------------------- adapter tensors
# Wrappers (FSDP1, activation checkpointing, torch.compile) insert these segments into module names.
_WRAPPER_SEGMENTS = re.compile(r"(^|\.)(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)(?=\.|$)")


def clean_name(name: str) -> str:
    """A module name with wrapper segments removed: the stable key that checkpoints use."""
    return _WRAPPER_SEGMENTS.sub("", name).lstrip(".")


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "placements")


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded DTensor (FSDP2) is gathered (a collective: every rank calls it)."""
    return t.full_tensor() if _is_dtensor(t) else t


def adapter_state(model: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Every adapter tensor of the model under its stable key (contiguous CPU copies). With `state_dict`
    (a gathered full state dict, as FSDP / ZeRO-3 saving provides) the values come from it instead of the
    possibly sharded module parameters."""
    out: dict[str, torch.Tensor] = {}

    def get(name: str, module: nn.Module, attr: str) -> torch.Tensor:
        return state_dict[f"{name}.{attr}"] if state_dict else _full(getattr(module, attr).detach())

    for name, module in adapter_modules(model):
        name = clean_name(name)
        a, b = get(name, module, "lora_a"), get(name, module, "lora_b")
        if isinstance(module, MoLoRALinear):
            er = module.num_experts * module.expert_rank
            out[f"{name}.router.weight"] = get(name, module, "router_weight")
            out[f"{name}.router.bias"] = get(name, module, "router_bias")
            out[f"{name}.experts.lora_a"], out[f"{name}.experts.lora_b"] = a[:er], b[:, :er]
            if module.shared_rank:
                out[f"{name}.shared.lora_a"], out[f"{name}.shared.lora_b"] = a[er:], b[:, er:]
        else:
            for role in module.adapter_ranks:
                sl = module.adapter_slice(role)
                out[f"{name}.{role}.lora_a"], out[f"{name}.{role}.lora_b"] = a[sl], b[:, sl]
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def _copy(dst: torch.Tensor, tensors: dict[str, torch.Tensor], key: str, used: set) -> None:
    if key not in tensors:
        raise CheckpointError(f"{ADAPTER_FILE} has no tensor {key!r} that the model needs")
    src = tensors[key]
    if tuple(src.shape) != tuple(dst.shape):
        raise CheckpointError(f"tensor {key!r} has shape {list(src.shape)}, the model expects {list(dst.shape)}")
    dst.copy_(src.to(dst.dtype))
    used.add(key)


class _Writable:
    """The parameter itself, or for a sharded DTensor (FSDP2) a gathered full copy that is scattered back
    into this rank's shard on exit; either way the caller writes whole-tensor slices."""

    def __init__(self, param: torch.Tensor):
        self.param = param

    def __enter__(self) -> torch.Tensor:
        self.full = self.param.full_tensor() if _is_dtensor(self.param) else self.param
        return self.full

    def __exit__(self, *exc) -> None:
        if exc[0] is None and _is_dtensor(self.param):
            from torch.distributed.tensor import distribute_tensor

            shard = distribute_tensor(self.full, self.param.device_mesh, self.param.placements)
            self.param.to_local().copy_(shard.to_local())


@torch.no_grad()
def load_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor], roles: tuple[str, ...] | None = None
                       ) -> set[str]:
    """Copy adapter tensors into the model's adapters (optionally only some roles); returns the keys used.
    Sharded (FSDP2) parameters are written shard by shard: every rank must call this."""
    used: set[str] = set()
    for name, module in adapter_modules(model):
        name = clean_name(name)
        if isinstance(module, MoLoRALinear):
            er = module.num_experts * module.expert_rank
            with _Writable(module.router_weight) as rw, _Writable(module.router_bias) as rb, \
                    _Writable(module.lora_a) as a, _Writable(module.lora_b) as b:
                _copy(rw, tensors, f"{name}.router.weight", used)
                _copy(rb, tensors, f"{name}.router.bias", used)
                _copy(a[:er], tensors, f"{name}.experts.lora_a", used)
                _copy(b[:, :er], tensors, f"{name}.experts.lora_b", used)
                if module.shared_rank:
                    _copy(a[er:], tensors, f"{name}.shared.lora_a", used)
                    _copy(b[:, er:], tensors, f"{name}.shared.lora_b", used)
            continue
        with _Writable(module.lora_a) as a, _Writable(module.lora_b) as b:
            for role in module.adapter_ranks:
                if roles is None or role in roles:
                    sl = module.adapter_slice(role)
                    _copy(a[sl], tensors, f"{name}.{role}.lora_a", used)
                    _copy(b[:, sl], tensors, f"{name}.{role}.lora_b", used)
    return used


def non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an infinity."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


# ------------------------------------------------------------------------------------ stage directories
@dataclass
class StageDir:
    path: str
    meta: dict
    tensors: dict[str, torch.Tensor]

    @property
    def stage(self) -> int:
        return int(self.meta["stage"])

    @property
    def stage1(self) -> Stage1Config:
        return Stage1Config(**self.meta["stage1"])

    @property
    def stage2(self) -> Stage2Config | None:
        return Stage2Config(**self.meta["stage2"]) if "stage2" in self.meta else None

    def role(self, role: str, rename: str | None = None) -> dict[str, torch.Tensor]:
        """The tensors of one adapter role ("<module>.<role>.<tensor>"), optionally under another role name."""
        mark = f".{role}."
        return {(k.replace(mark, f".{rename}.") if rename else k): v for k, v in self.tensors.items() if mark in k}


def save_stage(output_dir: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    """Write a stage directory: adapter.safetensors, then the manifest that vouches for it. Tensors holding
    NaN or infinity are refused (CheckpointError) before anything is written: a diverged run never
    replaces a good adapter."""
    bad = non_finite(tensors)
    if bad:
        raise CheckpointError(f"refusing to save {output_dir}: {len(bad)} adapter tensors hold NaN or infinity "
                              f"(first: {bad[0]}); the training diverged")
    os.makedirs(output_dir, exist_ok=True)
    tensor_path = os.path.join(output_dir, ADAPTER_FILE)
    atomic_write(tensor_path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "library_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **meta,
                "files": {ADAPTER_FILE: {"sha256": sha256_file(tensor_path), "tensors": len(tensors)}}}

    def write_json(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=2, sort_keys=False)

    atomic_write(os.path.join(output_dir, MANIFEST_FILE), write_json)
    return output_dir


def read_stage(path: str, expect_stage: int | None = None, verify: bool = True) -> StageDir:
    """Load a stage directory, checking its manifest, its checksum and (optionally) its stage."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory (expected a medcare stage directory)")
    manifest_path = os.path.join(path, MANIFEST_FILE)
    if not os.path.isfile(manifest_path):
        hint = " (this looks like an original MedCare stage-1 directory: pass it as --stage1)" if os.path.isfile(
            os.path.join(path, "non_lora_trainables.bin")) else ""
        raise CheckpointError(f"{path}: no {MANIFEST_FILE}; not a medcare stage directory{hint}")
    try:
        with open(manifest_path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({exc})") from None
    if meta.get("format") != FORMAT or meta.get("stage") not in (1, 2):
        raise CheckpointError(f"{manifest_path}: not a medcare adapter manifest")
    if expect_stage is not None and meta["stage"] != expect_stage:
        raise CheckpointError(f"{path} is a stage-{meta['stage']} directory, but a stage-{expect_stage} directory "
                              f"is expected here")
    tensor_path = os.path.join(path, ADAPTER_FILE)
    if not os.path.isfile(tensor_path):
        raise CheckpointError(f"{path}: {ADAPTER_FILE} is missing")
    want = meta.get("files", {}).get(ADAPTER_FILE, {}).get("sha256")
    if verify and want and sha256_file(tensor_path) != want:
        raise CheckpointError(f"{tensor_path}: checksum mismatch (the file is corrupt or was changed after saving)")
    try:
        tensors = load_file(tensor_path)
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise CheckpointError(f"{tensor_path}: unreadable ({exc})") from None
    return StageDir(path, meta, tensors)


def check_base_matches(stage: StageDir, config) -> None:
    """The stage directory was trained on a model of this architecture and size."""
    want, got = stage.meta.get("base_model", {}).get("fingerprint", {}), model_fingerprint(config)
    diffs = [f"{k}: stage has {want[k]!r}, model has {got.get(k)!r}" for k in want
             if k != "architectures" and want[k] is not None and want[k] != got.get(k)]
    if diffs:
        raise CheckpointError(f"{stage.path} was trained on a different base model ({'; '.join(diffs)})")


# ------------------------------------------------------------------------------------ original import
_OFFICIAL_MLP = re.compile(r"^(?:base_model\.model\.)?(model\.layers\.\d+\.mlp\.\w+)\.(switch|experts|share_experts)"
                           r"\.(.+)$")
_OFFICIAL_ATTN = re.compile(r"^(?:base_model\.model\.)?(model\.layers\.\d+\.self_attn\.\w+)\.lora_([AB])"
                            r"(?:\.default)?\.weight$")


def _official_mlp(raw: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int, int, int]:
    """Map switch / experts.{i}.lora_{A,B}_{i} / share_experts.lora_{A,B} to medcare's packed keys."""
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, t in raw.items():
        m = _OFFICIAL_MLP.match(key)
        if not m:
            raise CheckpointError(f"non_lora_trainables.bin: unexpected key {key!r}")
        module, part, rest = m.groups()
        if part == "switch":
            out[f"{module}.router.{rest.split('.')[0]}"] = t
        elif part == "share_experts":
            out[f"{module}.shared.lora_{'a' if 'lora_A' in rest else 'b'}"] = t
        else:
            em = re.match(r"^(\d+)\.lora_([AB])_\d+\.weight$", rest)
            if not em:
                raise CheckpointError(f"non_lora_trainables.bin: unexpected expert key {key!r}")
            experts.setdefault(module, {}).setdefault(int(em.group(1)), {})[em.group(2)] = t
    num_experts = expert_rank = shared_rank = 0
    for module, per in experts.items():
        order = sorted(per)
        out[f"{module}.experts.lora_a"] = torch.cat([per[e]["A"] for e in order], 0)
        out[f"{module}.experts.lora_b"] = torch.cat([per[e]["B"] for e in order], 1)
        num_experts, expert_rank = len(order), per[order[0]]["A"].shape[0]
        shared_rank = out.get(f"{module}.shared.lora_a", torch.empty(0, 0)).shape[0]
    return out, num_experts, expert_rank, shared_rank


def import_official_stage1(path: str, top_k: int | None = None) -> tuple[dict[str, torch.Tensor], Stage1Config]:
    """Read an original MedCare stage-1 output directory (non_lora_trainables.bin + PEFT attention adapter)."""
    bin_path = os.path.join(path, "non_lora_trainables.bin")
    if not os.path.isfile(bin_path):
        raise CheckpointError(f"{path}: no non_lora_trainables.bin (not an original MedCare stage-1 directory)")
    try:
        raw = torch.load(bin_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a file that is not plain tensors must not be unpickled
        raise CheckpointError(f"{bin_path}: cannot be read as plain tensors ({exc})") from None
    if not isinstance(raw, dict) or not raw:
        raise CheckpointError(f"{bin_path}: expected a non-empty mapping of names to tensors, got {type(raw).__name__}")
    for key, value in raw.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{bin_path}: entry {key!r} is a {type(value).__name__}, not a tensor")
    tensors, num_experts, expert_rank, shared_rank = _official_mlp(raw)
    cfg = _official_config(path, num_experts, expert_rank, shared_rank, top_k)
    tensors.update(_official_attention(path))
    return tensors, cfg


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _official_config(path, num_experts, expert_rank, shared_rank, top_k) -> Stage1Config:
    config, peft = _read_json(os.path.join(path, "config.json")), _read_json(os.path.join(path, "adapter_config.json"))
    k = top_k or config.get("num_experts_per_token")
    if not k:
        raise CheckpointError(f"{path}: config.json has no num_experts_per_token; pass the top-k explicitly")
    rank, alpha = peft.get("r", expert_rank), peft.get("lora_alpha", 2 * expert_rank)
    return Stage1Config(attn_rank=rank, attn_alpha=alpha, attn_dropout=peft.get("lora_dropout", 0.05),
                        num_experts=num_experts, top_k=int(k), expert_rank=expert_rank, shared_rank=shared_rank,
                        mlp_alpha=alpha, mlp_dropout=0.0).validate()


def _official_attention(path: str) -> dict[str, torch.Tensor]:
    adapter = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(adapter):
        return {}
    out = {}
    for key, t in load_file(adapter).items():
        m = _OFFICIAL_ATTN.match(key)
        if m:
            out[f"{m.group(1)}.attention.lora_{m.group(2).lower()}"] = t
    return out


def is_official_stage1(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "non_lora_trainables.bin")) and not os.path.isfile(
        os.path.join(path, MANIFEST_FILE))


def load_stage1(path: str, top_k: int | None = None) -> StageDir:
    """A stage-1 directory of medcare, or of the original implementation (converted in memory)."""
    if is_official_stage1(path):
        tensors, cfg = import_official_stage1(path, top_k)
        meta = {"stage": 1, "stage1": cfg.to_dict(), "base_model": {}, "imported_from": os.path.abspath(path)}
        return StageDir(path, meta, tensors)
    return read_stage(path, expect_stage=1)


def open_stage(path: str, expect_stage: int | None = None, official_top_k: int | None = None) -> StageDir:
    """Any stage directory: medcare's (either stage, or the one expected), or the original implementation's
    stage-1 output (converted in memory)."""
    if expect_stage in (None, 1) and is_official_stage1(path):
        return load_stage1(path, official_top_k)
    return read_stage(path, expect_stage=expect_stage)
