"""Launched by test_presets_launch.py under `deepspeed --num_gpus 2` on CPU: every preset initializes and steps.

Usage: deepspeed --num_gpus 2 tests/unit/ds_configs/presets_step.py MODEL_DIR NVME_DIR OUT_JSON
Rank 0 writes {preset: {"precision", "losses", "status"}} to OUT_JSON. All presets run in one process to pay the
launcher and import cost once.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import traceback

import deepspeed
import torch
from transformers import AutoModelForCausalLM

from ds_configs import make_ds_config, resolve_batch, resolve_precision
from ds_configs.build import PRESETS, preset_path
from finetune import distributed, ops

# fp32 and bf16 alternate so both precisions pass through every code path family (fp16 raises on CPU).
PRECISION = {
    "zero0": "fp32",
    "zero1": "bf16",
    "zero2": "fp32",
    "zero2_offload": "bf16",
    "zero3": "bf16",
    "zero3_offload": "fp32",
    "zero3_nvme": "bf16",
}


def nvme_supported() -> str | None:
    """None if DeepSpeed's async_io op can build here, else the reason."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if AsyncIOBuilder().is_compatible(verbose=False):
        return None
    return "DeepSpeed async_io (libaio) op is not compatible on this machine (libaio-dev missing)"


def run_preset(name: str, model_dir: str, nvme_dir: str) -> dict:
    stage, opt_dev, par_dev, _ = PRESETS[name]
    precision = resolve_precision(PRECISION[name], None)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batch = resolve_batch(world_size=world, micro_batch_size=2, grad_accum=1)
    # torch_adam avoids compiling FusedAdam's CPU op; with optimizer offload DeepSpeed uses DeepSpeedCPUAdam.
    params = {"lr": 1e-2, "weight_decay": 0.0}
    if opt_dev == "none":
        params["torch_adam"] = True
    cfg = make_ds_config(
        zero_stage=stage,
        batch=batch,
        precision=precision,
        offload_optimizer=opt_dev,
        offload_params=par_dev,
        nvme_path=nvme_dir if "nvme" in (opt_dev, par_dev) else None,
        gradient_clipping=1.0,
        optimizer={"type": "AdamW", "params": params},
        user_config=preset_path(name),
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ops.build((["CPUAdamBuilder"] if opt_dev != "none" else []) + (["AsyncIOBuilder"] if "nvme" in name else []))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    gen = torch.Generator().manual_seed(1234 + engine.global_rank)
    ids = torch.randint(0, model.config.vocab_size, (batch.micro_batch_size, 16), generator=gen)
    losses = []
    for _ in range(3):  # the same batch thrice: an optimizer that works lowers its loss
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach().float()))
    engine.destroy()
    # Free the engine (ZeRO-Infinity's async_io handles own C++ threads) while the interpreter runs: a joinable thread
    # destroyed at interpreter exit aborts the rank ("terminate called without an active exception", seen in CI
    # once the NVMe preset ran).
    del engine, model
    gc.collect()
    return {"precision": precision, "zero_stage": stage, "losses": losses, "status": "ok"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("nvme_dir")
    parser.add_argument("out_json")
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()
    model_dir, nvme_dir, out_json = args.model_dir, args.nvme_dir, args.out_json
    distributed.init()  # as the recipes do: op builds guarded against stale torch build locks
    results = {}
    for name in PRESETS:
        if "nvme" in name and (reason := nvme_supported()):
            results[name] = {"status": "skipped", "reason": reason}
            continue
        try:
            results[name] = run_preset(name, model_dir, nvme_dir)
        except Exception as exc:  # recorded per preset so one failure does not hide the others; the test fails
            results[name] = {"status": "error", "error": f"{type(exc).__name__}: {exc}", "tb": traceback.format_exc()}
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out_json, "w") as fh:
            json.dump(results, fh, indent=2)
    # Without it gloo can abort a rank at exit ("terminate called without an active exception", seen once in CI).
    distributed.destroy()


if __name__ == "__main__":
    main()
