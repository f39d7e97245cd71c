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
sdpa, eager and flex receive the kwargs in ``**kwargs`` and ignore them. Precision and attention dropout limits
(``HALF_PRECISION_ONLY``, ``NO_DROPOUT``) are checked in ``resolve_attention`` before the model loads.

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
import logging

import torch

from data_tools.loading.packing import varlen_boundaries
from finetune.config import ATTENTION_CHOICES

DSFT_VARLEN = "dsft_varlen"
CHOICES = ATTENTION_CHOICES  # the config's vocabulary, one home: finetune/config.py
# flash-attn and varlen_attn (which calls the same _flash_attention_forward) take fp16/bf16 only
HALF_PRECISION_ONLY = ("flash_attention_2", DSFT_VARLEN)
# transformers' flex_attention_forward raises on dropout > 0, and varlen_attn has no dropout argument
NO_DROPOUT = ("flex_attention", DSFT_VARLEN)
# where configs keep the attention-probability dropout: Llama/Qwen/Mistral/Gemma/GPT-NeoX/OPT, GPT-2/GPT-J, BERT-like
DROPOUT_KEYS = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob")

logger = logging.getLogger(__name__)


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


def attention_dropout(config) -> float:
    """The attention-probability dropout ``config`` trains with (0.0 for None or a config that names none of
    ``DROPOUT_KEYS``). GPT-2's ``attn_pdrop`` is 0.1 by default; Llama's ``attention_dropout`` is 0.0."""
    if config is None:
        return 0.0
    return max((float(getattr(config, key, None) or 0.0) for key in DROPOUT_KEYS), default=0.0)


PRECISIONS = ("bf16", "fp16", "fp32")


def resolve_attention(
    attn_implementation: str = "auto", device_type: str = "cpu", config=None, precision: str | None = None
) -> tuple[str, str]:
    """Pick the attention kernel for packed rows and the matching loader mode.

    Args:
        attn_implementation: one of ``CHOICES``. ``"auto"`` on CPU -> ``sdpa`` with a dense block mask. On CUDA, the
            first that this model, precision and installation can train with:

            1. ``flash_attention_2``: flash-attn installed, the model supports it, bf16/fp16 (dropout is fine);
            2. ``flex_attention`` (fastest measured, any dtype; its first steps pay a torch.compile): the model
               supports it (GPT-2 does not) and its attention dropout is 0;
            3. ``dsft_varlen``: bf16/fp16, attention dropout 0, torch has ``varlen_attn``;
            4. ``sdpa`` with the dense mask (exact, ~2x slower attention), with a warning that says why.

            Micro batch size does not enter: in ``position_ids`` mode the loader sends ``cu_seq_lens_q/k`` and
            ``max_length_q/k``, which flash-attn and ``dsft_varlen`` honour for any number of rows.
        device_type: ``"cpu"`` or ``"cuda"`` (the device the model trains on).
        config: the model's ``PretrainedConfig``: skips kernels its architecture does not support and, where its
            attention dropout is > 0, kernels without dropout. None: assume both fine.
        precision: the resolved training precision (``bf16``, ``fp16``, ``fp32``; ``ds_configs.resolve_precision``):
            flash-attn and ``dsft_varlen`` run fp16/bf16 only. None: not checked.

    Returns:
        ``(attn_implementation for from_pretrained, attention mode for build_dataloader)``. In ``position_ids``
        mode call ``configure_model_for_packing(model)`` (use_cache=False), or samples attend to each other.

    Raises:
        ValueError: unknown name or precision, or a kernel that this device, installation, model, precision or
            attention dropout cannot train with, with what to use instead.
    """
    if attn_implementation not in CHOICES:
        raise ValueError(f"attn_implementation={attn_implementation!r}: expected one of {CHOICES}")
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: expected one of {PRECISIONS} (resolve 'auto' first)")
    cuda = device_type == "cuda"
    half = precision != "fp32"
    dropout = attention_dropout(config)
    if attn_implementation == "auto":
        if not cuda:
            return "sdpa", "mask"
        attn_implementation = _auto_cuda(config, precision, half, dropout)
    if attn_implementation == "sdpa":
        return "sdpa", "mask"
    if attn_implementation == "eager":
        # eager_attention_forward *adds* a prepared 4D mask to the scores, so the loader's bool mask would add 0/1
        # instead of masking; from position-id resets transformers builds eager's own additive block mask.
        return "eager", "position_ids"
    _check_forced(attn_implementation, cuda, config, precision, half, dropout)
    if attn_implementation == DSFT_VARLEN:
        register_varlen()
    # flex_attention on CPU runs forward only (torch 2.13 has no CPU backward): allowed for evaluation and tests.
    return attn_implementation, "position_ids"


def _auto_cuda(config, precision: str | None, half: bool, dropout: float) -> str:
    """``auto`` on CUDA: see ``resolve_attention``."""
    if half and flash_attn_installed() and model_supports(config, "_supports_flash_attn"):
        return "flash_attention_2"
    # A model trained with attention dropout (GPT-2: attn_pdrop=0.1) keeps it: we pick a kernel that applies it
    # rather than zero it, so the run trains the model its config describes, as on CPU and in HF Trainer. The price
    # is sdpa's dense mask (4.29 ms vs 1.57-1.96 ms per layer step, see the module docstring).
    if dropout == 0 and model_supports(config, "_supports_flex_attn"):
        return "flex_attention"
    if dropout == 0 and half and varlen_available():
        return DSFT_VARLEN
    why = [
        f"attention dropout {dropout} (flex_attention and dsft_varlen have none)" if dropout else "",
        f"precision={precision} (flash-attn and dsft_varlen run bf16/fp16 only)" if not half else "",
        "" if model_supports(config, "_supports_flex_attn") else f"{type(config).__name__} has no flex_attention",
    ]
    hint = "" if flash_attn_installed() or not half else "; `pip install flash-attn` makes auto pick it"
    logger.warning(
        "attention: auto -> sdpa with a dense block mask (exact, slower) because %s%s",
        ", ".join(w for w in why if w) or "no packed-row kernel is available",
        hint,
    )
    return "sdpa"


def _check_forced(name: str, cuda: bool, config, precision: str | None, half: bool, dropout: float) -> None:
    """Refuse an explicitly chosen kernel that would fail at load or at the first training step."""
    if name == "flash_attention_2" and not (cuda and flash_attn_installed()):
        raise ValueError(
            "attn_implementation=flash_attention_2 needs a CUDA device and `pip install flash-attn`; "
            "use 'auto' (flex_attention on CUDA, sdpa on CPU)"
        )
    if name == DSFT_VARLEN and not (cuda and varlen_available()):
        raise ValueError(
            "attn_implementation=dsft_varlen needs CUDA and torch.nn.attention.varlen (torch >= 2.10); "
            "use 'auto' or 'sdpa'"
        )
    model = type(config).__name__
    if name == "flash_attention_2" and not model_supports(config, "_supports_flash_attn"):
        raise ValueError(
            f"attn_implementation=flash_attention_2: transformers' {model} does not support it; use 'auto'"
        )
    if name == "flex_attention" and not model_supports(config, "_supports_flex_attn"):
        raise ValueError(f"attn_implementation=flex_attention: transformers' {model} does not support it; use 'auto'")
    if name in HALF_PRECISION_ONLY and not half:
        raise ValueError(
            f"attn_implementation={name} runs in bf16/fp16 only, not precision={precision}; use precision=bf16 "
            "(fp16 before Ampere), or attn_implementation=auto (flex_attention or sdpa in fp32)"
        )
    if name in NO_DROPOUT and dropout > 0:
        raise ValueError(
            f"attn_implementation={name} has no attention dropout, and {model} trains with {dropout}; use "
            "attn_implementation=auto (flash_attention_2 if installed, else sdpa) or set the model's attention dropout "
            "to 0 in its config.json"
        )
