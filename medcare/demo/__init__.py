"""The bundled demo: a tiny Qwen2-architecture model taken through MedCare's whole pipeline on CPU.

    python -m medcare.train                     # writes ./medcare-demo (or -2, -3, ... if taken)
    python -m medcare.train demo --output DIR

It writes a small medical instruction data set (stage 1: knowledge Q&A mixed with alignment tasks; stage 2:
alignment tasks only), a byte-level BPE tokenizer with the ChatML chat template, and a randomly initialised
Qwen2 model as a normal Hugging Face checkpoint in <output>/base; then runs stage 1, stage 2 and export with
exactly the commands it prints, and checks that the exported plain checkpoint computes what the stage-2
adapters compute.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import sys
import time

import torch

# (condition, drug, symptom) in English and Chinese: enough structure for knowledge questions and for
# extraction-style alignment tasks.
FACTS = [
    ("hypertension", "amlodipine", "headache", "高血压", "氨氯地平", "头痛"),
    ("type 2 diabetes", "metformin", "frequent urination", "2型糖尿病", "二甲双胍", "多尿"),
    ("asthma", "salbutamol", "wheezing", "哮喘", "沙丁胺醇", "喘息"),
    ("gastric ulcer", "omeprazole", "epigastric pain", "胃溃疡", "奥美拉唑", "上腹痛"),
    ("hyperlipidemia", "atorvastatin", "no symptoms", "高脂血症", "阿托伐他汀", "无明显症状"),
    ("gout", "colchicine", "joint swelling", "痛风", "秋水仙碱", "关节肿胀"),
    ("hypothyroidism", "levothyroxine", "fatigue", "甲状腺功能减退", "左甲状腺素", "乏力"),
    ("atrial fibrillation", "warfarin", "palpitations", "心房颤动", "华法林", "心悸"),
    ("migraine", "sumatriptan", "throbbing headache", "偏头痛", "舒马曲坦", "搏动性头痛"),
    ("pneumonia", "amoxicillin", "cough and fever", "肺炎", "阿莫西林", "咳嗽发热"),
    ("epilepsy", "valproate", "seizures", "癫痫", "丙戊酸", "抽搐"),
    ("heart failure", "furosemide", "leg edema", "心力衰竭", "呋塞米", "下肢水肿"),
]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def knowledge_records() -> list[dict]:
    out = []
    for c, d, s, zc, zd, zs in FACTS:
        out += [
            {"conversations": [{"from": "human", "value": f"What is a common first-line drug for {c}?"},
                               {"from": "gpt", "value": f"{d.capitalize()} is a common first-line drug for {c}."}]},
            {"conversations": [{"from": "human", "value": f"Which symptom is typical of {c}?"},
                               {"from": "gpt", "value": f"A typical symptom of {c} is {s}."}]},
            {"conversations": [{"from": "human", "value": f"{zc}的常用一线药物是什么？"},
                               {"from": "gpt", "value": f"{zd}是{zc}的常用一线药物。"}]},
        ]
    return out


def alignment_records() -> list[dict]:
    out = []
    rng = random.Random(0)
    for c, d, s, zc, zd, zs in FACTS:
        other = rng.choice([f for f in FACTS if f[0] != c])
        note = f"Patient with {c} and {other[0]} takes {d} and {other[1]}."
        out += [
            {"messages": [{"role": "system", "content": "You extract structured facts from clinical notes."},
                          {"role": "user", "content": f"List the drugs in this note: {note}"},
                          {"role": "assistant", "content": f"drugs: {d}; {other[1]}"}]},
            {"messages": [{"role": "user", "content": f"病历：患者{zc}，主诉{zs}。请抽取疾病和症状。"},
                          {"role": "assistant", "content": f"疾病：{zc}；症状：{zs}"}]},
        ]
    return out


def write_data(out_dir: str) -> tuple[str, str]:
    """stage1.jsonl (knowledge + alignment, conversations/messages mixed), stage2.json (alignment only)."""
    os.makedirs(out_dir, exist_ok=True)
    s1, s2 = os.path.join(out_dir, "stage1.jsonl"), os.path.join(out_dir, "stage2.json")
    records = knowledge_records() + alignment_records()
    random.Random(1).shuffle(records)
    with open(s1, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(s2, "w", encoding="utf-8") as f:
        json.dump(alignment_records(), f, ensure_ascii=False, indent=1)
    return s1, s2


def build_tokenizer(texts: list[str]):
    """A byte-level BPE trained on the demo texts, with Qwen's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"], model_max_length=512)
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_base_model(out_dir: str, texts: list[str]) -> str:
    """A randomly initialised tiny Qwen2 causal LM + tokenizer, saved as a normal HF checkpoint."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer(texts)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _texts(paths: tuple[str, str]) -> list[str]:
    from ..data import load_records

    texts = []
    for conv in load_records(list(paths)).records:
        texts += [t["content"] for t in conv]
    return texts + ["system user assistant You are a helpful assistant."]


def _free_dir(base: str) -> str:
    path, n = base, 1
    while os.path.exists(path) and os.listdir(path):
        n += 1
        path = f"{base}-{n}"
    return path


TRAIN_FLAGS = ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--learning_rate",
               "3e-3", "--logging_steps", "5", "--save_strategy", "no", "--warmup_steps", "0.1",
               "--dataloader_num_workers", "0"]


def _run(argv: list[str]):
    from ..train import COMMANDS

    print(f"\n$ python -m medcare.train {shlex.join(argv)}", flush=True)
    return COMMANDS[argv[0]](argv[1:])


@torch.no_grad()
def expert_load(base: str, stage1: str, data_path: str, max_records: int = 64) -> torch.Tensor:
    """Share of routed slots each expert received, over every MoLoRA projection, on the stage-1 data:
    a forward pass of the stage-1 model with hooks that recompute each projection's top-k routing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import medcare_kernels as mk

    from .. import checkpoint as ckpt
    from ..data import SupervisedDataset, load_records
    from ..inject import adapter_modules, apply_stage1
    from ..layers import MoLoRALinear

    stage = ckpt.read_stage(stage1, expect_stage=1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    apply_stage1(model, stage.stage1)
    ckpt.load_adapter_state(model, stage.tensors)
    counts = torch.zeros(stage.stage1.num_experts)

    def hook(module, args):
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        _, idx = mk.route_topk(torch.nn.functional.linear(x, module.router_weight, module.router_bias), module.top_k)
        counts.add_(torch.bincount(idx.flatten(), minlength=module.num_experts).float())

    for _, m in adapter_modules(model, MoLoRALinear):
        m.register_forward_pre_hook(hook)
    tokenizer = AutoTokenizer.from_pretrained(base)
    dataset = SupervisedDataset(load_records([data_path]).records[:max_records], tokenizer)
    for i in range(len(dataset)):
        model(torch.tensor([dataset[i]["input_ids"]]))
    return counts / counts.sum()


@torch.no_grad()
def verify_export(base: str, stage2: str, export: str, sample: list[dict]) -> float:
    """Max |logits(stage-2 adapters) - logits(exported plain model)| on one demo conversation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .. import checkpoint as ckpt
    from ..config import Stage2Config

    tokenizer = AutoTokenizer.from_pretrained(export)
    ids = torch.tensor([tokenizer.apply_chat_template(sample, tokenize=True)["input_ids"]])
    stage2_dir = ckpt.read_stage(stage2, expect_stage=2)
    adapted = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    s1 = ckpt.load_stage1(stage2_dir.meta["stage1_dir"])
    ckpt.transition(adapted, s1, Stage2Config(**stage2_dir.meta["stage2"]))
    ckpt.load_adapter_state(adapted, stage2_dir.tensors, roles=("knowledge", "alignment"))
    exported = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    return (adapted(ids).logits - exported(ids).logits).abs().max().item()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m medcare.train demo", description=__doc__.split("\n")[0])
    ap.add_argument("--output", default=None, help="demo directory (default ./medcare-demo, or the next free -N)")
    ap.add_argument("--epochs", default="4", help="epochs of each stage (default 4)")
    args = ap.parse_args(argv or [])
    t0 = time.time()
    out = os.path.abspath(args.output or _free_dir("medcare-demo"))
    if os.path.exists(out) and os.listdir(out):
        print(f"medcare: error: {out} already exists and is not empty; choose a new --output", file=sys.stderr)
        return 2
    data = write_data(os.path.join(out, "data"))
    base = build_base_model(os.path.join(out, "base"), _texts(data))
    print(f"medcare demo: data in {out}/data, tiny Qwen2 base model + tokenizer in {base}")
    flags = TRAIN_FLAGS + ["--num_train_epochs", args.epochs]
    s1, s2, ex = (os.path.join(out, d) for d in ("stage1", "stage2", "export"))
    commands = [["stage1", "--model", base, "--data", data[0], "--output", s1, *flags],
                ["stage2", "--model", base, "--stage1", s1, "--data", data[1], "--output", s2, *flags],
                ["export", "--stage2", s2, "--output", ex]]
    r1, r2, _ = (_run(c) for c in commands)
    load = expert_load(base, s1, data[0])
    err = verify_export(base, s2, ex, alignment_records()[0]["messages"])
    print(summary(r1, r2, load, err, (s1, s2, ex), commands, time.time() - t0))
    return 0


def _span(values: list[float]) -> str:
    return f"{values[0]:.3f} -> {values[-1]:.3f}" if values else "not logged"


def summary(r1, r2, load: torch.Tensor, err: float, paths, commands, seconds: float) -> str:
    s1, s2, ex = paths
    orth = r2.logged("orth_loss_start")[:1] + r2.logged("orth_loss")[-1:]
    experts = " ".join(f"e{i} {100 * v:.0f}%" for i, v in enumerate(load.tolist()))
    lines = [f"\nmedcare demo: done in {seconds:.0f} s",
             f"  stage 1  loss {_span(r1.logged('loss'))}                  {s1}",
             f"           expert load (share of routed slots, all MoLoRA projections): {experts}",
             f"  stage 2  loss (CE + lambda * orth) {_span(r2.logged('loss'))}, orth penalty {_span(orth)}   {s2}",
             f"  export   plain HF checkpoint, max |logit diff| vs stage-2 adapters {err:.1e}   {ex}",
             "Redo each step by hand:"]
    lines += [f"  python -m medcare.train {shlex.join(c)}" for c in commands]
    return "\n".join(lines)
