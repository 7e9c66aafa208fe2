"""Expert usage in stage 1: which routed experts (and which pairs of experts) each MoLoRA projection picks.

During stage-1 training every MoLoRA projection hands its routing decision (the [..., K] expert indices the
kernel used) to an `ExpertUsage` counter, which adds it into two on-device buffers per projection with
index_add_: the co-activation matrix C [E, E] (C[i, j] = tokens routed to both i and j; the diagonal C[e, e]
= tokens routed to e, i.e. the expert's load) and the token count. No .item(), no bincount: nothing waits
for the device during a step; the buffers are read when the trainer logs and at the end.

What counts: training forwards only (not evaluation), real tokens only. The projection cannot see the
attention mask, so a forward pre-hook on the model remembers the batch's `attention_mask` and padded
positions are left out; without a mask every position counts (the report says which). A projection that
gradient checkpointing recomputes in the backward pass is counted once.

The stage-1 directory receives `expert_usage.json` (this module's `report`) and `expert_usage.png`
(co-activation per projection, load per layer); `python -m medcare.inspect STAGE_DIR` reprints the summary
and redraws the plot. The load balance of a projection is the coefficient of variation (std / mean) of its
experts' loads: 0 for perfectly even routing, sqrt(E/K - 1) when the same K experts take every token.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from .files import write_json
from .inject import adapter_modules
from .layers import MoLoRALinear
from .losses import TokenMask

USAGE_FILE = "expert_usage.json"
PLOT_FILE = "expert_usage.png"
FORMAT = "medcare-expert-usage"
FORMAT_VERSION = 1


def load_cv(counts: Iterable[float]) -> float:
    """Coefficient of variation std / mean (population std) of expert loads; 0 when nothing was counted."""
    values = [float(c) for c in counts]
    mean = sum(values) / len(values) if values else 0.0
    if mean <= 0:
        return 0.0
    return math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)) / mean


def split_name(name: str) -> tuple[str, str]:
    """("3", "up_proj") from "model.layers.3.mlp.up_proj"; the whole prefix as the layer when unnumbered."""
    m = re.search(r"(?:^|\.)layers?\.(\d+)\.", name)
    layer = m.group(1) if m else name.rsplit(".", 1)[0]
    return layer, name.rsplit(".", 1)[-1]


class _Slot:
    """The on-device counters of one projection."""

    def __init__(self, num_experts: int, device: torch.device):
        self.pairs = torch.zeros(num_experts, num_experts, dtype=torch.int64, device=device)
        self.tokens = torch.zeros((), dtype=torch.int64, device=device)
        self.last_call = -1


class ExpertUsage:
    """Counts routing decisions of every MoLoRA projection of `model` (while attached and training).

    Args:
        model: a model carrying MoLoRALinear modules (stage 1).
        count_padding: count every position instead of only attention_mask == 1 tokens.
    """

    def __init__(self, model: nn.Module, count_padding: bool = False):
        self.modules = dict(adapter_modules(model, MoLoRALinear))
        if not self.modules:
            raise ValueError("the model has no MoLoRA projections to count")
        first = next(iter(self.modules.values()))
        self.num_experts, self.top_k = first.num_experts, first.top_k
        self.names = {id(m): n for n, m in self.modules.items()}
        self.slots: dict[str, _Slot] = {}
        self.count_padding = count_padding
        self.unmasked_forwards = 0  # forwards counted without a usable attention mask
        self._mask = TokenMask(model)
        self._handles = [m.register_routing_hook(self._observe) for m in self.modules.values()]

    def detach(self) -> None:
        """Stop counting (the counts stay)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._mask.remove()

    def _observe(self, module: MoLoRALinear, x: torch.Tensor, indices: torch.Tensor) -> None:
        if not module.training:
            return
        name = self.names[id(module)]
        slot = self.slots.get(name)
        if slot is None:
            slot = self.slots[name] = _Slot(module.num_experts, indices.device)
        elif slot.pairs.device != indices.device:  # counts loaded from a checkpoint start on the CPU
            slot.pairs, slot.tokens = slot.pairs.to(indices.device), slot.tokens.to(indices.device)
        if slot.last_call == self._mask.calls:  # checkpoint recomputation of a forward already counted
            return
        slot.last_call = self._mask.calls
        mask = None if self.count_padding else self._mask.for_tokens(indices.shape[:-1])
        if mask is None and not self.count_padding:
            self.unmasked_forwards += 1
        add_routing(slot.pairs, slot.tokens, indices, mask)

    # ---------------------------------------------------------------------------------------- results
    def state(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """name -> (pairs [E, E], tokens) summed over all processes of a distributed run (CPU copies)."""
        out = {}
        for name in self.modules:
            slot = self.slots.get(name)
            pairs = slot.pairs.clone() if slot else torch.zeros(self.num_experts, self.num_experts, dtype=torch.int64)
            tokens = slot.tokens.clone() if slot else torch.zeros((), dtype=torch.int64)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                device = slot.pairs.device if slot else _dist_device()
                pairs, tokens = pairs.to(device), tokens.to(device)
                torch.distributed.all_reduce(pairs)
                torch.distributed.all_reduce(tokens)
            out[name] = (pairs.cpu(), tokens.cpu())
        return out

    def load_report(self, report: dict) -> None:
        """Continue counting from a saved report (resuming a run): its counts become the starting values."""
        for name, entry in report.get("modules", {}).items():
            if name in self.modules:
                slot = self.slots[name] = _Slot(self.num_experts, torch.device("cpu"))
                slot.pairs.copy_(torch.tensor(entry["pairs"], dtype=torch.int64))
                slot.tokens.fill_(int(entry["tokens"]))

    def report(self, **extra) -> dict:
        """The JSON-ready report (see `make_report`), counts of all processes summed."""
        counted = "real tokens (attention_mask 1; padding excluded)"
        if self.count_padding:
            counted = "all positions (padding included)"
        elif self.unmasked_forwards:
            counted = "real tokens where the forward had an attention_mask, all positions where it had none"
        return make_report(self.state(), self.num_experts, self.top_k, counted=counted, **extra)


def _dist_device() -> torch.device:
    backend = torch.distributed.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def add_routing(pairs: torch.Tensor, tokens: torch.Tensor, indices: torch.Tensor, mask: torch.Tensor | None) -> None:
    """pairs[i, j] += tokens routed to both i and j (diagonal: to i), tokens += tokens; mask [T] (1 = count)
    or None. Device-side index_add_ only: nothing synchronises with the host."""
    num_experts, k = pairs.shape[0], indices.shape[-1]
    idx = indices.reshape(-1, k).to(pairs.device)
    # Every ordered pair (a, b) of a token's K picks, a == b included, gives C = S^T S for the 0/1 selection S.
    flat = (idx.unsqueeze(2) * num_experts + idx.unsqueeze(1)).reshape(-1)                  # [T * K * K]
    if mask is None:
        pairs.view(-1).index_add_(0, flat, torch.ones((), dtype=pairs.dtype, device=pairs.device).expand(flat.numel()))
        tokens.add_(idx.shape[0])
    else:
        m = mask.to(device=pairs.device, dtype=pairs.dtype)
        pairs.view(-1).index_add_(0, flat, m.repeat_interleave(k * k))
        tokens.add_(m.sum())


def make_report(state: dict[str, tuple[torch.Tensor, torch.Tensor]], num_experts: int, top_k: int,
                **extra) -> dict:
    """{"modules": {name: {layer, projection, tokens, counts, pairs, load, cv}}, "layers": {layer: {cv, ...}},
    "summary": {...}} from name -> (pairs, tokens). counts[e] = tokens routed to e; load = counts / sum."""
    modules, layers = {}, {}
    for name, (pairs, tokens) in state.items():
        layer, proj = split_name(name)
        counts = pairs.diagonal().tolist()
        total = sum(counts)
        modules[name] = {"layer": layer, "projection": proj, "tokens": int(tokens), "counts": counts,
                         "pairs": pairs.tolist(), "load": [c / total if total else 0.0 for c in counts],
                         "cv": load_cv(counts)}
        layers.setdefault(layer, {})[proj] = modules[name]["cv"]
    layer_rows = {layer: {"cv": sum(p.values()) / len(p), "by_projection": p} for layer, p in layers.items()}
    cvs = [m["cv"] for m in modules.values()]
    summary = {"mean_cv": sum(cvs) / len(cvs) if cvs else 0.0, "max_cv": max(cvs, default=0.0),
               "tokens": max((m["tokens"] for m in modules.values()), default=0),
               "uniform_cv": 0.0, "collapsed_cv": math.sqrt(num_experts / top_k - 1)}
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "num_experts": num_experts, "top_k": top_k,
            **extra, "summary": summary, "layers": layer_rows, "modules": modules}


# ------------------------------------------------------------------------------------------------ files
def write_report(report: dict, directory: str) -> str:
    path = os.path.join(directory, USAGE_FILE)
    write_json(path, report)
    return path


def read_report(directory: str) -> dict:
    """The usage report of a stage-1 directory; ValueError (one line) when it has none or it is damaged."""
    path = os.path.join(directory, USAGE_FILE)
    if not os.path.isdir(directory):
        raise ValueError(f"{directory}: not a directory (expected a medcare stage-1 directory)")
    if not os.path.isfile(path):
        raise ValueError(f"{directory}: no {USAGE_FILE} (stage 1 writes it; stage-2 and export directories, and "
                         f"stage-1 runs with --expert_usage false, have none)")
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable ({str(exc).splitlines()[0]})") from None
    if not isinstance(report, dict) or report.get("format") != FORMAT or not isinstance(report.get("modules"), dict):
        raise ValueError(f"{path}: not a medcare expert-usage report")
    return report


def summary_lines(report: dict) -> list[str]:
    """The load-balance summary: one line per layer (CV of expert load per projection), then the totals."""
    s = report["summary"]
    e, k = report["num_experts"], report["top_k"]
    lines = [f"expert load balance: coefficient of variation of expert load (0 = even; {s['collapsed_cv']:.2f} = "
             f"the same {k} of {e} experts for every token), {s['tokens']:,} tokens counted per projection "
             f"({report.get('counted', 'all positions')})"]
    if report.get("router_aux_loss_coef"):
        lines[0] += f", load-balancing loss coefficient {report['router_aux_loss_coef']}"
    for layer, row in report["layers"].items():
        per = "  ".join(f"{proj} {cv:.3f}" for proj, cv in row["by_projection"].items())
        busiest = _busiest(report, layer)
        lines.append(f"  layer {layer:>3}: cv {row['cv']:.3f}   ({per})   busiest experts {busiest}")
    lines.append(f"  all projections: mean cv {s['mean_cv']:.3f}, max cv {s['max_cv']:.3f}")
    return lines


def _busiest(report: dict, layer: str) -> str:
    loads = [m["load"] for m in report["modules"].values() if m["layer"] == layer]
    mean = [sum(col) / len(loads) for col in zip(*loads, strict=True)] if loads else []
    top = sorted(range(len(mean)), key=lambda e: -mean[e])[: report["top_k"]]
    return ", ".join(f"e{e} {100 * mean[e]:.0f}%" for e in top)


def write_plot(report: dict, path: str) -> str | None:
    """Heatmaps as PNG: top row, per projection, the co-activation matrix summed over layers, as the share of
    tokens that used both experts (the diagonal, one expert's load, is greyed out); bottom row, per projection,
    each layer's expert load (share of routed slots). Returns the path, or None with a one-line warning when
    matplotlib is missing."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        warnings.warn("matplotlib is not installed: no expert-usage heatmap (pip install matplotlib)", stacklevel=2)
        return None
    e = report["num_experts"]
    projections = list(dict.fromkeys(m["projection"] for m in report["modules"].values()))
    layers = list(report["layers"])
    fig = Figure(figsize=(4.2 * len(projections), 3.8 + max(2.0, 0.22 * len(layers))), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(projections), squeeze=False, height_ratios=[3.6, max(1.8, 0.22 * len(layers))])
    for col, proj in enumerate(projections):
        mods = [m for m in report["modules"].values() if m["projection"] == proj]
        tokens = sum(m["tokens"] for m in mods) or 1
        co = torch.tensor([m["pairs"] for m in mods], dtype=torch.float64).sum(0) / tokens
        co.fill_diagonal_(float("nan"))  # the diagonal is the load (bottom row); it would swamp the pair colours
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgray")
        im = axes[0][col].imshow(co.numpy(), cmap=cmap, vmin=0.0)
        axes[0][col].set_title(f"{proj}: experts chosen together")
        _ticks(axes[0][col], e, e)
        fig.colorbar(im, ax=axes[0][col], shrink=0.8, label="share of tokens")
        by_layer = {m["layer"]: m["load"] for m in mods}
        load = torch.tensor([by_layer.get(layer, [0.0] * e) for layer in layers], dtype=torch.float64)
        im = axes[1][col].imshow(load.numpy(), cmap="magma", vmin=0.0, aspect="auto")
        axes[1][col].set_title(f"{proj}: expert load per layer")
        _ticks(axes[1][col], e, 0)
        axes[1][col].set_yticks(range(len(layers)), [f"L{layer}" for layer in layers], fontsize=6)
        fig.colorbar(im, ax=axes[1][col], shrink=0.8, label="share of routed slots")
    fig.suptitle(f"MedCare stage 1: expert usage (top-{report['top_k']} of {e}; "
                 f"mean load cv {report['summary']['mean_cv']:.3f})")
    fig.savefig(path, dpi=110)
    return path


def _ticks(ax, nx: int, ny: int) -> None:
    ax.set_xticks(range(nx), [f"e{i}" for i in range(nx)], fontsize=7)
    if ny:
        ax.set_yticks(range(ny), [f"e{i}" for i in range(ny)], fontsize=7)


def save_usage(report: dict, directory: str) -> tuple[str, str | None]:
    """expert_usage.json and expert_usage.png into `directory`."""
    json_path = write_report(report, directory)
    png = write_plot(report, os.path.join(directory, PLOT_FILE))
    return json_path, png
