"""Full fine-tuning: every parameter trains; the final output is a complete ``save_pretrained`` model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from finetune.methods.registry import MemoryTerms, Method, register

if TYPE_CHECKING:
    from ds_configs.memory import MethodSpec, ModelShape
    from finetune.config import Config


def prepare(model, cfg: Config):
    """Unfreeze everything (a checkpoint may ship with frozen parts) and set up activation checkpointing."""
    from finetune.methods import enable_gradient_checkpointing

    model.requires_grad_(True)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def trainable_params(shape: ModelShape, spec: MethodSpec) -> int:
    """Every parameter of the model."""
    return shape.total_params


FULL = register(
    Method(
        name="full",
        summary="every weight trains; final/ is a complete model",
        prepare=prepare,
        # DeepSpeed's estimators assume each rank loads an fp32 checkpoint: 4 bytes/param (kept to match them exactly).
        memory=MemoryTerms(trainable_params=trainable_params, trains_base=True, load_bytes_per_param=4),
        # Full fine-tuning peak lrs: 1e-6..1e-4 (Llama-2 SFT 2e-5, Alpaca 2e-5, HF run_clm's 5e-5 default; above ~1e-4
        # a pretrained model forgets or diverges).
        lr_range=(1e-6, 1e-4),
        recipe="full.py",
    )
)
