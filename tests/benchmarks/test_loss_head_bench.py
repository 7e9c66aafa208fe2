"""benchmarks/bench_loss_head.py: both heads run the same step (same first loss) and the table reads right."""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_loss_head as blh

TINY = dict(model="tiny", layers=None, batch=2, seq=32, checkpointing=False)


def test_both_heads_take_the_same_first_step():
    rows = [blh.run_head(h, TINY, "cpu", "float32", 1) for h in blh.HEADS]
    assert rows[0]["first_loss"] == pytest.approx(rows[1]["first_loss"], rel=1e-6)
    assert all(r["step_s"] > 0 and r["process_peak_bytes"] > 0 for r in rows)


def test_labels_cover_about_half_of_each_row():
    batch = blh.make_batch(512, 4, 100, "cpu")
    supervised = (batch["labels"] != -100).float().mean(1)
    assert ((supervised >= 0.39) & (supervised <= 0.61)).all()


def test_table_gives_ratios_to_the_plain_head():
    rows = [dict(shape="s", head="plain", step_s=2.0, step_peak_bytes=1000, process_peak_bytes=5000, first_loss=1.0),
            dict(shape="s", head="chunked", step_s=1.0, step_peak_bytes=250, process_peak_bytes=4000, first_loss=1.0)]
    lines = blh.table(rows).splitlines()
    assert "| s | chunked | 1.00 s | 0.50x |" in lines[3] and "| 0.25x |" in lines[3]


@pytest.mark.slow  # two fresh processes, ~20 s
def test_quick_run_writes_json_and_markdown(tmp_path):
    assert blh.main(["--quick", "--steps", "1", "--output", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "quick" / "cpu" / "loss_head.json").read_text())
    assert [r["head"] for r in data["rows"]] == ["plain", "chunked"]
    assert "| tiny, batch 2 x 64 | chunked |" in (tmp_path / "quick" / "cpu" / "loss_head.md").read_text()
