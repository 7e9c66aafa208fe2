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


def roles(stage_dir: str) -> set[str]:
    return {k.rsplit(".", 2)[1] for k in load_file(os.path.join(stage_dir, "adapter.safetensors"))}


def meta(stage_dir) -> dict:
    return json.loads((stage_dir / "medcare_adapter.json").read_text())


@pytest.mark.slow
def test_variants_train_what_they_should_and_a_killed_ablation_resumes(tmp_path, capsys):
    out = tmp_path / "ab"
    argv = ["--tiny", "--max-steps", "2", "--output", str(out)]  # step 1 is warm-up at lr 0
    assert ablate.main([*argv, "--variants", "medcare,freeze_knowledge,single_stage,no_noise"]) == 0
    seed = out / "seed-0"
    # MedCare's stage 1: attention LoRA, routed experts with their routers, shared LoRA.
    assert roles(str(seed / "stage1")) == {"attention", "experts", "router", "shared"}
    start = shared(str(seed / "stage1"))
    assert start and knowledge(str(seed / "freeze_knowledge" / "stage2")).keys() == start.keys()
    for name, tensor in knowledge(str(seed / "freeze_knowledge" / "stage2")).items():
        assert (tensor == start[name]).all(), name  # frozen: the knowledge LoRA is stage 1's shared LoRA
    moved = knowledge(str(seed / "medcare" / "stage2"))
    assert any((moved[n] != start[n]).any() for n in start)  # trainable in MedCare's stage 2
    assert meta(seed / "freeze_knowledge" / "stage2")["stage2"]["freeze_knowledge"] is True
    assert meta(seed / "medcare" / "stage2")["stage2"]["orth_lambda"] == 1.0
    # No noise aggregator: its own stage 1 has the attention and shared LoRA only; stage 2 continues from it.
    assert roles(str(seed / "no_noise" / "stage1")) == {"attention", "shared"}
    assert meta(seed / "no_noise" / "stage1")["stage1"]["num_experts"] == 0
    assert meta(seed / "no_noise" / "stage2")["stage1_dir"] == str(seed / "no_noise" / "stage1")
    # Single stage: one LoRA run (no experts) of MedCare's final MLP rank, on stage-1 x2 + stage-2 x2 records.
    single = meta(seed / "single_stage" / "train")
    assert roles(str(seed / "single_stage" / "train")) == {"attention", "shared"}
    assert single["stage"] == 1 and single["stage1"]["num_experts"] == 0
    assert single["stage1"]["shared_rank"] == 2 * meta(seed / "medcare" / "stage2")["stage2"]["rank"]
    report = json.loads((out / "ablation.json").read_text())
    budget = report["budget"]
    lines = (out / "data" / "single_stage.jsonl").read_text().splitlines()
    assert len(lines) == budget["sequences"] == 2 * budget["stage1_records"] + 2 * budget["stage2_records"]
    assert list(report["rows"]) == ["stage 1", "stage 1, shared LoRA only", "medcare", "freeze_knowledge",
                                    "single_stage", "no_noise"] and report["seeds"] == 1
    assert report["refs"] == {"medcare": "stage 1", "freeze_knowledge": "stage 1",
                              "no_noise": "stage 1, shared LoRA only"}
    for name in ("medcare", "freeze_knowledge", "single_stage", "no_noise"):
        row = report["rows"][name]
        assert {"named", "cloze", "generate", "extraction", "classification", "train_seconds"} <= set(row)
    assert (out / "ablation.png").stat().st_size > 0
    table = (out / "ablation.md").read_text()
    for title in ("MedCare (orth penalty, lambda = 1)", "base", "stage 1", "single-stage LoRA on all the data",
                  "without the noise aggregator (stage 1: shared LoRA only)"):
        assert f"| {title} |" in table
    assert "one seed: no spread is measured" in table

    # "Killed" during no_orth's stage 2: its directory exists without a marker. Run again with one more variant:
    # finished steps are not redone (markers and outputs untouched), the unfinished one is redone from scratch.
    markers = {p: p.stat().st_mtime_ns for p in out.rglob("*.done")}
    (seed / "no_orth" / "stage2").mkdir(parents=True)
    (seed / "no_orth" / "stage2" / "partial.bin").write_bytes(b"x")
    capsys.readouterr()
    assert ablate.main([*argv, "--variants", "medcare,freeze_knowledge,single_stage,no_noise,no_orth"]) == 0
    printed = capsys.readouterr().out
    assert all(p.stat().st_mtime_ns == t for p, t in markers.items())
    assert printed.count("$ python -m medcare.train ") == 2  # no_orth's stage 2 and export, nothing else
    assert printed.count("$ python -m medcare.train stage2") == 1
    assert not (seed / "no_orth" / "stage2" / "partial.bin").exists()
    assert meta(seed / "no_orth" / "stage2")["stage2"]["orth_lambda"] == 0.0
    assert "no_orth" in json.loads((out / "ablation.json").read_text())["rows"]

    # The user's own model and data: the tiny base saved above and copies of the data under other names.
    mine = tmp_path / "mine"
    mine.mkdir()
    files = [mine / f"{name}.jsonl" for name in ("s1", "s2", "questions", "tasks")]
    for src, dst in zip(("stage1", "stage2", "eval", "eval_align"), files, strict=True):
        dst.write_text((out / "data" / f"{src}.jsonl").read_text())
    own = tmp_path / "own"
    assert ablate.main(["--model", str(out / "base"), "--data", *map(str, files), "--max-steps", "2",
                        "--variants", "no_orth", "--output", str(own)]) == 0
    report = json.loads((own / "ablation.json").read_text())
    assert report["base"] == str(out / "base") and report["data"] == list(map(str, files))
    assert meta(own / "seed-0" / "no_orth" / "stage2")["base_model"]["path"] == str(out / "base")
    assert not (own / "data" / "stage1.jsonl").exists()  # the demo's data was not used


@pytest.mark.parametrize("variants, message", [
    ("no_router", "unknown variant 'no_router'"),
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
    rows = ablate.summarise(base, per_seed, {"medcare": "stage 1"})["rows"]
    kept = rows["medcare"]["kept named"]
    assert kept["values"] == pytest.approx([0.5, 1.0]) and kept["mean"] == pytest.approx(0.75)
    assert kept["spread"] == pytest.approx(0.25)
    assert rows["medcare"]["kept cloze"]["values"] == pytest.approx([0.0, 0.5])
    assert rows["stage 1"]["named"]["mean"] == pytest.approx(0.65)


def test_single_stage_data_repeats_each_stage_as_often_as_medcare_trains_on_it(tmp_path):
    s1, s2 = tmp_path / "s1.jsonl", tmp_path / "s2.jsonl"
    s1.write_text('{"a": 1}\n{"a": 2}\n\n{"a": 3}')  # a blank line, and no newline at the end
    s2.write_text('{"b": 1}\n')
    budget = ablate.single_stage_data(str(s1), str(s2), ("2", "3"), str(tmp_path / "all.jsonl"))
    lines = (tmp_path / "all.jsonl").read_text().splitlines()
    assert budget == {"stage1_records": 3, "stage1_epochs": 2, "stage2_records": 1, "stage2_epochs": 3,
                      "sequences": 9}
    assert sorted(lines) == sorted(['{"a": 1}', '{"a": 2}', '{"a": 3}'] * 2 + ['{"b": 1}'] * 3)


def _report(values: dict[str, list[float]]) -> dict:
    per_seed = [{"stage 1": {"named": 0.5}, **{n: {"named": v[i]} for n, v in values.items()}}
                for i in range(len(values["medcare"]))]
    report = ablate.summarise({"named": 0.2}, per_seed, {n: "stage 1" for n in values})
    return {**report, "variants": {n: n for n in values}, "seeds": len(per_seed), "seconds": 1}


def test_verdict_says_whether_a_difference_exceeds_the_seed_spread():
    lines = ablate.verdict(_report({"medcare": [0.5, 0.6, 0.7], "no_orth": [0.45, 0.55, 0.6],
                                    "single_stage": [0.1, 0.15, 0.2]}))
    assert lines == ["- no_orth vs MedCare: named -6.7 (within the spread 17.5)",
                     "- single_stage vs MedCare: named -45.0 (beyond the spread 15.0)"]
    one = ablate.verdict(_report({"medcare": [0.5], "no_orth": [0.4]}))
    assert one[0] == "- no_orth vs MedCare: named -10.0" and "one seed: no spread is measured" in one[1]
    assert "(within the spread" in ablate.table(_report({"medcare": [0.5, 0.6], "no_orth": [0.5, 0.55]}))


@pytest.mark.parametrize("options, message", [
    (["--model", "{tmp}/no-such-model"], "no-such-model"),
    (["--model", "{tmp}", "--tiny"], "--model and --tiny exclude each other"),
    (["--data", "{tmp}/a.jsonl", "{tmp}/b.jsonl", "{tmp}/c.jsonl", "{tmp}/d.jsonl"],
     "--data {tmp}/a.jsonl: no such file"),
])
def test_bad_model_or_data_is_one_line_and_writes_nothing(tmp_path, capsys, options, message):
    options = [o.replace("{tmp}", str(tmp_path)) for o in options]
    assert ablate.main([*options, "--output", str(tmp_path / "ab")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medcare.ablate: error: "), err
    assert message.replace("{tmp}", str(tmp_path)) in err[0]
    assert not (tmp_path / "ab").exists()
