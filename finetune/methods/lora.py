"""LoRA (Hu et al. 2021) through PEFT: freeze the base, learn a rank-``r`` update ``B @ A`` per target Linear.

``method.lora`` also shapes QLoRA's adapters (``finetune/methods/qlora.py``, which reuses :func:`prepare`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from finetune.methods.registry import MemoryTerms, Method, option, register

if TYPE_CHECKING:
    from ds_configs.memory import MethodSpec, ModelShape
    from finetune.config import Config


@dataclass
class LoraMethodConfig:
    r: int = option(8, "LoRA rank.")
    alpha: float = option(16.0, "LoRA scaling numerator (scale = alpha / r).")
    dropout: float = option(0.05, "Dropout on the LoRA input.")
    target_modules: list[str] | str = option(
        "all-linear", "Modules that get adapters: a list of names, or 'all-linear' (every Linear but the LM head)."
    )


def prepare(model, cfg: Config):
    """Wrap ``model`` in a PEFT LoRA model (the base, quantized or not, frozen)."""
    from peft import LoraConfig, TaskType, get_peft_model

    from finetune.methods import enable_gradient_checkpointing

    model.requires_grad_(False)  # the base (quantized or not) is frozen; get_peft_model unfreezes the adapters
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    lc = cfg.method.lora
    peft_config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lc.r,
        lora_alpha=lc.alpha,
        lora_dropout=lc.dropout,
        target_modules=lc.target_modules,
        bias="none",
    )
    return get_peft_model(model, peft_config)


def validate(cfg: Config) -> str | None:
    """The adapter shape rules (also QLoRA's)."""
    lc = cfg.method.lora
    if lc.r < 1 or lc.alpha <= 0 or not 0 <= lc.dropout < 1:
        return "method.lora: need r >= 1, alpha > 0 and 0 <= dropout < 1"
    return None


def trainable_params(shape: ModelShape, spec: MethodSpec) -> int:
    """``r·(in+out)`` per adapted linear per layer (PEFT's A: r×in, B: out×r).

    Raises:
        ValueError: none of ``spec.lora_targets`` is a linear of the decoder layer.
    """
    targets = spec.lora_targets
    chosen = [(n, i, o) for n, i, o in shape.layer_linears if targets is None or n in targets]
    if not chosen:
        have = ", ".join(n for n, _, _ in shape.layer_linears)
        raise ValueError(f"--lora-targets {targets}: none of them is a linear in the decoder layer ({have})")
    return shape.num_layers * sum(spec.lora_r * (i + o) for _, i, o in chosen)


def lora_knobs(cfg: Config) -> dict:
    """``MethodSpec`` fields from ``method.lora``: the rank and the targets ('all-linear' = every decoder linear)."""
    t = cfg.method.lora.target_modules
    return {"lora_r": cfg.method.lora.r, "lora_targets": None if isinstance(t, str) else tuple(t)}


LORA = register(
    Method(
        name="lora",
        summary="frozen base, low-rank adapters on the linears; final/ is an adapter folder",
        prepare=prepare,
        memory=MemoryTerms(trainable_params=trainable_params, knobs=lora_knobs),
        # LoRA peak lrs: 1e-5..2e-3 (Hu et al. 2021 use 2e-4..5e-4 on GPT-2/3; QLoRA paper 1e-4..2e-4; PEFT examples
        # 1e-4..1e-3; ~10x full fine-tuning because only the small adapters move).
        lr_range=(1e-5, 2e-3),
        config=LoraMethodConfig,
        section_help="LoRA adapter shape (also used by qlora).",
        is_peft=True,
        validate=validate,
        recipe="lora.py",
    )
)
