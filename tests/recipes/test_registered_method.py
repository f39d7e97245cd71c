"""A method defined in a test file alone (``head_method.py``), registered with one call, trains through the real
``deepspeed --num_gpus 2`` launcher and the shared engine, and ``final/`` is what the method says: a complete model
whose LM head and final norm moved while every other weight is the base's, bit for bit."""

from __future__ import annotations

import json
import subprocess

from tests.recipes.conftest import kill_job, launch, losses, recipe_cmd

SCRIPT = "tests/recipes/head_method_script.py"


def test_a_method_registered_in_a_test_file_trains_through_the_recipe(tmp_path, tiny_llama_dir, counting_data):
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "run"
    overrides = ["train.max_steps=12", "train.micro_batch_size=2", "train.grad_accum=2", "zero.stage=2"]
    cmd = recipe_cmd("full", 2, tiny_llama_dir, counting_data, out, *overrides, "train.lr=1e-2", "method.name=lm_head")
    cmd[cmd.index("finetune/full.py")] = SCRIPT  # the same command line, with the test's own recipe script
    proc = launch(cmd, out)
    try:
        rc = proc.wait(timeout=600)
    except subprocess.TimeoutExpired:
        kill_job(proc)
        rc = "timeout"
    log = (tmp_path / "run.log").read_text(errors="replace")
    assert rc == 0, log[-4000:]

    curve = losses(out)
    first, last = curve[min(curve)], curve[max(curve)]
    assert last < first - 0.5, f"the head-only method did not learn: {first:.4f} -> {last:.4f} ({curve})"
    run_cfg = json.loads((out / "config.json").read_text())
    assert run_cfg["method"]["name"] == "head" and run_cfg["method"]["head"]["modules"] == ["lm_head"]

    # final/ is a complete model (not an adapter folder): only lm_head and model.norm differ from the base
    assert not (out / "final" / "adapter_config.json").exists()
    trained = load_file(out / "final" / "model.safetensors")
    base = load_file(tiny_llama_dir / "model.safetensors")
    assert trained.keys() == base.keys()
    moved = {k for k in base if not torch.equal(trained[k], base[k])}
    assert moved == {"lm_head.weight", "model.norm.weight"}, moved
    vocab = base["lm_head.weight"].shape[0]
    # the engine's trainable report counts what prepare() left trainable: the head (vocab x 64) and the norm (64)
    reported = int(log.split("method=head trainable params: ")[1].split(" ")[0].replace(",", ""))
    assert reported == vocab * 64 + 64
