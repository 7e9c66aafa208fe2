"""medcare.loss_head on tiny Qwen2 / Llama models: the chunked head gives the model's own loss and gradients
(padding, a row without labels, num_items_in_batch, tied embeddings, stage-1 adapters, gradient
checkpointing), leaves eval / generation alone, is refused where it would not be exact, and comes off cleanly."""

from __future__ import annotations

import copy

import pytest
import torch
from pipeline_testing import randomize_adapters, stage1_config, tiny_model
from torch import nn

import medcare_kernels as mk
from medcare import loss_head
from medcare.inject import apply_stage1

VOCAB = 477


def batch(seed: int = 0) -> dict:
    """Three rows: a prompt masked out, right padding, and one row with no label at all."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[0, :5] = -100
    mask[1, 9:], labels[1, 9:] = 0, -100
    labels[2] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def loss_and_grads(model, inputs, **kw):
    out = model(**inputs, **kw)
    params = [p for p in model.parameters() if p.requires_grad]
    return out.loss.detach(), torch.autograd.grad(out.loss, params)


def pair(arch: str, tie: bool, adapters: bool = False):
    model = tiny_model(arch, VOCAB, tie_word_embeddings=tie)
    if adapters:
        apply_stage1(model, stage1_config())
        randomize_adapters(model)
    return model.train(), copy.deepcopy(model).train()


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("num_items", [None, 23])
def test_same_loss_and_gradients_as_the_models_own_head(arch, tie, num_items):
    chunked, plain = pair(arch, tie)
    kw = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    want_loss, want_grads = loss_and_grads(plain, batch(), **kw)
    installed = loss_head.install(chunked)
    assert isinstance(chunked.lm_head, loss_head.ChunkedLMHead)
    assert (chunked.lm_head.weight is chunked.model.embed_tokens.weight) == tie
    got_loss, got_grads = loss_and_grads(chunked, batch(), **kw)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    installed.remove()
    assert type(chunked.lm_head) is nn.Linear and "_loss_function" not in vars(chunked)


def test_stage1_adapters_get_the_plain_gradient_under_gradient_checkpointing():
    chunked, plain = pair("qwen2", tie=False, adapters=True)
    for m in (chunked, plain):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        m.enable_input_require_grads()
    want_loss, want_grads = loss_and_grads(plain, batch(1))
    loss_head.install(chunked)
    calls = []
    real = mk.linear_cross_entropy

    def spy(*args, **kw):
        calls.append(args[0].shape)
        return real(*args, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mk, "linear_cross_entropy", spy)
        got_loss, got_grads = loss_and_grads(chunked, batch(1))
    assert calls == [torch.Size([3, 12, 32])]  # the head ran once, on the final hidden states
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_eval_mode_and_calls_without_labels_get_plain_logits():
    chunked, plain = pair("llama", tie=True)
    loss_head.install(chunked)
    inputs = batch()
    torch.testing.assert_close(chunked(input_ids=inputs["input_ids"]).logits,
                               plain(input_ids=inputs["input_ids"]).logits)
    chunked.eval(), plain.eval()
    out, ref = chunked(**inputs), plain(**inputs)  # eval with labels: logits and the model's own loss
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(out.loss, ref.loss)
    generated = chunked.generate(inputs["input_ids"][:1, :4], max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(generated, plain.generate(inputs["input_ids"][:1, :4], max_new_tokens=3,
                                                         do_sample=False))


def test_training_forward_with_labels_computes_no_logits():
    chunked, _ = pair("qwen2", tie=False)
    loss_head.install(chunked)
    inputs = batch()
    out = chunked(**inputs)
    supervised = int((inputs["labels"][:, 1:] != -100).sum())
    assert out.logits.dim() == 0  # the loss sum stands in for the logits, which never existed
    torch.testing.assert_close(out.loss, out.logits / supervised)


def test_a_model_that_scales_its_logits_keeps_its_own_head():
    model = tiny_model("qwen2", VOCAB)
    model.config.final_logit_softcapping = 30.0
    assert "scales the logits (final_logit_softcapping)" in loss_head.unsupported(model)
    with pytest.raises(ValueError, match="the chunked loss head does not apply"):
        loss_head.install(model)
    assert type(model.lm_head) is nn.Linear


def test_an_unchecked_architecture_keeps_its_own_head():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2))
    assert "GPT2LMHeadModel is not one of the architectures" in loss_head.unsupported(model)


def test_an_explicit_backend_without_the_op_falls_back_to_torch(monkeypatch):
    chunked, plain = pair("qwen2", tie=False)
    loss_head.install(chunked)
    monkeypatch.setenv("MEDCARE_KERNELS_BACKEND", "ext" if mk.HAS_EXT else "torch")
    torch.testing.assert_close(chunked(**batch()).loss, plain(**batch()).loss, rtol=1e-6, atol=1e-6)


class _Args:
    def __init__(self, n_gpu: int):
        self.n_gpu, self.process_index = n_gpu, 0


def test_fit_installs_it_by_default_and_says_in_one_line_why_not(capsys):
    from medcare.trainer import install_loss_head

    model = tiny_model("qwen2", VOCAB)
    assert install_loss_head(model, _Args(1), chunked_loss=False) is None
    assert type(model.lm_head) is nn.Linear and capsys.readouterr().out == ""
    installed = install_loss_head(model, _Args(1), chunked_loss=True)
    assert isinstance(model.lm_head, loss_head.ChunkedLMHead)
    installed.remove()
    assert install_loss_head(model, _Args(2), chunked_loss=True) is None  # DataParallel replicas
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("medcare: the chunked loss head is off: 2 GPUs in one process")
    assert type(model.lm_head) is nn.Linear


def test_a_forward_that_keeps_only_some_logits_gets_the_models_own_loss():
    chunked, plain = pair("qwen2", tie=False)
    loss_head.install(chunked)
    inputs = batch()
    keep = torch.arange(12)  # every position, named by a tensor: the head does not guess, the model's loss runs
    torch.testing.assert_close(chunked(**inputs, logits_to_keep=keep).loss, plain(**inputs, logits_to_keep=keep).loss)
