"""Prompt tuning (Lester et al. 2021): a trainable soft prompt prepended to the input embeddings, via PEFT.

Only ``num_virtual_tokens x hidden`` parameters train. Initializing from the embeddings of a task description
(``method.prompt.init_text``) converges faster than random init on small models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from finetune.methods.registry import MemoryTerms, Method, option, register

if TYPE_CHECKING:
    from ds_configs.memory import MethodSpec, ModelShape
    from finetune.config import Config


@dataclass
class PromptMethodConfig:
    num_virtual_tokens: int = option(16, "Soft-prompt length prepended to the input embeddings.")
    init_text: str | None = option(None, "Initialize the soft prompt from the embeddings of this text (else random).")


def prepare(model, cfg: Config):
    """Wrap ``model`` in a PEFT prompt-tuning model (text-initialized when ``init_text`` is set)."""
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    from finetune.methods import enable_gradient_checkpointing

    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    pc = cfg.method.prompt
    kwargs = {}
    if pc.init_text:
        kwargs = dict(
            prompt_tuning_init=PromptTuningInit.TEXT,
            prompt_tuning_init_text=pc.init_text,
            tokenizer_name_or_path=cfg.model.name_or_path,
        )
    peft_config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=pc.num_virtual_tokens, **kwargs)
    return get_peft_model(model, peft_config)


def validate(cfg: Config) -> str | None:
    """At least one virtual token."""
    n = cfg.method.prompt.num_virtual_tokens
    return f"method.prompt.num_virtual_tokens={n} must be >= 1" if n < 1 else None


def trainable_params(shape: ModelShape, spec: MethodSpec) -> int:
    """``virtual_tokens × hidden``: one embedding vector per soft-prompt position."""
    return spec.virtual_tokens * shape.hidden_size


PROMPT = register(
    Method(
        name="prompt",
        aliases=("prompt_tuning",),
        summary="a soft prompt before the input embeddings, frozen base; final/ is an adapter folder",
        prepare=prepare,
        memory=MemoryTerms(
            trainable_params=trainable_params,
            extra_tokens=lambda spec: spec.virtual_tokens,  # every row is longer by the soft prompt
            knobs=lambda cfg: {"virtual_tokens": cfg.method.prompt.num_virtual_tokens},
        ),
        # Prompt tuning peak lrs: 1e-4..3e-1 (Lester et al. 2021 train the prompt at 0.3 with Adafactor; PEFT's
        # examples 3e-2; the tiny-model recipe test learns at 3e-1).
        lr_range=(1e-4, 3e-1),
        config=PromptMethodConfig,
        section_help="Prompt tuning (soft prompt on the input only).",
        is_peft=True,
        needs_padding=True,
        keeps_position_ids=False,
        validate=validate,
        recipe="prompt_tuning.py",
    )
)
