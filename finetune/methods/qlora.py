"""QLoRA (Dettmers et al. 2023): LoRA adapters (``method.lora``) on a frozen base stored in 4-bit NF4 or 8-bit.

bitsandbytes quantizes the decoder linears while loading, so a 7B base needs ~4 GB instead of 14 GB; the adapters
and the compute stay in the training dtype.

Precision of the non-quantized weights (norms, embeddings, LM head, adapters): the training dtype, as in every
DeepSpeed bf16 run. DeepSpeed casts every floating parameter to bf16 in ``deepspeed.initialize``
(``_cast_module_mixed_precision``) and keeps the fp32 master copy of what trains (the adapters) in its optimizer.
PEFT's ``prepare_model_for_kbit_training`` would first upcast the frozen norms and embeddings to fp32 for stability,
only for DeepSpeed to cast them back: a transient fp32 copy of the embeddings at load, and a docstring promise that
did not hold. So QLoRA here freezes the base and wires gradient checkpointing itself (``lora.prepare``), and the
weights stay in the dtype they were loaded in (the training precision; RMSNorm computes in fp32 internally either
way). tests/unit/finetune/test_methods.py checks the dtypes after ``deepspeed.initialize``.

Which ZeRO stages and offloads a quantized base allows is written once, in ``ds_configs/rules.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from finetune.methods import lora
from finetune.methods.registry import MemoryTerms, Method, option, register

if TYPE_CHECKING:
    from finetune.config import Config


@dataclass
class QLoraMethodConfig:
    bits: int = option(4, "Base-weight quantization: 4 (NF4) or 8 (LLM.int8).", (4, 8))
    quant_type: str = option("nf4", "4-bit data type.", ("nf4", "fp4"))
    double_quant: bool = option(True, "Quantize the 4-bit quantization constants too (saves ~0.4 bit/param).")


def load_kwargs(cfg: Config, precision: str = "fp32") -> dict:
    """``quantization_config`` for ``from_pretrained``.

    Args:
        cfg: the run config (``method.qlora``).
        precision: the resolved training precision; the 4-bit matmuls compute in it.
    """
    import torch
    from transformers import BitsAndBytesConfig

    q = cfg.method.qlora
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
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


def qlora_knobs(cfg: Config) -> dict:
    """``MethodSpec`` fields: LoRA's rank and targets plus the base's bits."""
    return {**lora.lora_knobs(cfg), "quant_bits": cfg.method.qlora.bits}


QLORA = register(
    Method(
        name="qlora",
        summary="LoRA on a 4-bit (NF4) or 8-bit frozen base; final/ is an adapter folder",
        prepare=lora.prepare,
        memory=MemoryTerms(trainable_params=lora.trainable_params, quantized=True, knobs=qlora_knobs),
        # The same adapters as LoRA: the same range (QLoRA paper: 2e-4 for 7B-13B, 1e-4 for 33B-65B).
        lr_range=lora.LORA.lr_range,
        config=QLoraMethodConfig,
        section_help="Quantization of the frozen base for qlora (its adapters: method.lora).",
        is_peft=True,
        load_kwargs=load_kwargs,
        validate=lora.validate,
        export_as="lora",  # same adapter shapes; the export rebuilds them on an unquantized base
        recipe="lora.py",
    )
)
