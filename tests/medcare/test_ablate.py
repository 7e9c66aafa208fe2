"""medcare.ablate on the tiny model (two optimizer steps per stage): every variant trains what it should and only
that, the table, JSON and chart are written, and a killed ablation continues without redoing finished steps."""

from __future__ import annotations

import json
import os

import pytest
from safetensors.torch import load_file

from medcare import ablate


def knowledge(stage2: str) -> dict:
    return {k.replace(".knowledge.", "."): v for k, v in load_file(os.path.join(stage2, "adapter.safetensors")).items()
            if ".knowledge." in k}


def shared(stage1: str) -> dict:
    return {k.replace(".shared.", "."): v for k, v in load_file(os.path.join(stage1, "adapter.safetensors")).items()
            if ".shared." in k}


@pytest.mark.slow
def test_variants_train_what_they_should_and_a_killed_ablation_resumes(tmp_path, capsys):
    out = tmp_path / "ab"
    argv = ["--tiny", "--max-steps", "2", "--output", str(out)]  # step 1 is warm-up at lr 0
    assert ablate.main([*argv, "--variants", "medcare,freeze_knowledge"]) == 0
    seed = out / "seed-0"
    start = shared(str(seed / "stage1"))
    assert start and knowledge(str(seed / "freeze_knowledge" / "stage2")).keys() == start.keys()
    for name, tensor in knowledge(str(seed / "freeze_knowledge" / "stage2")).items():
        assert (tensor == start[name]).all(), name  # frozen: the knowledge LoRA is stage 1's shared LoRA
    moved = knowledge(str(seed / "medcare" / "stage2"))
    assert any((moved[n] != start[n]).any() for n in start)  # trainable in MedCare's stage 2
    meta = json.loads((seed / "freeze_knowledge" / "stage2" / "medcare_adapter.json").read_text())
    assert meta["stage2"]["freeze_knowledge"] is True and meta["stage2"]["orth_lambda"] == 1.0
    report = json.loads((out / "ablation.json").read_text())
    assert set(report["rows"]) == {"stage 1", "medcare", "freeze_knowledge"} and report["seeds"] == 1
    for name in ("medcare", "freeze_knowledge"):
        row = report["rows"][name]
        assert {"named", "cloze", "generate", "extraction", "classification", "stage2_seconds"} <= set(row)
    assert (out / "ablation.png").stat().st_size > 0
    table = (out / "ablation.md").read_text()
    assert "| MedCare (orth penalty, lambda = 1) |" in table and "| base |" in table and "| stage 1 |" in table

    # "Killed" during no_orth's stage 2: its directory exists without a marker. Run again with one more variant:
    # finished steps are not redone (markers and outputs untouched), the unfinished one is redone from scratch.
    markers = {p: p.stat().st_mtime_ns for p in out.rglob("*.done")}
    (seed / "no_orth" / "stage2").mkdir(parents=True)
    (seed / "no_orth" / "stage2" / "partial.bin").write_bytes(b"x")
    capsys.readouterr()
    assert ablate.main([*argv, "--variants", "medcare,freeze_knowledge,no_orth"]) == 0
    printed = capsys.readouterr().out
    assert all(p.stat().st_mtime_ns == t for p, t in markers.items())
    assert printed.count("$ python -m medcare.train stage2") == 1 and "stage1 " not in printed.split("$ ")[-1]
    assert not (seed / "no_orth" / "stage2" / "partial.bin").exists()
    meta = json.loads((seed / "no_orth" / "stage2" / "medcare_adapter.json").read_text())
    assert meta["stage2"]["orth_lambda"] == 0.0
    assert set(json.loads((out / "ablation.json").read_text())["rows"]) == {"stage 1", "medcare",
                                                                           "freeze_knowledge", "no_orth"}


@pytest.mark.parametrize("variants, message", [
    ("single_stage", "single_stage (single-stage LoRA on all the data) is not built yet"),
    ("medcare,lora", "unknown variant 'lora'"),
    (",", "--variants is empty"),
])
def test_bad_variants_are_one_line(tmp_path, capsys, variants, message):
    assert ablate.main(["--tiny", "--variants", variants, "--output", str(tmp_path / "ab")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medcare.ablate: error: ") and message in err[0]
    assert not (tmp_path / "ab").exists()


def test_summary_keeps_the_share_of_stage_1_gain_and_the_spread():
    base = {"named": 0.2, "cloze": 0.3}
    per_seed = [{"stage 1": {"named": 0.6, "cloze": 0.5}, "medcare": {"named": 0.4, "cloze": 0.3}},
                {"stage 1": {"named": 0.7, "cloze": 0.5}, "medcare": {"named": 0.7, "cloze": 0.4}}]
    rows = ablate.summarise(base, per_seed, ["medcare"])["rows"]
    kept = rows["medcare"]["kept named"]
    assert kept["values"] == pytest.approx([0.5, 1.0]) and kept["mean"] == pytest.approx(0.75)
    assert kept["spread"] == pytest.approx(0.25)
    assert rows["medcare"]["kept cloze"]["values"] == pytest.approx([0.0, 0.5])
    assert rows["stage 1"]["named"]["mean"] == pytest.approx(0.65)
