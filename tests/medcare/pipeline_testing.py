"""Helpers shared by the pipeline tests (layers, inject, losses, checkpoint, train): tiny decoder LMs built
from configs (never from a hub), small stage configs, adapter randomisation and logits. Tokenizers come
from tests/medcare/conftest.py fixtures and are passed in."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from medcare.config import Stage1Config, Stage2Config, resolve_stage2
from medcare.inject import adapter_modules

ARCHS = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}
NUM_LAYERS = 2
HIDDEN, INTERMEDIATE = 32, 64
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def tiny_config(arch: str = "qwen2", vocab_size: int = 477, **overrides):
    config_cls, _ = ARCHS[arch]
    kw = dict(vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
              num_hidden_layers=NUM_LAYERS, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, tie_word_embeddings=False)
    kw.update(overrides)
    return config_cls(**kw)


def tiny_model(arch: str = "qwen2", vocab_size: int = 477, seed: int = 0, **overrides):
    """A randomly initialised fp32 model in eval mode."""
    torch.manual_seed(seed)
    _, model_cls = ARCHS[arch]
    model = model_cls(tiny_config(arch, vocab_size, **overrides)).float()
    return model.eval()


def save_base(path, model, tokenizer) -> str:
    path = str(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def stage1_config(**overrides) -> Stage1Config:
    """Small ranks; mlp scaling 8/4 = 2 = Stage2Config's default scaling; no dropout anywhere."""
    kw = dict(attn_rank=4, attn_alpha=8.0, attn_dropout=0.0, num_experts=4, top_k=2, expert_rank=4,
              shared_rank=8, mlp_alpha=8.0, mlp_dropout=0.0)
    kw.update(overrides)
    return Stage1Config(**kw)


def stage2_config(**overrides) -> Stage2Config:
    """A resolved stage-2 config (rank 6, scaling 2, no dropout, lambda 1; targets the MLP projections)."""
    kw = dict(rank=6, scaling=2.0, dropout=0.0, orth_lambda=1.0)
    kw.update(overrides)
    return resolve_stage2(Stage2Config(**kw), None)


@torch.no_grad()
def randomize_adapters(model, std: float = 0.05) -> None:
    """Every adapter parameter (A, B, router) of every medcare module gets N(0, std^2) values."""
    for _, module in adapter_modules(model):
        for p in module.parameters(recurse=False):
            p.normal_(std=std)


@torch.no_grad()
def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = model(input_ids=input_ids).logits.float()
    model.train(was_training)
    return out


def input_ids(vocab_size: int = 477, batch: int = 2, length: int = 9, seed: int = 123) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=g)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def stage1_meta(cfg: Stage1Config, model, base_path: str = "base") -> dict:
    from medcare.checkpoint import model_fingerprint

    return {"stage": 1, "stage1": cfg.to_dict(),
            "base_model": {"path": os.path.abspath(base_path), "fingerprint": model_fingerprint(model.config)}}


def stage2_meta(cfg1: Stage1Config, cfg2: Stage2Config, model, stage1_dir: str, base_path: str) -> dict:
    """The layout medcare.train.run_stage2 writes."""
    from medcare.checkpoint import model_fingerprint

    return {"stage": 2, "stage1": cfg1.to_dict(), "stage2": cfg2.to_dict(),
            "stage1_dir": os.path.abspath(stage1_dir),
            "base_model": {"path": os.path.abspath(base_path), "fingerprint": model_fingerprint(model.config)}}


QUESTIONS = ["What is the usual adult dose of aspirin?", "Which symptom is typical of asthma?",
             "患者头痛三天，伴有发热和咳嗽。", "What is a common first-line drug for gout?",
             "Please format the final answer at the end.", "请在回答的最后用以下格式回答。",
             "Is metformin used for diabetes?", "What should a patient with a fever do?"]
ANSWERS = ["The answer is B. Take 500 mg twice a day with food.", "Wheezing.",
           "建议多喝水，注意休息，必要时就医。", "Colchicine is a common first-line drug for gout.",
           "The answer is C.", "答案为A。", "Yes, metformin is a first-line drug for type 2 diabetes.",
           "Drink water and rest; see a doctor if it lasts more than three days."]


def records(n: int = 8) -> list[dict]:
    """n conversations of different lengths (both record formats)."""
    out = []
    for i in range(n):
        q, a = QUESTIONS[i % len(QUESTIONS)], ANSWERS[i % len(ANSWERS)]
        if i % 2:
            out.append({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]})
        else:
            out.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return out


def write_jsonl(path, recs) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


# ------------------------------------------------------------------ the original implementation's stage 1
OFFICIAL_R, OFFICIAL_ALPHA, OFFICIAL_E, OFFICIAL_K = 4, 8, 11, 2  # 11 experts: "10" must sort after "9"


def fabricate_official_stage1(path, model) -> tuple[dict, dict]:
    """An original MedCare stage-1 directory for `model`'s shapes, with random tensors. Returns the raw
    MLP dict (non_lora_trainables.bin) and the raw attention dict (adapter_model.safetensors)."""
    os.makedirs(path, exist_ok=True)
    g = torch.Generator().manual_seed(5)

    def rnd(*shape, std=0.1):
        return torch.randn(*shape, generator=g) * std

    raw, attn = {}, {}
    r, e = OFFICIAL_R, OFFICIAL_E
    for i in range(NUM_LAYERS):
        for p in MLP:
            lin = getattr(model.model.layers[i].mlp, p)
            pre = f"base_model.model.model.layers.{i}.mlp.{p}"
            raw[f"{pre}.switch.weight"] = rnd(e, lin.in_features, std=0.5)
            raw[f"{pre}.switch.bias"] = rnd(e, std=0.5)
            for j in range(e):
                raw[f"{pre}.experts.{j}.lora_A_{j}.weight"] = rnd(r, lin.in_features)
                raw[f"{pre}.experts.{j}.lora_B_{j}.weight"] = rnd(lin.out_features, r)
            raw[f"{pre}.share_experts.lora_A.weight"] = rnd(2 * r, lin.in_features)
            raw[f"{pre}.share_experts.lora_B.weight"] = rnd(lin.out_features, 2 * r)
        for p in ATTN:
            lin = getattr(model.model.layers[i].self_attn, p)
            pre = f"base_model.model.model.layers.{i}.self_attn.{p}"
            attn[f"{pre}.lora_A.weight"] = rnd(r, lin.in_features)
            attn[f"{pre}.lora_B.weight"] = rnd(lin.out_features, r)
    torch.save(raw, os.path.join(path, "non_lora_trainables.bin"))
    save_file(attn, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": r, "lora_alpha": OFFICIAL_ALPHA, "lora_dropout": 0.05,
                   "target_modules": list(ATTN), "task_type": "CAUSAL_LM"}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**model.config.to_dict(), "num_experts": e, "num_experts_per_token": OFFICIAL_K}, f)
    return raw, attn


def one_thread():
    """Generator body of a module-scoped autouse fixture: the tiny models run on one intra-op thread.
    Their GEMMs are far too small to gain from two, and on a shared 2-core machine a second thread that
    spins waiting for a busy core makes every op many times slower. The previous setting is restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_train(argv) -> int:
    """medcare.train.main in this process, seeded first: stage 2's fresh alignment A is drawn before the Trainer
    seeds itself, so every run of the same argv starts from the same weights."""
    from medcare import train

    torch.manual_seed(0)
    return train.main([str(a) for a in argv])


def logged_steps(output_dir) -> list[dict]:
    """The per-step log entries (loss, orth_loss, expert_load_cv, ...) of a run, as it saved them in its output
    directory (trainer_state.json's log_history); the end-of-run summary is left out."""
    with open(os.path.join(str(output_dir), "trainer_state.json")) as f:
        history = json.load(f)["log_history"]
    return [entry for entry in history if "loss" in entry and "train_loss" not in entry]


def last_stderr_line(capfd) -> str:
    """The last non-empty line a run wrote to stderr (after other output, e.g. a training run's), no traceback."""
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    return lines[-1]


def user_error_line(capfd) -> str:
    """How the CLI reports a user mistake: stderr is exactly one line, `medcare: error: ...`, no traceback."""
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("medcare: error: "), err
    return lines[0]


def pipeline_env(tmp_path_factory, tokenizer, name: str, n_records: int) -> dict:
    """A folder with a tiny Qwen2 base checkpoint and n_records training records: dict(root, base, data)."""
    root = tmp_path_factory.mktemp(name)
    base = save_base(root / "base", tiny_model("qwen2", len(tokenizer)), tokenizer)
    return dict(root=root, base=base, data=write_jsonl(root / "data.jsonl", records(n_records)))


def multiprocess_env(root, tokenizer) -> dict:
    """What the multi-process tests (test_distributed, test_deepspeed) train from: a saved tiny Qwen2 base, a
    stage-1 directory with random adapters, and 12 records of data."""
    from medcare.checkpoint import adapter_state, save_stage
    from medcare.inject import apply_stage1

    base = save_base(root / "base", tiny_model("qwen2", len(tokenizer)), tokenizer)
    model = tiny_model("qwen2", len(tokenizer))
    apply_stage1(model, stage1_config())
    randomize_adapters(model, std=0.1)
    stage1 = save_stage(str(root / "stage1"), adapter_state(model), stage1_meta(stage1_config(), model, base))
    return dict(root=root, base=base, stage1=stage1, data=write_jsonl(root / "data.jsonl", records(12)))
