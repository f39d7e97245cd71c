"""P-Tuning v2 (Liu et al. 2022) = deep prefix tuning: trainable key/value prefixes at every layer, via PEFT.

The base is frozen; each layer attends to ``num_virtual_tokens`` learned key/value vectors before the real tokens.
PEFT injects them as ``past_key_values`` and widens a 2-D attention mask, so rows must be padded (not packed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from finetune.methods.registry import MemoryTerms, Method, option, register

if TYPE_CHECKING:
    from ds_configs.memory import MethodSpec, ModelShape
    from finetune.config import Config


@dataclass
class PrefixMethodConfig:
    num_virtual_tokens: int = option(16, "Prefix length: key/value vectors prepended at every layer (P-Tuning v2).")
    prefix_projection: bool = option(
        False, "Reparameterize the prefix through a 2-layer MLP (more stable on big models)."
    )


def prepare(model, cfg: Config):
    """Wrap ``model`` in a PEFT prefix-tuning model."""
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    from finetune.methods import enable_gradient_checkpointing

    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    pc = cfg.method.prefix
    peft_config = PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=pc.num_virtual_tokens,
        prefix_projection=pc.prefix_projection,
        encoder_hidden_size=model.config.hidden_size,
    )
    return get_peft_model(model, peft_config)


def validate(cfg: Config) -> str | None:
    """At least one virtual token."""
    n = cfg.method.prefix.num_virtual_tokens
    return f"method.prefix.num_virtual_tokens={n} must be >= 1" if n < 1 else None


def trainable_params(shape: ModelShape, spec: MethodSpec) -> int:
    """``virtual_tokens × layers × 2 × kv_dim``: a key and a value prefix per layer (no reparameterisation MLP)."""
    return spec.virtual_tokens * shape.num_layers * 2 * shape.kv_dim


PREFIX = register(
    Method(
        name="prefix",
        aliases=("ptuning_v2", "p_tuning_v2", "prefix_tuning"),
        summary="P-Tuning v2: key/value prefixes at every layer, frozen base; final/ is an adapter folder",
        prepare=prepare,
        # the prefix is keys/values only: no extra positions in the activations the memory model counts
        memory=MemoryTerms(
            trainable_params=trainable_params,
            knobs=lambda cfg: {"virtual_tokens": cfg.method.prefix.num_virtual_tokens},
        ),
        # Prefix tuning peak lrs: 1e-4..1e-1 (Li & Liang 2021: 5e-5..8e-5 with the MLP reparameterisation; P-Tuning v2
        # 5e-3..1e-2; PEFT's examples 1e-2..3e-2; the tiny-model recipe test learns at 1e-1).
        lr_range=(1e-4, 1e-1),
        config=PrefixMethodConfig,
        section_help="P-Tuning v2 (deep prefix tuning).",
        is_peft=True,
        needs_padding=True,
        keeps_position_ids=False,
        validate=validate,
        recipe="ptuning_v2.py",
    )
)
