"""A fine-tuning method defined outside ``finetune/methods/``, registered with one call: train only the LM head (and,
optionally, the final norm) of a frozen base.

Used by ``head_method_script.py`` (the recipe entry point the launcher runs) and by the unit tests of the registry.
Nothing else in dsft names it: its YAML section, its did-you-mean errors, ``describe()``, the memory model and the
final ``save_pretrained`` model all come from this declaration.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune.methods import MemoryTerms, Method, get_method, option, register


@dataclass
class HeadMethodConfig:
    modules: list[str] = option(
        help="Top-level module names whose weights train; everything else is frozen.", factory=lambda: ["lm_head"]
    )
    train_norm: bool = option(True, "Also train the final norm (model.norm).")


def trainable_names(model, cfg) -> list[str]:
    """The parameter names ``prepare`` leaves trainable for ``cfg``."""
    prefixes = [f"{m}." for m in cfg.method.head.modules] + (["model.norm."] if cfg.method.head.train_norm else [])
    return [n for n, _ in model.named_parameters() if any(n.startswith(p) for p in prefixes)]


def prepare(model, cfg):
    """Freeze the base, then unfreeze the configured modules."""
    model.requires_grad_(False)
    names = set(trainable_names(model, cfg))
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    return model


def trainable_params(shape, spec) -> int:
    """The LM head (vocab × hidden) and the final norm (hidden)."""
    return shape.vocab_size * shape.hidden_size + shape.hidden_size


def validate(cfg) -> str | None:
    return None if cfg.method.head.modules else "method.head.modules is empty: name at least one module (lm_head)"


HEAD = Method(
    name="head",
    aliases=("lm_head",),
    summary="only the LM head (and final norm) trains; final/ is a complete model",
    prepare=prepare,
    memory=MemoryTerms(trainable_params=trainable_params, trains_base=True),
    lr_range=(1e-5, 1e-2),  # a linear probe's usual range
    config=HeadMethodConfig,
    section_help="Head-only fine-tuning (a test method).",
    validate=validate,
)


def ensure_registered() -> Method:
    """Register ``HEAD`` once per process (the unit tests import this module more than once)."""
    try:
        return get_method(HEAD.name)
    except ValueError:
        return register(HEAD)
