"""benchmarks/targets.py: each target's verdict from records, and the report of a results folder."""

from __future__ import annotations

import json
import os
import shutil

from benchmarks import harness, targets


def _rec(suite, case, provider, mode, shape, median, busy=None, **kw):
    return {"suite": suite, "case": case, "provider": provider, "mode": mode, "shape": shape, "median_ms": median,
            "gpu_busy_ms": busy, "skipped": None, **kw}


def _target(what):
    return next(t for t in targets.TARGETS if t.what.startswith(what))


def test_ratio_targets_read_the_right_clock_and_provider():
    gate = {"Din": 4096, "Dout": 11008}
    recs = [_rec("molora", "projection", "base", "fwd+bwd", gate, 2.0),
            _rec("molora", "projection", "medcare-torch", "fwd+bwd", gate, 2.1),        # not the target's backend
            _rec("molora", "projection", "medcare-triton", "fwd+bwd", gate, 2.4),
            _rec("molora", "projection", "naive-peft", "fwd+bwd", gate, 12.0),
            _rec("molora", "projection", "medcare-triton", "fwd", gate, 1.0)]           # another mode
    assert targets.evaluate(_target("MoLoRA projection gate/up 4096"), recs) == ("medcare-triton", "1.20x", "missed")
    assert targets.evaluate(_target("MoLoRA projection gate/up vs"), recs) == ("medcare-triton", "5.00x", "met")
    assert targets.evaluate(_target("MoLoRA projection down"), recs)[2] == "not measured"

    shape = {"T": 8192, "E": 8, "K": 2}
    route = [_rec("routing", "route-topk", "naive-peft", "fwd+bwd", shape, 0.75, busy=0.060),
             _rec("routing", "route-topk", "medcare-ext", "fwd+bwd", shape, 0.60, busy=0.010)]
    # Wall clock says 1.25x (host work); the target is read on GPU busy time: 6x.
    assert targets.evaluate(_target("route_topk"), route) == ("medcare-ext", "6.00x", "met")
    route[1]["skipped"] = "out of memory: x"
    assert targets.evaluate(_target("route_topk"), route)[2] == "not measured"


def test_time_and_training_step_targets():
    o = {"dtype": "float32"}
    assert targets.evaluate(_target("orth penalty 28x3 at Qwen2-7B widths (fp32)"),
                            [_rec("orth", "qwen2-7b-widths", "medcare-ext", "fwd+bwd", o, 1.0, busy=0.2)]
                            ) == ("medcare-ext", "200.0 µs", "missed")
    s = {"model": "qwen2-1.5b"}
    step = [_rec("train_step", "stage1", "naive-peft", "step", s, 900.0, peak_bytes=10),
            _rec("train_step", "stage1", "medcare-triton", "step", s, 300.0, peak_bytes=5)]
    assert targets.evaluate(_target("stage-1 training step"), step) == ("medcare-triton", "3.00x, peak lower", "met")
    step[1]["peak_bytes"] = 20
    assert targets.evaluate(_target("stage-1 training step"), step)[2] == "missed"


def test_write_reports_every_target_from_a_results_folder(tmp_path):
    gate = {"Din": 4096, "Dout": 11008}
    recs = [_rec("molora", "projection", "base", "fwd+bwd", gate, 2.0),
            _rec("molora", "projection", "medcare-triton", "fwd+bwd", gate, 2.2)]
    (tmp_path / "molora.json").write_text(json.dumps({"suite": "molora", "records": recs}))
    text = targets.write(str(tmp_path))
    assert text.count("\n") == len(targets.TARGETS) + 2
    assert "| 1.10x | met |" in text and "not measured" in text
    assert (tmp_path / "targets.md").read_text().endswith(text)


def test_cli_on_the_committed_h100_results(tmp_path, capsys):
    folder = str(tmp_path / "h100")  # a copy: the report is written into the folder it reads
    shutil.copytree(os.path.join(harness.RESULTS, "nvidia-h100-80gb-hbm3"), folder)
    assert targets.main([folder]) == 0
    out = capsys.readouterr().out
    assert "| MoLoRA projection gate/up 4096->11008, fwd+bwd | <= 1.15x base | wall | medcare-triton |" in out
