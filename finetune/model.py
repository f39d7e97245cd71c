"""Load the base model and tokenizer and make them trainable the configured way (``finetune.methods``)."""

from __future__ import annotations

import logging

import torch

from finetune import distributed as dist
from finetune.config import Config
from finetune.methods import get_method, trainable_report

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_NAMED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# HfDeepSpeedConfig must stay alive while ZeRO-3 models are built: transformers looks it up through a weak
# reference to decide whether from_pretrained constructs the model under deepspeed.zero.Init.
_HF_DS_CONFIG = None


def load_tokenizer(cfg: Config):
    """The tokenizer of ``model.name_or_path``, right-padded for training, with a pad token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    tok.padding_side = "right"
    if tok.pad_token_id is None:
        # Padded positions are label -100 and masked out, so any id works; eos is the common choice.
        tok.pad_token = tok.eos_token
    return tok


def weight_dtype(cfg: Config, precision: str) -> torch.dtype:
    """The dtype weights are loaded in: ``model.dtype`` or the training precision's."""
    return _NAMED_DTYPES[cfg.model.dtype] if cfg.model.dtype != "auto" else DTYPES[precision]


def load_model(cfg: Config, ds_config: dict, precision: str, attn_implementation: str):
    """``from_pretrained`` the base, then apply the method (LoRA, prefix, ...).

    Under ZeRO-3 an ``HfDeepSpeedConfig`` is registered BEFORE ``from_pretrained`` so each rank only materializes
    its own partition of the weights (a 70B model never exists whole on one rank).

    Args:
        cfg: the run config.
        ds_config: the final DeepSpeed config (batch sizes resolved; "auto" values filled).
        precision: resolved training precision (bf16 | fp16 | fp32).
        attn_implementation: transformers attention implementation (sdpa, eager, flex_attention, ...).

    Returns:
        The trainable model (a ``PeftModel`` for PEFT methods).
    """
    global _HF_DS_CONFIG
    from transformers import AutoModelForCausalLM

    method = get_method(cfg.method.name)
    kwargs = method.load_kwargs(cfg, precision)
    quantized = "quantization_config" in kwargs
    zero3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    if zero3 and not quantized:
        from transformers.integrations import HfDeepSpeedConfig

        _HF_DS_CONFIG = HfDeepSpeedConfig(ds_config)
    if quantized:
        # bitsandbytes quantizes while placing weights (a device_map; CPU Linear4bit since 0.48), which zero.Init
        # does not do: each rank loads the whole 4-bit base (1/4 of bf16) and, under ZeRO-3, deepspeed.initialize
        # then partitions it (the codes are stored in the training dtype, see methods/lora.py).
        kwargs["device_map"] = {"": dist.cuda_index() if torch.cuda.is_available() else "cpu"}
    elif not zero3 and torch.cuda.is_available():
        # ZeRO 0-2 keep the whole model on every GPU: load it straight there from the memory-mapped safetensors,
        # not into a full host copy per rank first (8 ranks x a 16 GB model = 128 GB of host RAM at start otherwise).
        # benchmarks/load_memory.py measures the host side.
        kwargs["device_map"] = {"": dist.cuda_index()}
    model = None
    if zero3 and not kwargs:
        # rank 0 reads one tensor at a time instead of the whole state dict (finetune/zero3_load.py says why)
        from transformers import AutoConfig

        from finetune.zero3_load import load_partitioned

        config = AutoConfig.from_pretrained(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
        model = load_partitioned(
            cfg.model.name_or_path,
            config,
            dtype=weight_dtype(cfg, precision),
            attn_implementation=attn_implementation,
            trust_remote_code=cfg.model.trust_remote_code,
        )
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.model.name_or_path,
            dtype=weight_dtype(cfg, precision),
            attn_implementation=attn_implementation,
            trust_remote_code=cfg.model.trust_remote_code,
            use_safetensors=True,  # never unpickle weights: a .bin-only checkpoint is refused (convert with safetensors)
            **kwargs,
        )
    model.config.use_cache = False  # the KV cache is for generation; in training it only costs memory
    model = method.prepare(model, cfg)
    _, _, report = trainable_report(model)
    if dist.is_main():
        logger.info("method=%s %s", cfg.method.name, report)
        print(f"[dsft] method={cfg.method.name} {report}", flush=True)
    return model


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices only; biases, norms and 1-D embeddings-like vectors get none.

    The shape is read from ``ds_shape`` under ZeRO-3 (partitioned parameters are empty tensors there).
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))
        (no_decay if ndim < 2 or name.endswith(".bias") or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
