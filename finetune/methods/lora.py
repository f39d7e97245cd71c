"""LoRA (Hu et al. 2021) and QLoRA (Dettmers et al. 2023) through PEFT.

LoRA freezes the base and learns a rank-``r`` update ``B @ A`` per target Linear. QLoRA additionally stores the
frozen base in 4-bit NF4 (or 8-bit) with bitsandbytes, so a 7B base needs ~4 GB instead of 14 GB; the adapters
and the compute stay in bf16/fp32.

Precision of the non-quantized weights (norms, embeddings, LM head, adapters): the training dtype, as in every
DeepSpeed bf16 run. DeepSpeed casts every floating parameter to bf16 in ``deepspeed.initialize``
(``_cast_module_mixed_precision``) and keeps the fp32 master copy of what trains (the adapters) in its optimizer.
PEFT's ``prepare_model_for_kbit_training`` would first upcast the frozen norms and embeddings to fp32 for stability,
only for DeepSpeed to cast them back: a transient fp32 copy of the embeddings at load, and a docstring promise that
did not hold. So QLoRA here freezes the base and wires gradient checkpointing itself, and the weights stay in the
dtype they were loaded in (the training precision; RMSNorm computes in fp32 internally either way).
tests/unit/finetune/test_methods.py checks the dtypes after ``deepspeed.initialize``.
"""

from __future__ import annotations

import torch

from finetune.config import Config

IS_PEFT = True

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_kwargs(cfg: Config, precision: str = "fp32") -> dict:
    """``quantization_config`` for QLoRA (None for plain LoRA).

    Args:
        cfg: the run config (``method.qlora`` read when ``method.name == 'qlora'``).
        precision: the resolved training precision; the 4-bit matmuls compute in it.
    """
    if cfg.method.name != "qlora":
        return {}
    from transformers import BitsAndBytesConfig

    q = cfg.method.qlora
    compute = _DTYPES[precision]
    if q.bits == 8:
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    return {
        "quantization_config": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=compute,
            # Pack the 4-bit codes into tensors of the training dtype: ZeRO-3 then partitions and all-gathers them
            # like any other weight, and DeepSpeed's cast of the module to bf16 leaves them bit-for-bit intact.
            bnb_4bit_quant_storage=compute,
        )
    }


def prepare(model, cfg: Config):
    """Wrap ``model`` in a PEFT LoRA model (after k-bit preparation for QLoRA)."""
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
