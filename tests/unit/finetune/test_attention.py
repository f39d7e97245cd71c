"""Packing correctness: a packed batch gives each sample the logits and loss it gets alone, in every attention mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_tools.loading.packing import collate_packed
from finetune.attention import (
    CHOICES,
    configure_model_for_packing,
    cu_seqlens_from_position_ids,
    model_supports,
    resolve_attention,
)

LENGTHS = [[7, 12, 5], [9, 3, 14]]  # two packed rows of three samples each, with padding at the ends
SEQ_LEN = 32


def _rows(vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [
        [(rng.integers(5, vocab, n), (rng.random(n) < 0.7).astype(np.uint8)) for n in row_lengths]
        for row_lengths in LENGTHS
    ]


def _load(model_dir, impl):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=impl, dtype=torch.float32)
    return configure_model_for_packing(model).eval()


def _loss(logits, labels):
    """Mean next-token loss, the way HF computes it (shift by one, ignore -100)."""
    return F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum"), int((labels[1:] != -100).sum())


def _assert_packed_equals_alone(model, mode, reference=None, atol=1e-4):
    """``reference`` (default: ``model``) runs each sample alone, with no mask and positions 0..n-1."""
    reference = reference if reference is not None else model
    rows = _rows(model.config.vocab_size)
    batch = collate_packed(rows, SEQ_LEN, pad_id=0, attention=mode)
    with torch.no_grad():
        packed = model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch["position_ids"],
        ).logits
        assert torch.isfinite(packed).all()  # the padding tail is its own block, never an all-masked row
        worst = 0.0
        for r, row in enumerate(rows):
            off = 0
            for ids, mask in row:
                n = len(ids)
                alone = reference(input_ids=torch.as_tensor(ids)[None]).logits[0]
                worst = max(worst, (packed[r, off : off + n] - alone).abs().max().item())
                labels = torch.where(torch.as_tensor(mask, dtype=torch.bool), torch.as_tensor(ids), -100)
                got, k1 = _loss(packed[r, off : off + n], batch["labels"][r, off : off + n])
                want, k2 = _loss(alone, labels)
                assert k1 == k2
                if k1:
                    assert abs(got.item() / k1 - want.item() / k2) < atol
                off += n
    assert worst < atol, f"packed logits differ from per-sample logits by {worst:.2e}"
    return worst


CPU_MODES = [("sdpa", "mask"), ("eager", "position_ids"), ("sdpa", "position_ids")]


@pytest.mark.parametrize(
    "arch,impl,mode",
    [(arch, impl, mode) for arch in ("llama", "gpt2") for impl, mode in CPU_MODES]
    # transformers 5.23's GPT-2 has no flex_attention support (_supports_flex_attn = False)
    + [("llama", "flex_attention", "position_ids")],
)
def test_packed_equals_one_by_one_on_cpu(request, arch, impl, mode):
    """sdpa with the loader's dense block mask; sdpa and eager with position ids only (transformers derives the block
    mask from the resets); flex_attention forward (BlockMask from position ids; CPU has no flex backward). The
    reference runs each sample alone through sdpa, so flex compiles once (~40 s on 2 cores), not once per length."""
    model_dir = request.getfixturevalue(f"tiny_{arch}_dir")
    model = _load(model_dir, impl)
    _assert_packed_equals_alone(model, mode, reference=_load(model_dir, "sdpa") if impl != "sdpa" else None)


def test_without_resets_samples_contaminate_each_other(tiny_llama_dir):
    """The control: plain causal attention over a packed row changes later samples' logits, so the test above can
    fail."""
    model = _load(tiny_llama_dir, "sdpa")
    rows = _rows(model.config.vocab_size)
    batch = collate_packed(rows, SEQ_LEN, pad_id=0, attention="mask")
    with torch.no_grad():
        causal = model(input_ids=batch["input_ids"]).logits  # no mask, positions 0..T-1
        ids, _ = rows[0][1]
        alone = model(input_ids=torch.as_tensor(ids)[None]).logits[0]
    assert (causal[0, 7 : 7 + len(ids)] - alone).abs().max() > 1e-2


def test_the_kv_cache_hides_the_resets(tiny_llama_dir):
    """Why configure_model_for_packing exists: with use_cache=True transformers skips the position-id block mask."""
    model = _load(tiny_llama_dir, "sdpa")
    rows = _rows(model.config.vocab_size)
    batch = collate_packed(rows, SEQ_LEN, pad_id=0, attention="position_ids")
    ids, _ = rows[0][1]
    with torch.no_grad():
        alone = model(input_ids=torch.as_tensor(ids)[None]).logits[0]
        for use_cache, contaminated in ((True, True), (False, False)):
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=use_cache).logits
            assert ((logits[0, 7 : 7 + len(ids)] - alone).abs().max() > 1e-2) == contaminated


def test_resolve_attention_on_cpu():
    assert resolve_attention("auto", "cpu") == ("sdpa", "mask")
    assert resolve_attention("eager", "cpu") == ("eager", "position_ids")
    assert resolve_attention("flex_attention", "cpu") == ("flex_attention", "position_ids")
    with pytest.raises(ValueError, match="expected one of"):
        resolve_attention("flash", "cpu")
    with pytest.raises(ValueError, match="needs CUDA"):
        resolve_attention("dsft_varlen", "cpu")
    with pytest.raises(ValueError, match="flash-attn"):
        resolve_attention("flash_attention_2", "cpu")
    assert set(CHOICES) >= {"auto", "sdpa", "flex_attention"}


def test_model_supports_reads_the_architecture():
    from transformers import GPT2Config, LlamaConfig

    assert model_supports(LlamaConfig(), "_supports_flex_attn")
    assert not model_supports(GPT2Config(), "_supports_flex_attn")
    assert model_supports(None, "_supports_flex_attn")


def test_cu_seqlens_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    cu, max_len = cu_seqlens_from_position_ids(pos)
    assert cu.tolist() == [0, 3, 5, 6, 10, 12] and cu.dtype == torch.int32
    assert max_len == 4
    with pytest.raises(ValueError, match="start every row at 0"):
        cu_seqlens_from_position_ids(torch.tensor([[1, 2, 0]]))


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["auto", "dsft_varlen", "flex_attention", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_equals_one_by_one_on_cuda(request, arch, impl):
    """Same check on a GPU in bf16 (looser tolerance: bf16 rounding, not contamination, which is ~1e-1)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = request.getfixturevalue(f"tiny_{arch}_dir")
    if impl == "flex_attention" and arch == "gpt2":
        pytest.skip("transformers' GPT-2 has no flex_attention support")
    name, mode = resolve_attention(impl, "cuda", config=AutoConfig.from_pretrained(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=name, dtype=torch.bfloat16)
    model = configure_model_for_packing(model).cuda().eval()
    rows = _rows(model.config.vocab_size)
    batch = collate_packed(rows, SEQ_LEN, pad_id=0, attention=mode)
    batch = {k: v.cuda() for k, v in batch.items() if torch.is_tensor(v)}
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        off = 0
        for ids, _ in rows[0]:
            alone = model(input_ids=torch.as_tensor(ids, device="cuda")[None]).logits[0].float()
            assert (packed[0, off : off + len(ids)] - alone).abs().max() < 5e-2
            off += len(ids)
    # and it trains: the backward pass exists for this kernel on CUDA
    model.train()
    model(**batch).loss.backward()
