"""One module per fine-tuning method, each with the same shape (like ``peft/tuners/<method>``):

- ``load_kwargs(cfg) -> dict``: extra ``from_pretrained`` arguments (QLoRA adds its ``BitsAndBytesConfig``);
- ``prepare(model, cfg) -> nn.Module``: make the loaded base model trainable the method's way.

Adding a method is copying a sibling and registering it below.
"""

from __future__ import annotations

from types import ModuleType

from finetune.methods import full, lora, prefix, prompt

METHODS: dict[str, ModuleType] = {"full": full, "lora": lora, "qlora": lora, "prefix": prefix, "prompt": prompt}


def get_method(name: str) -> ModuleType:
    """The module implementing ``method.name``."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method.name={name!r}: expected one of {', '.join(METHODS)}") from None


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
