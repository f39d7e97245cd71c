"""GPU-only recipe runs (``gpu`` marker; skipped on CPU machines): fp16 with dynamic loss scaling, bf16, TF32 and
4-bit QLoRA, one GPU through the real launcher."""

from __future__ import annotations

import json

import pytest

from tests.recipes.conftest import metrics, run_recipe

pytestmark = pytest.mark.gpu

SHORT = ["train.max_steps=16", "train.micro_batch_size=2", "train.grad_accum=2", "train.global_batch=null"]


@pytest.mark.parametrize(
    "recipe,extra",
    [
        pytest.param("full", ["precision=fp16", "train.lr=3e-3"], id="fp16-loss-scaling"),
        pytest.param("full", ["precision=bf16", "train.lr=3e-3"], id="bf16"),
        pytest.param("full", ["precision=fp32", "tf32=true", "train.lr=3e-3"], id="fp32-tf32"),
        pytest.param("lora", ["method.name=qlora", "precision=bf16", "train.lr=1e-2"], id="qlora-4bit-bf16"),
    ],
)
def test_gpu_precisions_train(tmp_path, tiny_llama_dir, counting_data, recipe, extra):
    out = run_recipe(recipe, tiny_llama_dir, counting_data, tmp_path / "run", *SHORT, "zero.stage=2", *extra, nproc=1)
    rows = metrics(out)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.2, [r["loss"] for r in rows]
    ds = json.loads((out / "ds_config.json").read_text())
    if "precision=fp16" in extra:
        assert ds["fp16"]["enabled"] and all(r["loss_scale"] for r in rows)  # dynamic loss scale is reported
    if "precision=bf16" in extra:
        assert ds["bf16"]["enabled"]
    assert rows[-1]["mfu"] is None or 0 < rows[-1]["mfu"] < 1
