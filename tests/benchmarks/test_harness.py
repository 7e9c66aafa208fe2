"""Harness behaviour the GPU run depends on: out-of-memory providers are recorded, not fatal; the time
budget skips cases; backends are discovered without timing the Triton interpreter; run_all writes
json + md + png per suite and rejects bad arguments with a one-line error."""

from __future__ import annotations

import json
import os
import time
import types

import pytest
import torch

from benchmarks import harness, run_all
from benchmarks.providers import medcare as mc

CPU = torch.device("cpu")


def _oom():
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")


def test_out_of_memory_provider_is_recorded_and_the_others_measured():
    ctx = harness.Context(CPU, torch.float32, warmup=1, repeats=2)
    x = torch.randn(8, 8)
    cases = {"ok": harness.Case({"fwd": harness.Timed(lambda: x @ x)}, {"fwd": "a matmul"}),
             "big": harness.Case({"fwd": harness.Timed(_oom)}, {"fwd": "too big"})}
    recs = {r.provider: r for r in harness.measure(ctx, "s", "c", {"T": 8}, cases)}
    assert recs["ok"].skipped is None and recs["ok"].repeats == 2 and recs["ok"].median_ms > 0
    assert recs["big"].median_ms is None and recs["big"].skipped.startswith("out of memory")


def test_other_errors_are_not_swallowed():
    cases = {"bug": harness.Case({"fwd": harness.Timed(lambda: 1 / 0)}, {"fwd": "a bug"})}
    with pytest.raises(ZeroDivisionError):
        harness.measure(harness.Context(CPU, torch.float32), "s", "c", {}, cases)


def test_spent_time_budget_skips_the_case():
    ctx = harness.Context(CPU, torch.float32, deadline=time.monotonic() - 1)
    recs = harness.guarded(ctx, "s", "c", {"T": 1}, ["fwd"], lambda: pytest.fail("must not run"))
    assert recs and all(r.skipped == "time budget spent" for r in recs)


def test_backends_never_include_the_triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    status = {"torch": "available (lora_linear, molora_linear, orth_penalty, route_topk)",
              "triton": "available (molora_linear)", "ext": "available (lora_linear, molora_linear)"}
    monkeypatch.setattr(mc.mk, "available_backends", lambda: status)
    assert mc.backends("molora_linear", CPU) == ["torch", "ext"]
    assert mc.backends(("lora_linear", "orth_penalty"), CPU) == ["torch"]
    assert mc.missing(("lora_linear", "orth_penalty"), CPU) == {"ext": "backend ext has no orth_penalty"}


def test_ratio_table_reports_ratios_and_skips():
    r = dict(suite="s", case="c", shape={"T": 1}, mode="fwd", measured="m", repeats=3)
    recs = [harness.Record(provider="base", median_ms=1.0, min_ms=1.0, max_ms=1.0, **r),
            harness.Record(provider="naive-peft", median_ms=4.0, min_ms=4.0, max_ms=4.0, **r),
            harness.Record(provider="medcare-torch", median_ms=2.0, min_ms=2.0, max_ms=2.0, saved_bytes=2048, **r),
            harness.Record(provider="naive-medcare", skipped="out of memory: x", **r)]
    table = harness.ratio_table(recs)
    row = next(line for line in table.splitlines() if "medcare-torch" in line)
    assert "| 2.00x | 2.00x |" in row and "2.0 KiB" in row
    assert "skipped: out of memory: x" in table


class _Event:
    """What busy_ms reads of a kineto event."""

    def __init__(self, name, device, start, dur, annotation=False):
        self._n, self._d, self._s, self._dur = name, types.SimpleNamespace(name=device), start, dur
        self._a = annotation

    def is_user_annotation(self):
        return self._a

    def name(self):
        return self._n

    def device_type(self):
        return self._d

    def start_ns(self):
        return self._s

    def end_ns(self):
        return self._s + self._dur

    def duration_ns(self):
        return self._dur


def test_busy_ms_sums_device_work_inside_each_timed_window():
    mark = harness._MARK
    events = [_Event("flush", "CUDA", 0, 900_000),                     # before the first window: not counted
              _Event(mark, "CPU", 1_000_000, 1_000_000), _Event(mark, "CUDA", 1_000_100, 500_000, True),
              _Event("Optimizer.step#AdamW.step", "CUDA", 1_100_000, 450_000, True),   # a span, not work
              _Event("gemm", "CUDA", 1_100_000, 300_000), _Event("copy", "CUDA", 1_500_000, 100_000),
              _Event("aten::mm", "CPU", 1_050_000, 50_000),               # host work: not counted
              _Event(mark, "CPU", 3_000_000, 1_000_000), _Event("gemm", "CUDA", 3_100_000, 200_000),
              _Event(mark, "CPU", 5_000_000, 1_000_000), _Event("gemm", "CUDA", 5_100_000, 600_000)]
    assert harness.busy_ms(events) == pytest.approx(0.4)  # median of 0.4, 0.2 and 0.6 ms
    assert harness.busy_ms([_Event(mark, "CPU", 0, 10)]) is None
    assert harness.gpu_busy(harness.Timed(lambda: None), CPU, 3) is None


def test_ratio_table_adds_gpu_busy_columns_when_measured():
    r = dict(suite="s", case="c", shape={"T": 1}, mode="fwd", measured="m", repeats=3, min_ms=1.0, max_ms=9.0)
    recs = [harness.Record(provider="base", median_ms=1.0, gpu_busy_ms=0.5, **r),
            harness.Record(provider="naive-peft", median_ms=8.0, gpu_busy_ms=2.0, **r),
            harness.Record(provider="medcare-ext", median_ms=4.0, gpu_busy_ms=0.25, **r)]
    table = harness.ratio_table(recs)
    assert "| GPU busy | busy x base | busy vs naive-peft |" in table
    row = next(line for line in table.splitlines() if "medcare-ext" in line)
    assert "| 250.0 µs | 0.50x | 8.00x |" in row
    assert "GPU busy" not in harness.ratio_table([harness.Record(provider="base", median_ms=1.0, **r)])


@pytest.mark.slow  # every suite of run_all at its quick size, ~20 s on 2 cores
def test_run_all_quick_writes_every_suite(tmp_path, capsys):
    """run_all end to end on the cheap suites (the training step's models are checked in test_providers)."""
    rc = run_all.main(["--device", "cpu", "--quick", "--repeats", "1", "--warmup", "0", "--output", str(tmp_path),
                       "--suites", "routing,orth,lora,molora"])
    assert rc == 0
    out = tmp_path / "cpu"
    for suite in ("routing", "orth", "lora", "molora"):
        data = json.loads((out / f"{suite}.json").read_text())
        assert data["environment"]["command"] and data["records"], suite
        recs = data["records"]
        assert all(r["skipped"] is None and r["median_ms"] > 0 and r["measured"] for r in recs), suite
        providers = {r["provider"] for r in recs}
        assert "medcare-torch" in providers and "naive-peft" in providers, suite
        md = (out / f"{suite}.md").read_text()
        assert "medcare-torch" in md and "vs naive-peft" in md
        assert os.path.getsize(out / f"{suite}.png") > 1000
    fb = [r for r in json.loads((out / "molora.json").read_text())["records"] if r["mode"] == "fwd+bwd"]
    assert all(r["rss_bytes"] is not None and r["saved_bytes"] is not None for r in fb)
    assert "run_all: done" in capsys.readouterr().out


@pytest.mark.parametrize("argv, msg", [(["--suites", "nope"], "unknown suite"), (["--repeats", "0"], "--repeats"),
                                       (["--time-budget", "-1"], "--time-budget")])
def test_run_all_rejects_bad_arguments(argv, msg, capsys):
    with pytest.raises(SystemExit) as exc:
        run_all.main(["--device", "cpu", *argv])
    assert exc.value.code == 2 and msg in capsys.readouterr().err


@pytest.mark.gpu
def test_run_all_cuda_smoke(tmp_path):
    """On the GPU machine: every suite runs on CUDA at the quick shapes with bf16, nothing skipped."""
    assert run_all.main(["--device", "cuda", "--quick", "--repeats", "2", "--output", str(tmp_path)]) == 0
    for suite in run_all.SUITES:
        recs = json.loads((tmp_path / harness.device_slug("cuda") / f"{suite}.json").read_text())["records"]
        # A backend without one of a stage's ops (triton has no orth_penalty) is recorded as not run, by design.
        ran = [r for r in recs if not (r["skipped"] or "").startswith("backend ")]
        assert all(r["skipped"] is None for r in ran), [r for r in ran if r["skipped"]]
        assert all(r["peak_bytes"] is not None for r in ran if r["mode"] in ("fwd+bwd", "step"))
