"""Prompt tuning (Lester et al. 2021): a trainable soft prompt prepended to the input embeddings, via PEFT.

Only ``num_virtual_tokens x hidden`` parameters train. Initializing from the embeddings of a task description
(``method.prompt.init_text``) converges faster than random init on small models.
"""

from __future__ import annotations

from finetune.config import Config

IS_PEFT = True


def load_kwargs(cfg: Config, precision: str = "fp32") -> dict:
    """No extra ``from_pretrained`` arguments."""
    return {}


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
