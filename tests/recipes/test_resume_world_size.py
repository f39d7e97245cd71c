"""A 2-rank LoRA ZeRO-2 run resumed on 1 rank through the real launchers: the engine converts the checkpoint to a
DeepSpeed universal checkpoint once, next to it, and the converted model and Adam state equal what the 2 ranks saved
(re-derived here from their shards independently of the conversion). The data order is not world-size free yet, so
the resume then stops at the loader with a config error naming the world size; settings that change the data order
are refused by key before that.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.recipes.conftest import launch, recipe_cmd, run_recipe

BATCH = ["train.global_batch=4", "train.micro_batch_size=2", "train.grad_accum=null", "zero.stage=2"]


def _flat_moments(step_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """exp_avg/exp_avg_sq per parameter from the ZeRO-2 shards: each rank holds a slice of each group's flat
    buffer; concatenated in rank order they give the group's buffer (padding at the end), cut by param_shapes."""
    model = torch.load(step_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    shards = [
        torch.load(p, map_location="cpu", weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]
        for p in sorted(step_dir.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    ]
    assert len(shards) == 2
    out = {}
    for g, shapes in enumerate(model["param_shapes"]):
        flat = {k: torch.cat([s["state"][g][k] for s in shards]) for k in ("exp_avg", "exp_avg_sq")}
        offset = 0
        for name, shape in shapes.items():
            n = shape.numel()
            out[name] = {k: v[offset : offset + n].view(shape) for k, v in flat.items()}
            offset += n
    return out


# Three real launches (2 ranks, then 1 rank twice) with a universal conversion: 230-400 s on the 2-core machine, so it
# runs in `make test-all`; the fast suite proves the same state round trip in-process
# (tests/unit/finetune/test_universal_checkpoint.py).
@pytest.mark.slow
def test_two_rank_lora_checkpoint_resumes_its_state_on_one_rank(tmp_path, tiny_llama_dir, counting_data):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    data = {"train": counting_data["train"]}
    out = tmp_path / "run"
    steps = ["train.max_steps=4", "train.save_every=4"]
    run_recipe("lora", tiny_llama_dir, data, out, *BATCH, *steps, "train.lr=3e-3")
    step_dir = out / "checkpoints" / "step_00000004"
    manifest = json.loads((step_dir / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["zero_stage"] == 2

    # A changed data order is refused by key (after the conversion, before the loader).
    proc = launch(
        recipe_cmd(
            "lora", 1, tiny_llama_dir, data, out, *BATCH, "train.max_steps=8", "train.seed=5", launcher="python"
        ),
        out,
    )
    assert proc.wait(timeout=600) == 2
    log = Path(f"{out}.log").read_text()
    assert "config error: train.resume:" in log and "train.seed=5: the checkpoint was trained with train.seed=42" in log
    assert "Traceback" not in log

    udir = out / "checkpoints" / "step_00000004.universal"
    umanifest = json.loads((udir / "manifest.json").read_text())
    assert umanifest["universal_of"]["name"] == step_dir.name and umanifest["world_size"] is None
    weights = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
    moments = _flat_moments(step_dir)
    assert moments and set(moments) <= set(weights)
    for name, states in moments.items():
        param_dir = udir / "zero" / name
        assert torch.equal(torch.load(param_dir / "fp32.pt", weights_only=False)["param"], weights[name].float())
        for key, expected in states.items():
            assert torch.equal(torch.load(param_dir / f"{key}.pt", weights_only=False)["param"], expected), name

    # The same settings: the model and optimizer load (the copy is reused), then the loader refuses the world size.
    mtime = (udir / "manifest.json").stat().st_mtime_ns
    proc = launch(recipe_cmd("lora", 1, tiny_llama_dir, data, out, *BATCH, "train.max_steps=8", launcher="python"), out)
    assert proc.wait(timeout=600) == 2
    log = Path(f"{out}.log").read_text()
    assert "config error: train.resume:" in log and "world" in log.split("config error:")[-1].lower()
    assert "Traceback" not in log and (udir / "manifest.json").stat().st_mtime_ns == mtime
