"""Packing correctness: a packed batch gives each sample the logits and loss it gets alone, in every attention mode."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import finetune.attention as attention
from data_tools.loading.packing import collate_packed
from finetune.attention import (
    CHOICES,
    DSFT_VARLEN,
    attention_dropout,
    configure_model_for_packing,
    cu_seqlens_from_position_ids,
    model_supports,
    register_varlen,
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
        # as the engine calls it: the whole batch (position_ids mode: with cu_seq_lens_q/k, max_length_q/k) but the
        # num_real_tokens it pops
        packed = model(**{k: v for k, v in batch.items() if k != "num_real_tokens"}).logits
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
    with pytest.raises(ValueError, match="start at 0 in every row"):
        cu_seqlens_from_position_ids(torch.tensor([[1, 2, 0]]))
    with pytest.raises(ValueError, match="start at 0 in every row"):  # every row, not only the first
        cu_seqlens_from_position_ids(torch.tensor([[0, 1, 2], [1, 0, 1]]))


def test_boundaries_are_recomputed_when_a_tensor_reuses_storage():
    """The removed cache keyed on (data_ptr, _version, shape): a new tensor in a freed block (what the CUDA caching
    allocator hands the next equal-sized batch) has the same key, so it got the old batch's boundaries. Here a
    numpy write (no _version bump) and a new tensor over the same memory play that role; the old code returned
    [0, 3, 5, 6] twice."""
    buf = np.array([[0, 1, 2, 0, 1, 0]], dtype=np.int64)
    first = torch.from_numpy(buf)
    assert cu_seqlens_from_position_ids(first)[0].tolist() == [0, 3, 5, 6]
    buf[:] = [[0, 1, 2, 3, 4, 5]]
    second = torch.from_numpy(buf)
    assert (second.data_ptr(), second._version, second.shape) == (first.data_ptr(), first._version, first.shape)
    cu, max_len = cu_seqlens_from_position_ids(second)
    assert cu.tolist() == [0, 6] and max_len == 6


# ---------------------------------------------------------------- kernel choice on CUDA (pure logic, tested on CPU)


def _config(name):
    from transformers import GPT2Config, LlamaConfig

    return {
        "llama": LlamaConfig(),  # attention_dropout 0.0, supports flash and flex
        "llama-dropout": LlamaConfig(attention_dropout=0.1),
        "gpt2": GPT2Config(),  # attn_pdrop 0.1, supports flash, not flex
        "gpt2-no-dropout": GPT2Config(attn_pdrop=0.0),
    }[name]


@pytest.fixture
def cuda_box(monkeypatch):
    """Pretend to be a CUDA machine; ``cuda_box(flash=..., varlen=...)`` says what is installed."""

    def setup(flash: bool, varlen: bool = True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(attention, "flash_attn_installed", lambda: flash)
        monkeypatch.setattr(attention, "varlen_available", lambda: varlen)

    return setup


# (model, precision, flash-attn installed, torch varlen_attn available) -> kernel that `auto` picks on CUDA
AUTO_ON_CUDA = [
    ("llama", "bf16", True, True, "flash_attention_2"),
    ("llama", "fp16", True, True, "flash_attention_2"),
    ("llama", "fp32", True, True, "flex_attention"),  # flash-attn runs fp16/bf16 only
    ("llama", "bf16", False, True, "flex_attention"),
    ("llama", "fp32", False, False, "flex_attention"),  # flex takes any dtype
    ("llama-dropout", "bf16", True, True, "flash_attention_2"),  # flash applies dropout
    ("llama-dropout", "bf16", False, True, "sdpa"),  # flex and varlen have none
    ("gpt2", "bf16", True, True, "flash_attention_2"),
    ("gpt2", "fp16", True, True, "flash_attention_2"),
    ("gpt2", "fp32", True, True, "sdpa"),
    ("gpt2", "bf16", False, True, "sdpa"),  # no flex for GPT-2, and attn_pdrop=0.1 rules out dsft_varlen
    ("gpt2", "fp32", False, True, "sdpa"),
    ("gpt2-no-dropout", "bf16", False, True, DSFT_VARLEN),
    ("gpt2-no-dropout", "fp16", False, False, "sdpa"),  # torch without varlen_attn
    ("gpt2-no-dropout", "fp32", False, True, "sdpa"),  # varlen_attn runs fp16/bf16 only
]


@pytest.mark.parametrize("arch,precision,flash,varlen,expected", AUTO_ON_CUDA)
def test_auto_on_cuda_picks_a_kernel_the_model_can_train_with(cuda_box, arch, precision, flash, varlen, expected):
    cuda_box(flash=flash, varlen=varlen)
    mode = "mask" if expected == "sdpa" else "position_ids"
    assert resolve_attention("auto", "cuda", config=_config(arch), precision=precision) == (expected, mode)
    # on CPU auto is sdpa with the dense mask whatever the model
    assert resolve_attention("auto", "cpu", config=_config(arch), precision=precision) == ("sdpa", "mask")


def test_auto_without_the_model_config_would_send_gpt2_to_flex(cuda_box):
    """The engine bug of issue 16 item 9: without the config every model 'supports' flex, which transformers refuses
    for GPT-2 at load time; with it, GPT-2 never gets flex."""
    cuda_box(flash=False)
    assert resolve_attention("auto", "cuda")[0] == "flex_attention"
    assert resolve_attention("auto", "cuda", config=_config("gpt2"), precision="bf16")[0] != "flex_attention"


def test_the_dense_mask_fallback_on_cuda_says_why(cuda_box, caplog):
    cuda_box(flash=False)
    with caplog.at_level(logging.WARNING, logger="finetune.attention"):
        resolve_attention("auto", "cuda", config=_config("gpt2"), precision="bf16")
    (message,) = [r.getMessage() for r in caplog.records]
    assert "attention dropout 0.1" in message and "GPT2Config has no flex_attention" in message
    assert "pip install flash-attn" in message


# (forced kernel, model, precision) -> accepted (loader mode) or refused (the ValueError's words)
FORCED_ON_CUDA = [
    ("flash_attention_2", "gpt2", "bf16", "position_ids"),  # flash applies GPT-2's dropout
    ("flash_attention_2", "llama", "fp32", "bf16/fp16 only"),
    (DSFT_VARLEN, "llama", "bf16", "position_ids"),
    (DSFT_VARLEN, "llama", "fp32", "bf16/fp16 only"),
    (DSFT_VARLEN, "gpt2", "bf16", "no attention dropout, and GPT2Config trains with 0.1"),
    ("flex_attention", "llama", "fp32", "position_ids"),
    ("flex_attention", "gpt2-no-dropout", "bf16", "GPT2Config does not support it"),
    ("flex_attention", "llama-dropout", "bf16", "no attention dropout"),
    ("sdpa", "gpt2", "fp32", "mask"),
    ("eager", "gpt2", "fp32", "position_ids"),
]


@pytest.mark.parametrize("impl,arch,precision,outcome", FORCED_ON_CUDA)
def test_a_forced_kernel_is_refused_before_the_model_loads(cuda_box, impl, arch, precision, outcome):
    cuda_box(flash=True)
    if outcome in ("mask", "position_ids"):
        assert resolve_attention(impl, "cuda", config=_config(arch), precision=precision) == (impl, outcome)
    else:
        with pytest.raises(ValueError, match=outcome.replace("/", ".")):
            resolve_attention(impl, "cuda", config=_config(arch), precision=precision)


def test_precision_must_be_resolved_and_dropout_is_read_per_architecture():
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        resolve_attention("auto", "cuda", precision="auto")
    assert attention_dropout(_config("gpt2")) == 0.1 and attention_dropout(_config("llama")) == 0.0
    assert attention_dropout(None) == 0.0


# ---------------------------------------------------------------- variable-length kernels, run on CPU stand-ins


def _segments_attention(q, k, v, cu_q, cu_k, scale):
    """What flash_attn_varlen_func / varlen_attn compute, on CPU: causal attention within each [cu[i], cu[i+1])
    of the flattened (N, H, D) tokens."""
    assert torch.equal(cu_q.cpu(), cu_k.cpu())
    out = torch.empty_like(q)
    cu = cu_q.tolist()
    for s, e in zip(cu[:-1], cu[1:], strict=True):
        qs, ks, vs = (x[s:e].transpose(0, 1)[None] for x in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
        out[s:e] = o[0].transpose(0, 1)
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_flash_path_keeps_packed_samples_apart_at_micro_batch_2(request, monkeypatch, arch):
    """transformers' own flash_attention_forward / _flash_attention_forward, with CPU stand-ins for flash-attn's
    functions: with the loader's cu_seq_lens/max_length a 2-row packed batch gives each sample its logits alone;
    from position ids only (what dsft sent before) transformers runs plain causal flash over each row (it detects
    packing at batch size 1 only) and the samples mix."""
    import transformers.integrations.flash_attention as fa_integration
    import transformers.modeling_flash_attention_utils as fa_utils
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    calls = []

    def flash_fn(q, k, v, causal=True, softmax_scale=None, **_):
        calls.append("flash_fn")
        out = F.scaled_dot_product_attention(
            *(x.transpose(1, 2) for x in (q, k, v)), is_causal=causal, scale=softmax_scale, enable_gqa=True
        )
        return out.transpose(1, 2)

    def flash_varlen_fn(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None, causal=True
    ):
        calls.append(("varlen", cu_seqlens_q, max_seqlen_q))
        assert causal
        return _segments_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale)

    fns = (flash_fn, flash_varlen_fn, None, fa_utils._pad_input, fa_utils._unpad_input)
    process = fa_utils._lazy_define_process_function(flash_varlen_fn)
    monkeypatch.setattr(fa_utils, "lazy_import_flash_attention", lambda *a, **k: (fns, (process, dict)))
    # fp32 here only (dsft refuses flash in fp32): the cast-back target of fp32 queries looks for an nn.Linear,
    # which GPT-2 (Conv1D) has none of
    monkeypatch.setattr(fa_integration, "get_target_dtype", lambda query, module: None)
    flash_attention_forward = fa_integration.flash_attention_forward
    # the real flash_attention_2 mask function returns None without a 2-D mask, as an unmapped name does
    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "cpu_varlen_stand_in", flash_attention_forward)
    monkeypatch.delitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "cpu_varlen_stand_in", raising=False)
    model_dir = request.getfixturevalue(f"tiny_{arch}_dir")
    model = _load(model_dir, "cpu_varlen_stand_in")
    sdpa = _load(model_dir, "sdpa")

    _assert_packed_equals_alone(model, "position_ids", reference=sdpa)
    batch = collate_packed(_rows(model.config.vocab_size), SEQ_LEN, pad_id=0, attention="position_ids")
    varlen_calls = [c for c in calls if c != "flash_fn"]
    assert "flash_fn" not in calls and len(varlen_calls) == model.config.num_hidden_layers
    for _, cu, max_len in varlen_calls:
        assert torch.equal(cu, batch["cu_seq_lens_q"]) and type(max_len) is int and max_len == batch["max_length_q"]

    calls.clear()  # the control: the same batch without the boundaries
    bare = {k: batch[k] for k in ("input_ids", "position_ids")}
    with torch.no_grad():
        mixed = model(**bare).logits
        ids, _ = _rows(model.config.vocab_size)[0][1]
        alone = sdpa(input_ids=torch.as_tensor(ids)[None]).logits[0]
    assert set(calls) == {"flash_fn"}
    assert (mixed[0, 7 : 7 + len(ids)] - alone).abs().max() > 1e-2


def test_dsft_varlen_uses_the_loaders_boundaries(tiny_llama_dir, monkeypatch):
    """dsft_varlen through the tiny Llama on CPU, with a CPU stand-in for torch's varlen_attn: packed == alone for
    2 rows; the kernel gets the batch's cu_seq_lens (no recomputation) and, without them, derives the same from
    position ids; wrong boundaries reach the kernel (so the first check can fail)."""
    import torch.nn.attention.varlen as varlen_module

    seen = []

    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        assert window_size == (-1, 0) and q.dim() == 3
        seen.append((cu_q, max_q))
        return _segments_attention(q, k, v, cu_q, cu_k, scale)

    monkeypatch.setattr(varlen_module, "varlen_attn", varlen_attn)
    register_varlen()
    model = _load(tiny_llama_dir, DSFT_VARLEN)
    sdpa = _load(tiny_llama_dir, "sdpa")
    _assert_packed_equals_alone(model, "position_ids", reference=sdpa)

    batch = collate_packed(_rows(model.config.vocab_size), SEQ_LEN, pad_id=0, attention="position_ids")
    batch.pop("num_real_tokens")
    seen.clear()
    with torch.no_grad():
        packed = model(**batch).logits
    assert all(cu is batch["cu_seq_lens_q"] for cu, _ in seen)  # precomputed: no per-layer device sync

    without = {k: v for k, v in batch.items() if not k.startswith(("cu_seq_lens", "max_length"))}
    seen.clear()
    with torch.no_grad():
        assert torch.allclose(model(**without).logits, packed, atol=1e-6)
    assert all(torch.equal(cu, batch["cu_seq_lens_q"]) and mx == batch["max_length_q"] for cu, mx in seen)

    one_per_row = torch.tensor([0, SEQ_LEN, 2 * SEQ_LEN], dtype=torch.int32)  # plain causal rows: samples mix
    wrong = {**batch, "cu_seq_lens_q": one_per_row, "cu_seq_lens_k": one_per_row, "max_length_q": SEQ_LEN}
    wrong["max_length_k"] = SEQ_LEN
    with torch.no_grad():
        assert (model(**wrong).logits - packed).abs().max() > 1e-2


# ---------------------------------------------------------------- backward: packed vs one-by-one gradients

# Relative L2 error of a packed row's parameter gradient in bf16. Measured on the CPU kernels (sdpa, eager; Llama
# and GPT-2): bf16 rounding 3e-3..5e-3, a packed row without its boundaries 0.7..0.8.
BF16_GRAD_RTOL = 5e-2


def _summed_token_loss(logits, labels):
    """Summed next-token loss over the targets (the engine's numerator before its normalization), in fp32."""
    return F.cross_entropy(
        logits[..., :-1, :].flatten(0, -2).float(), labels[..., 1:].flatten(), ignore_index=-100, reduction="sum"
    )


def _flat_grad(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])


def _packed_gradient_errors(model, mode, device="cpu"):
    """For each row r of the packed micro batch of 2: the parameter gradient of row r's summed token loss (the other
    row's targets masked) from the packed batch, and from plain causal attention over the same rows (the contaminated
    control), each as its relative L2 distance to the sum of the gradients of row r's samples run alone.

    Returns:
        ``[(packed error, control error)]``, one per row.
    """
    rows = _rows(model.config.vocab_size)
    batch = collate_packed(rows, SEQ_LEN, pad_id=0, attention=mode)
    batch.pop("num_real_tokens")
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    labels = batch.pop("labels")
    errors = []
    for r, row in enumerate(rows):
        only_r = torch.full_like(labels, -100)
        only_r[r] = labels[r]
        packed = _flat_grad(model, _summed_token_loss(model(**batch).logits, only_r))
        causal = _flat_grad(model, _summed_token_loss(model(input_ids=batch["input_ids"]).logits, only_r))
        alone_loss, off = 0.0, 0
        for ids, _ in row:
            logits = model(input_ids=torch.as_tensor(ids, device=device)[None]).logits[0]
            alone_loss = alone_loss + _summed_token_loss(logits, labels[r, off : off + len(ids)])
            off += len(ids)
        alone = _flat_grad(model, alone_loss)
        errors.append(tuple(((g - alone).norm() / alone.norm()).item() for g in (packed, causal)))
    model.zero_grad(set_to_none=True)
    return errors


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, BF16_GRAD_RTOL)], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "arch,impl,mode", [(arch, impl, mode) for arch in ("llama", "gpt2") for impl, mode in CPU_MODES]
)
def test_packed_gradients_equal_one_by_one_on_cpu(request, arch, impl, mode, dtype, rtol):
    """The backward pass of packing on the CPU kernels (CPU flex has no backward), and the check the CUDA test runs
    with BF16_GRAD_RTOL: it passes in bf16 and the contaminated control fails it. Dropout off (eval), so the
    gradients are deterministic."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        request.getfixturevalue(f"tiny_{arch}_dir"), attn_implementation=impl, dtype=dtype
    )
    model = configure_model_for_packing(model).eval()
    for r, (err, contaminated) in enumerate(_packed_gradient_errors(model, mode)):
        assert err < rtol < contaminated, (r, err, contaminated)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["auto", "flash_attention_2", "dsft_varlen", "flex_attention", "sdpa"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_equals_one_by_one_on_cuda(request, arch, impl):
    """Same check on a GPU in bf16, every sample of both rows (micro batch 2, as the engine passes it: ints too),
    against a plain-causal control that must fail the same tolerance (bf16 rounding ~1e-2, contamination ~1e-1);
    then the backward pass, row by row, with the gradient check of test_packed_gradients_equal_one_by_one_on_cpu."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = request.getfixturevalue(f"tiny_{arch}_dir")
    if impl == "flash_attention_2" and not attention.flash_attn_installed():
        pytest.skip("flash-attn is not installed")
    try:
        name, mode = resolve_attention(impl, "cuda", config=AutoConfig.from_pretrained(model_dir), precision="bf16")
    except ValueError as e:  # e.g. GPT-2 (attn_pdrop=0.1) on dsft_varlen or flex: the refusal is tested on CPU
        pytest.skip(f"refused by resolve_attention: {e}")
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=name, dtype=torch.bfloat16)
    model = configure_model_for_packing(model).cuda().eval()
    rows = _rows(model.config.vocab_size)
    batch = collate_packed(rows, SEQ_LEN, pad_id=0, attention=mode)
    batch.pop("num_real_tokens")
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    worst, contamination = 0.0, 0.0
    with torch.no_grad():
        packed = model(**batch).logits.float()
        causal = model(input_ids=batch["input_ids"]).logits.float()  # the control: no boundaries at all
        for r, row in enumerate(rows):
            off = 0
            for i, (ids, _) in enumerate(row):
                alone = model(input_ids=torch.as_tensor(ids, device="cuda")[None]).logits[0].float()
                worst = max(worst, (packed[r, off : off + len(ids)] - alone).abs().max().item())
                if i:  # a row's first sample sees nothing before it either way
                    contamination = max(contamination, (causal[r, off : off + len(ids)] - alone).abs().max().item())
                off += len(ids)
    assert worst < 5e-2 < contamination, (worst, contamination)
    # the backward pass, per row: packed vs the sum of its samples' gradients alone, and the control fails it
    for r, (err, contaminated) in enumerate(_packed_gradient_errors(model, mode, "cuda")):
        assert err < BF16_GRAD_RTOL < contaminated, (impl, r, err, contaminated)
    # and it trains: the backward pass exists for this kernel on CUDA in train mode (dropout on, where the model has it)
    model.train()
    model(**batch).loss.backward()
