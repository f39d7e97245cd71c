"""Resume on another world size through the real launchers: a run SIGKILLed after step 10 and resumed on fewer or
more ranks (or nodes) trains steps 11-20 with the losses of the uninterrupted run, within 1e-4 relative in fp32.

What makes it exact: the data order is world-size free (each optimizer step trains on the same rows whatever the
ranks x accumulation split, ``data_tools.loader``), and the engine converts the checkpoint to a DeepSpeed universal
checkpoint once, next to it, when the world size changed (``finetune.checkpoint``). Dropout is off: its random
streams are per rank, so they cannot follow a changed world size (the README says so); everything else is exact.

Ten real launches, 8-12 min on the 2-core machine: ``slow`` (``make test-all``). The fast suite proves the pieces in
process: the order (tests/unit/data_tools/test_loader.py) and the state round trip
(tests/unit/finetune/test_universal_checkpoint.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.recipes.conftest import kill_job, launch, losses, recipe_cmd, run_recipe, wait_for
from tests.reliability._harness import launch_two_nodes

STEPS = ["train.max_steps=20", "train.save_every=10", "train.lr=3e-3"]
BATCH = ["train.global_batch=4", "train.micro_batch_size=2", "train.grad_accum=null"]
LORA = ["method.lora.dropout=0.0"]  # per-rank dropout streams cannot follow a world-size change
REL = 1e-4


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


def _killed_after_step_10(cmd: list[str], out: Path) -> None:
    """Run ``cmd`` until its step-10 checkpoint is complete, then SIGKILL the whole job."""
    proc = launch(cmd, out)
    wait_for(out / "checkpoints" / "step_00000010", proc)
    kill_job(proc)
    _assert_killed_early(out)


def _assert_killed_early(out: Path) -> None:
    done = losses(out) if (out / "metrics.jsonl").exists() else {}
    assert max(done, default=0) < 20, "the job finished before it was killed; the test proves nothing"


def _assert_same_tail(out: Path, reference: dict[int, float]) -> None:
    log = Path(f"{out}.log").read_text(errors="replace")
    assert "resumed from" in log and "Traceback" not in log
    after = losses(out)
    assert sorted(after) == list(range(1, 21)), "metrics.jsonl should hold each step once after the resume"
    assert [after[s] for s in range(11, 21)] == pytest.approx([reference[s] for s in range(11, 21)], rel=REL)


@pytest.mark.slow
def test_lora_zero2_killed_on_two_ranks_resumes_on_one(tmp_path, tiny_llama_dir, counting_data):
    """2 ranks -> 1 rank (accumulation 1 -> 2). On the way: a resume that changes the data order is refused by key
    (after the conversion, before any step), and the universal copy holds exactly the 2 ranks' model and Adam state."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    data = {"train": counting_data["train"]}
    args = [*BATCH, *STEPS, *LORA, "zero.stage=2"]
    reference = losses(run_recipe("lora", tiny_llama_dir, data, tmp_path / "ref", *args))
    out = tmp_path / "run"
    _killed_after_step_10(recipe_cmd("lora", 2, tiny_llama_dir, data, out, *args), out)
    step_dir = out / "checkpoints" / "step_00000010"
    manifest = json.loads((step_dir / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["zero_stage"] == 2

    proc = launch(recipe_cmd("lora", 1, tiny_llama_dir, data, out, *args, "train.seed=5", launcher="python"), out)
    assert proc.wait(timeout=600) == 2
    log = Path(f"{out}.log").read_text()
    assert "config error: train.resume:" in log and "train.seed=5: the checkpoint was trained with train.seed=42" in log
    assert "Traceback" not in log

    udir = out / "checkpoints" / "step_00000010.universal"
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

    mtime = (udir / "manifest.json").stat().st_mtime_ns
    run_recipe("lora", tiny_llama_dir, data, out, *args, nproc=1, launcher="python")
    assert (udir / "manifest.json").stat().st_mtime_ns == mtime, "the universal copy is made once and reused"
    _assert_same_tail(out, reference)


@pytest.mark.slow
def test_full_zero3_killed_on_one_rank_resumes_on_two(tmp_path, tiny_llama_dir, counting_data):
    """1 rank -> 2 ranks (accumulation 2 -> 1), full fine-tuning under ZeRO-3."""
    data = {"train": counting_data["train"]}
    args = [*BATCH, *STEPS, "zero.stage=3"]
    reference = losses(run_recipe("full", tiny_llama_dir, data, tmp_path / "ref", *args, nproc=1, launcher="python"))
    out = tmp_path / "run"
    _killed_after_step_10(recipe_cmd("full", 1, tiny_llama_dir, data, out, *args, launcher="python"), out)
    run_recipe("full", tiny_llama_dir, data, out, *args)
    assert (out / "checkpoints" / "step_00000010.universal" / "manifest.json").is_file()
    _assert_same_tail(out, reference)


@pytest.mark.slow
def test_lora_zero3_two_node_job_resumes_on_one_node(tmp_path, tiny_llama_dir, counting_data):
    """A 2-node job (hostfile, --no_ssh, one rank per node) killed after step 10, resumed on one node with one rank."""
    data = {"train": counting_data["train"]}
    args = [*BATCH, *STEPS, *LORA, "zero.stage=3"]
    reference = losses(run_recipe("lora", tiny_llama_dir, data, tmp_path / "ref", *args))
    out = tmp_path / "run"
    cmd = recipe_cmd("lora", 1, tiny_llama_dir, data, out, *args, launcher="python")
    assert cmd[0] == sys.executable
    nodes = launch_two_nodes(cmd[1:], tmp_path, tag="two_nodes")
    try:
        wait_for(out / "checkpoints" / "step_00000010", nodes[0].proc)
    finally:
        for node in nodes:
            node.kill_all()
    _assert_killed_early(out)
    manifest = json.loads((out / "checkpoints" / "step_00000010" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    run_recipe("lora", tiny_llama_dir, data, out, *args, nproc=1, launcher="python")
    _assert_same_tail(out, reference)
