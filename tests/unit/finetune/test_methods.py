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


def test_qlora_weights_are_in_the_training_dtype_after_deepspeed_initialize(tiny_llama_dir, tmp_path):
    """bf16 QLoRA on ZeRO-2: norms, embeddings and adapters bf16 on the module (what DeepSpeed computes with), the
    adapters' fp32 master copy in the optimizer, the 4-bit codes untouched; and a step trains the adapters."""
    import os

    import deepspeed

    from finetune.config import load_config
    from finetune.model import load_model
    from launch.process import free_port

    port = free_port()
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", str(port))
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo")
    cfg = load_config(None, [f"model.name_or_path={tiny_llama_dir}", "method.name=qlora", f"output_dir={tmp_path}"])
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 2},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "steps_per_print": 10**9,
    }
    model = load_model(cfg, ds_config, "bf16", "sdpa")
    codes = {n: p.detach().clone() for n, p in model.named_parameters() if p.__class__.__name__ == "Params4bit"}
    assert codes
    # no fp32 upcast of the frozen norms/embeddings at load (prepare_model_for_kbit_training's, undone by DeepSpeed)
    frozen = [p for n, p in model.named_parameters() if p.__class__.__name__ != "Params4bit" and "lora_" not in n]
    loaded = {p.dtype for p in frozen}
    assert loaded == {torch.bfloat16}, loaded
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    for name, p in engine.module.named_parameters():
        if p.__class__.__name__ == "Params4bit":
            assert torch.equal(p.view(torch.uint8), codes[name].view(torch.uint8)), f"{name}: the 4-bit codes changed"
        else:
            assert p.dtype == torch.bfloat16, f"{name} is {p.dtype}"
    masters = engine.optimizer.single_partition_of_fp32_groups
    assert masters and all(m.dtype == torch.float32 for m in masters)
    lora = {n: p.detach().float().clone() for n, p in engine.module.named_parameters() if "lora_B" in n}
    ids = torch.randint(10, 100, (1, 16))
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    assert any(not torch.equal(p.detach().float(), lora[n]) for n, p in engine.module.named_parameters() if n in lora)
