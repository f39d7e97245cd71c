"""The method registry's parameter report, on the models users load (a 4-bit QLoRA base included)."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_qlora_parameter_count_equals_the_base_models(tiny_llama_dir, storage):
    """4-bit codes packed 2 per uint8 or 4 per bf16 element (dsft's storage for ZeRO-3) still count as one each."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from finetune.methods import trainable_report

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_quant_storage=storage,
    )
    q = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, dtype=torch.float32, quantization_config=quant, device_map={"": "cpu"}
    )
    assert any(p.__class__.__name__ == "Params4bit" for p in q.parameters())
    _, total, _ = trainable_report(q)
    assert total == sum(p.numel() for p in base.parameters())
