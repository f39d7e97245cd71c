"""Full fine-tuning: every parameter trains; the final output is a complete ``save_pretrained`` model."""

from __future__ import annotations

from finetune.config import Config

IS_PEFT = False


def load_kwargs(cfg: Config, precision: str = "fp32") -> dict:
    """No extra ``from_pretrained`` arguments: the base loads in ``model.dtype``."""
    return {}


def prepare(model, cfg: Config):
    """Unfreeze everything (a checkpoint may ship with frozen parts) and set up activation checkpointing."""
    from finetune.methods import enable_gradient_checkpointing

    model.requires_grad_(True)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model
