"""The one switch between attention mechanisms for packed rows (several samples per row, no cross-sample attention).

``resolve_attention`` returns what to pass to ``from_pretrained(attn_implementation=...)`` *and* the loader's
``attention`` mode, so the model and the batches always agree:

| implementation        | trains on                   | loader mode      | sample boundaries reach the kernel as       |
|-----------------------|-----------------------------|------------------|---------------------------------------------|
| ``sdpa``              | any device, dtype, dropout  | ``mask``         | the loader's dense (B,1,T,T) block mask     |
| ``eager``             | any device, dtype, dropout  | ``position_ids`` | an additive block mask transformers builds  |
| ``flex_attention``    | CUDA, any dtype, no dropout | ``position_ids`` | a ``BlockMask`` transformers builds         |
| ``flash_attention_2`` | CUDA, bf16/fp16, dropout ok | ``position_ids`` | the loader's ``cu_seq_lens``/``max_length`` |
| ``dsft_varlen``       | CUDA, bf16/fp16, no dropout | ``position_ids`` | the same, into ours: ``varlen_attn``        |

In ``position_ids`` mode every batch carries both the resets and ``cu_seq_lens_q/k`` + ``max_length_q/k``
(``data_tools.loading.packing.varlen_kwargs``): transformers' flash path, from position ids alone, sees packing only
at batch size 1 (``_is_packed_sequence``, transformers 5.23) and would run plain causal attention over each row of a
larger micro batch; given the kwargs it runs ``flash_attn_varlen_func`` over the flattened rows for any batch size.
sdpa, eager and flex receive the kwargs in ``**kwargs`` and ignore them.

Why the split (numbers in ../shared/DESIGN.md, one H100, 1.1B-Llama attention layer, 8 x 2048 packed tokens, fwd+bwd):
a dense mask makes SDPA leave its flash kernel (4.29 ms vs 1.96 ms causal), while FlexAttention with a document mask
(1.57 ms) and ``varlen_attn`` (1.95 ms) give correct packing for free. On CPU FlexAttention has no backward and
``varlen_attn`` is CUDA-only, so CPU training uses SDPA with the dense mask, which is exact (logits of a packed row
equal each sample run alone within ~1e-6 in fp32, tests/unit/finetune/test_attention.py).

In transformers 5.23 every attention function receives the decoder layer's ``position_ids`` and the model call's extra
keyword arguments in ``**kwargs`` (Llama and GPT-2 both forward them), and ``create_causal_mask`` returns ``None``
for implementations that are not in ``AttentionMaskInterface`` (masking_utils._preprocess_mask_arguments), so
``dsft_varlen`` needs no mask function: no dense (T, T) mask is ever built for it.
"""

from __future__ import annotations

import importlib.util

import torch

from data_tools.loading.packing import varlen_boundaries

DSFT_VARLEN = "dsft_varlen"
CHOICES = ("auto", "sdpa", "eager", "flex_attention", "flash_attention_2", DSFT_VARLEN)


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Flattened (B*T) sample boundaries: int32 offsets ``[0, s1, ..., B*T]`` where position ids restart at 0, on
    ``position_ids``' device, plus the longest sample (``varlen_boundaries`` computes both: one home for the rule).

    The fallback for a model called without the loader's ``cu_seq_lens_q``/``max_length_q``. Nothing is cached: a
    cache keyed on (data_ptr, _version, shape) returned an old batch's boundaries when the CUDA caching allocator
    handed the next, equal-sized ``position_ids`` the freed block (a new tensor always has _version 0). The price
    is a device->host copy per layer, which the loader's precomputed kwargs avoid.
    """
    cu, max_len = varlen_boundaries(position_ids.detach().cpu().numpy())
    return torch.from_numpy(cu).to(position_ids.device), max_len


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function over packed rows with ``torch.nn.attention.varlen.varlen_attn``.

    Args: as every transformers attention function: ``query`` (B, H, T, D), ``key``/``value`` (B, Hkv, T, D), and in
    ``kwargs`` the loader's ``cu_seq_lens_q/k`` and ``max_length_q/k`` (``data_tools.loading.packing.varlen_kwargs``)
    or, without them, ``position_ids`` (B, T) to derive them from. Returns (B, T, H, D) and no attention weights.
    """
    from torch.nn.attention.varlen import varlen_attn

    if attention_mask is not None:
        raise ValueError("dsft_varlen takes no attention_mask: pass packed batches with attention='position_ids'")
    if dropout > 0:
        raise ValueError("dsft_varlen has no attention dropout; set the model's attention dropout to 0")
    b, h, t, d = query.shape
    names = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    if all(kwargs.get(n) is not None for n in names):
        cu_q, cu_k, max_q, max_k = (kwargs[n] for n in names)
        cu_q, cu_k = cu_q.to(query.device), cu_k.to(query.device)  # no-ops after the engine's move to the device
    else:
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            raise ValueError(
                "dsft_varlen needs cu_seq_lens_q/k and max_length_q/k, or position_ids "
                "(build the loader with attention='position_ids')"
            )
        cu_q, max_q = cu_seqlens_from_position_ids(position_ids.expand(b, t))
        cu_k, max_k = cu_q, max_q
    q = query.transpose(1, 2).reshape(b * t, h, d)
    k = key.transpose(1, 2).reshape(b * t, key.shape[1], d)
    v = value.transpose(1, 2).reshape(b * t, value.shape[1], d)
    out = varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scaling, window_size=(-1, 0), enable_gqa=h != k.shape[1])
    return out.reshape(b, t, h, d), None


def register_varlen() -> None:
    """Make ``attn_implementation="dsft_varlen"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(DSFT_VARLEN, varlen_attention_forward)


def configure_model_for_packing(model: torch.nn.Module) -> torch.nn.Module:
    """Turn the KV cache off for training on packed rows; returns ``model``.

    transformers 5.23 derives the block mask from position-id resets (sdpa/eager/flex in ``position_ids`` mode) only
    when no ``past_key_values`` exist, but with ``config.use_cache=True`` (every Llama/GPT-2 default) a forward
    creates an empty ``DynamicCache`` first, and the packed samples then silently attend to each other
    (tests/unit/finetune/test_attention.py::test_the_kv_cache_hides_the_resets shows it). Training never needs
    the cache.
    """
    model.config.use_cache = False
    return model


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def varlen_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None and torch.cuda.is_available()


def model_supports(config, attribute: str) -> bool:
    """Whether the causal-LM class of ``config`` declares ``attribute`` (e.g. ``_supports_flex_attn``); True when
    ``config`` is None or the class is unknown (transformers then raises its own clear error at load time)."""
    if config is None:
        return True
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return True
    return bool(getattr(cls, attribute, False))


def resolve_attention(attn_implementation: str = "auto", device_type: str = "cpu", config=None) -> tuple[str, str]:
    """Pick the attention kernel for packed rows and the matching loader mode.

    Args:
        attn_implementation: one of ``CHOICES``. ``"auto"``: CPU -> ``sdpa`` with a dense block mask; CUDA ->
            ``flash_attention_2`` when flash-attn is installed (and the model supports it), else ``flex_attention``
            (the fastest correct option measured, any dtype; its first steps pay a torch.compile) when the model
            supports it (GPT-2 does not), else ``dsft_varlen`` (bf16/fp16), else ``sdpa`` with the dense mask.
        device_type: ``"cpu"`` or ``"cuda"`` (the device the model trains on).
        config: the model's ``PretrainedConfig``, to skip kernels its architecture does not support.

    Returns:
        ``(attn_implementation for from_pretrained, attention mode for build_dataloader)``. In ``position_ids``
        mode call ``configure_model_for_packing(model)`` (use_cache=False), or samples attend to each other.

    Raises:
        ValueError: unknown name, or a kernel that this device or installation cannot run, with what to use instead.
    """
    if attn_implementation not in CHOICES:
        raise ValueError(f"attn_implementation={attn_implementation!r}: expected one of {CHOICES}")
    cuda = device_type == "cuda"
    if attn_implementation == "auto":
        if not cuda:
            return "sdpa", "mask"
        if flash_attn_installed() and model_supports(config, "_supports_flash_attn"):
            attn_implementation = "flash_attention_2"
        elif model_supports(config, "_supports_flex_attn"):
            attn_implementation = "flex_attention"
        elif varlen_available():
            attn_implementation = DSFT_VARLEN
        else:
            return "sdpa", "mask"
    if attn_implementation == "sdpa":
        return "sdpa", "mask"
    if attn_implementation == "eager":
        # eager_attention_forward *adds* a prepared 4D mask to the scores, so the loader's bool mask would add 0/1
        # instead of masking; from position-id resets transformers builds eager's own additive block mask.
        return "eager", "position_ids"
    if attn_implementation == "flash_attention_2" and not (cuda and flash_attn_installed()):
        raise ValueError(
            "attn_implementation=flash_attention_2 needs a CUDA device and `pip install flash-attn`; "
            "use 'auto' (flex_attention on CUDA, sdpa on CPU)"
        )
    if attn_implementation == DSFT_VARLEN:
        if not (cuda and varlen_available()):
            raise ValueError(
                "attn_implementation=dsft_varlen needs CUDA and torch.nn.attention.varlen (torch >= 2.10); "
                "use 'auto' or 'sdpa'"
            )
        register_varlen()
    # flex_attention on CPU runs forward only (torch 2.13 has no CPU backward): allowed for evaluation and tests.
    return attn_implementation, "position_ids"
