"""finetune.tiled_loss: the tiled head + loss equals the plain one (value and gradients) and is installed only where it
is right."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from ds_configs.memory import TILED_AUTO_MIN_BYTES
from finetune import tiled_loss


def _plain_sum(hidden, weight, bias, labels):
    """transformers' ForCausalLMLoss with num_items_in_batch=1: fp32 logits, shifted labels, summed."""
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )


def _labels(b, t, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (b, t), generator=g)
    labels[torch.rand(b, t, generator=g) < 0.3] = -100  # prompt tokens and sample starts carry no target
    return labels


@pytest.mark.parametrize("bias", [False, True])
def test_value_and_gradients_equal_the_plain_loss_on_a_152k_vocabulary(bias):
    vocab, hidden_size = 152_064, 16
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 96, hidden_size, generator=g, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size, generator=g) * 0.05).requires_grad_()
    b = (torch.randn(vocab, generator=g) * 0.05).requires_grad_() if bias else None
    labels = _labels(2, 96, vocab)
    ref = _plain_sum(hidden, weight, b, labels)
    ref_grads = torch.autograd.grad(ref, [hidden, weight] + ([b] if bias else []))
    tile = 37  # several tiles, the last one partial
    got = tiled_loss.tiled_cross_entropy_sum(hidden, weight, b, labels, tile)
    got_grads = torch.autograd.grad(got, [hidden, weight] + ([b] if bias else []))
    assert float(got) == pytest.approx(float(ref), rel=1e-5)
    for name, x, y in zip(("hidden", "weight", "bias"), got_grads, ref_grads, strict=False):
        assert torch.allclose(x, y, rtol=1e-5, atol=1e-7), name


def test_a_frozen_head_gets_no_weight_gradient_and_no_grad_mode_computes_none():
    hidden = torch.randn(1, 20, 8, requires_grad=True)
    weight = torch.randn(50, 8)  # frozen (LoRA): only the hidden states need a gradient
    labels = _labels(1, 20, 50)
    loss = tiled_loss.tiled_cross_entropy_sum(hidden, weight, None, labels, 7)
    (gh,) = torch.autograd.grad(loss, [hidden])
    ref = _plain_sum(hidden, weight, None, labels)
    assert torch.allclose(gh, torch.autograd.grad(ref, [hidden])[0], rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        assert float(tiled_loss.tiled_cross_entropy_sum(hidden, weight, None, labels, 7)) == pytest.approx(float(ref))


class _Engine:
    """What summed_loss needs of a DeepSpeed engine: a callable model and its device."""

    def __init__(self, model):
        self.model, self.device = model, torch.device("cpu")

    def __call__(self, **kwargs):
        return self.model(**kwargs)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "lora"])
def test_installed_on_a_model_the_loss_and_every_gradient_equal_the_models_own(tiny_llama_dir, tiny_gpt2_dir, arch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir if arch == "gpt2" else tiny_llama_dir)
    if arch == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    model.train()
    vocab = model.config.vocab_size if arch != "lora" else model.get_base_model().config.vocab_size
    batch = {"input_ids": torch.randint(0, vocab, (2, 24)), "labels": _labels(2, 24, vocab, seed=3)}
    plain = copy.deepcopy(model)
    keys = set(model.state_dict())
    head = tiled_loss.install(model, mode="always", tokens_per_micro_batch=48)
    assert head is not None and set(model.state_dict()) == keys  # the head's weights keep their names (final/)

    torch.manual_seed(0)  # GPT-2 has dropout: the same masks in both forwards
    ref = tiled_loss.summed_loss(_Engine(plain), batch, None)
    torch.manual_seed(0)
    got = tiled_loss.summed_loss(_Engine(model), batch, head)
    assert float(got) == pytest.approx(float(ref), rel=1e-5)
    ref.backward()
    got.backward()
    params = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, params[name].grad, rtol=1e-4, atol=1e-6), name
    # outside summed_loss the head is the plain head again (generation, export)
    model.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch["input_ids"]).logits, plain(input_ids=batch["input_ids"]).logits)


def test_install_only_where_it_is_right(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    vocab = model.config.vocab_size
    assert tiled_loss.install(model, mode="never", tokens_per_micro_batch=10**9) is None
    small = TILED_AUTO_MIN_BYTES // (4 * vocab)
    assert tiled_loss.install(model, mode="auto", tokens_per_micro_batch=small) is None  # no memory to save
    assert tiled_loss.install(copy.deepcopy(model), mode="auto", tokens_per_micro_batch=small + 1) is not None
    capped = copy.deepcopy(model)
    capped.config.final_logit_softcapping = 30.0  # Gemma-2 style: logits change after the head
    assert tiled_loss.install(capped, mode="always", tokens_per_micro_batch=1) is None
