"""P-Tuning v2 (Liu et al. 2022) = deep prefix tuning: trainable key/value prefixes at every layer, via PEFT.

The base is frozen; each layer attends to ``num_virtual_tokens`` learned key/value vectors before the real tokens.
PEFT injects them as ``past_key_values`` and widens a 2-D attention mask, so rows must be padded (not packed).
"""

from __future__ import annotations

from finetune.config import Config

IS_PEFT = True


def load_kwargs(cfg: Config, precision: str = "fp32") -> dict:
    """No extra ``from_pretrained`` arguments."""
    return {}


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
