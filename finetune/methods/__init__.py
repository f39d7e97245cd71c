"""The fine-tuning methods: one module per method, each declaring one ``Method`` and registering it.

    from finetune.methods import get_method
    get_method("ptuning_v2").name          # -> "prefix" (aliases resolve to the canonical name)
    get_method("lora").lr_range            # -> (1e-05, 0.002)

Adding a method is one new file ``finetune/methods/<m>.py`` (every module here is imported below) that calls
``register(Method(...))``; a method defined elsewhere (a test, a user's script) is registered with the same one call
before ``finetune.engine.main`` runs. See ``finetune/methods/registry.py`` for what a ``Method`` declares. Every
module here is like ``peft/tuners/<method>``: the same shape, so a new method starts as a copy of a sibling.
"""

from __future__ import annotations

import importlib
import pkgutil

from finetune.methods.registry import (
    MemoryTerms,
    Method,
    UnknownMethod,
    all_names,
    get_method,
    memory_spec,
    names,
    option,
    register,
    registered,
    unregister,
)

__all__ = [
    "MemoryTerms",
    "Method",
    "UnknownMethod",
    "all_names",
    "enable_gradient_checkpointing",
    "get_method",
    "memory_spec",
    "names",
    "option",
    "param_numel",
    "register",
    "registered",
    "trainable_report",
    "unregister",
]

# Every method module of this package registers itself on import (sorted: a stable order for --help and describe()).
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name != "registry" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")


def param_numel(p) -> int:
    """The number of weights ``p`` stands for: ZeRO-3 partitions at full size, 4-bit codes one each."""
    n = getattr(p, "ds_numel", p.numel())  # ZeRO-3 leaves an empty tensor; ds_numel is the real size
    # bitsandbytes packs 4-bit codes into the storage dtype: 2 per uint8 element, 4 per bf16 element (the storage
    # dsft's QLoRA uses, so that ZeRO-3 can partition them)
    if p.__class__.__name__ == "Params4bit":
        n *= 2 * p.element_size()
    return n


def trainable_report(model) -> tuple[int, int, str]:
    """(trainable, total, one-line report) counting ZeRO-3 partitioned parameters at their full size."""
    trainable = total = 0
    for p in model.parameters():
        n = param_numel(p)
        total += n
        trainable += n if p.requires_grad else 0
    pct = 100.0 * trainable / max(total, 1)
    return trainable, total, f"trainable params: {trainable:,} / {total:,} ({pct:.4f}%)"


def enable_gradient_checkpointing(model) -> None:
    """Activation checkpointing that also works when the embeddings are frozen (PEFT).

    Non-reentrant checkpointing (PyTorch's recommendation) does not need inputs that require grad; the
    ``enable_input_require_grads`` hook is still set so a model that forces reentrant mode gets gradients
    into the checkpointed blocks when every base weight is frozen.
    """
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.config.use_cache = False
