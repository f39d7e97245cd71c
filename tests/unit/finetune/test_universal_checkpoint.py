"""Universal checkpoints (another world size or ZeRO stage at resume): when dsft converts, that the copy is atomic,
and that a converted checkpoint restores the exact weights and Adam moments, ZeRO 1-3, full and LoRA.

In-process DeepSpeed engines in a gloo world of one: a world of one writes the same shard layout as any other (one
shard per rank), so converting and loading it as universal exercises the code a world-size change runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from finetune import checkpoint as ck

REPO = Path(__file__).resolve().parents[3]


def make_engine(model_dir: Path, stage: int, lora: bool = False, universal: bool = False, seed: int = 0):
    """A DeepSpeed engine on the tiny model (AdamW, fp32), optionally LoRA, optionally loading universal."""
    import deepspeed
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "steps_per_print": 10**9,
    }
    if universal:
        config["checkpoint"] = {"load_universal": True}
    from finetune.model import param_groups

    # ZeRO-3: the engine's own groups (decay on matrices, none on norms), where DeepSpeed's universal load mixed up
    # groups. ZeRO 1-2 keep one group: deepspeed.utils.safe_get_full_optimizer_state (full_state below) finds no
    # moments for a second group's parameters there.
    params = param_groups(model, 0.1) if stage == 3 else [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=config)
    return engine


def train(engine, n: int, seed: int) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    vocab = engine.module.config.vocab_size
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (2, 16), generator=g)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        out.append(loss.item())
    return out


def full_state(engine) -> dict[str, dict[str, torch.Tensor]]:
    """Every trainable parameter's fp32 master weight and Adam moments, gathered over ranks (any ZeRO stage)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    return {
        name: {
            "fp32": safe_get_full_fp32_param(p).clone(),
            "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").clone(),
            "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").clone(),
        }
        for name, p in engine.module.named_parameters()
        if p.requires_grad
    }


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            assert torch.equal(a[name][key], b[name][key]), f"{name} {key} differs"


# ----------------------------------------------------------------------------------------------------------------
# when to convert (pure)
# ----------------------------------------------------------------------------------------------------------------
SHARDED = {"files": {"zero_pp_rank_0_mp_rank_00_optim_states.pt": {}, "mp_rank_00_model_states.pt": {}}}
WHOLE = {"files": {"mp_rank_00_model_states.pt": {}}}


def test_conversion_only_when_the_world_size_or_stage_changed():
    assert not ck.needs_universal({**SHARDED, "world_size": 2, "zero_stage": 2}, 2, 2, True)
    assert ck.needs_universal({**SHARDED, "world_size": 2, "zero_stage": 2}, 1, 2, True)
    assert ck.needs_universal({**SHARDED, "world_size": 2, "zero_stage": 2}, 2, 3, True)
    # written before the stage was recorded: only the world size can tell
    assert not ck.needs_universal({**SHARDED, "world_size": 2}, 2, 3, True)
    assert ck.needs_universal({**SHARDED, "world_size": 2}, 4, 1, True)
    # ZeRO-0 fp32 on both sides: the whole state is in every rank's file, any world size loads it as it is
    assert not ck.needs_universal({**WHOLE, "world_size": 2, "zero_stage": 0}, 1, 0, False)


def test_unloadable_changes_are_refused_naming_the_keys():
    with pytest.raises(ck.CheckpointError, match=r"zero.stage=2.*ZeRO-0.*zero.stage=0"):
        ck.needs_universal({**WHOLE, "world_size": 2, "zero_stage": 0}, 1, 2, True)
    with pytest.raises(ck.CheckpointError, match=r"zero.stage=0.*partitioned.*zero.stage=2"):
        ck.needs_universal({**SHARDED, "world_size": 2, "zero_stage": 2}, 1, 0, False)
    with pytest.raises(ck.CheckpointError, match="zero.offload_optimizer=nvme"):
        ck.needs_universal({**SHARDED, "world_size": 2, "zero_stage": 3}, 1, 3, True, nvme_optimizer=True)


# ----------------------------------------------------------------------------------------------------------------
# conversion + load_universal restore the exact state
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("stage", "lora"), [(1, False), (2, True), (3, False), (3, True)])
def test_universal_copy_restores_weights_and_adam_moments(dist_env, tiny_llama_dir, tmp_path, stage, lora):
    engine = make_engine(tiny_llama_dir, stage, lora)
    train(engine, 2, seed=1)
    step_dir = ck.save_checkpoint(engine, tmp_path, 2, {"step": 2})
    manifest = json.loads((step_dir / ck.MANIFEST_NAME).read_text())
    assert manifest["world_size"] == 1 and manifest["zero_stage"] == stage
    saved = full_state(engine)
    expected_next = train(engine, 2, seed=2)

    udir = ck.convert_to_universal(step_dir)
    assert udir == tmp_path / "step_00000002.universal" and (udir / "zero").is_dir()
    assert ck.verify_checkpoint(udir)["universal_of"]["name"] == step_dir.name
    assert (tmp_path / "latest_universal").read_text() == udir.name
    assert ck.find_latest_checkpoint(tmp_path) == step_dir, "the copy must never be a resume candidate itself"

    fresh = make_engine(tiny_llama_dir, stage, lora, universal=True, seed=99)
    client = ck.load_checkpoint(fresh, step_dir, universal_dir=udir)
    assert client["step"] == 2 and "universal_checkpoint_info" not in client
    assert_same_state(full_state(fresh), saved)
    assert fresh.global_steps == 2
    # what DeepSpeed 0.19's ZeRO-3 universal load gets wrong and load_checkpoint repairs: every group got group 0's
    # weight decay, and all groups shared one Adam step tensor (advanced once per group per step)
    base = fresh.optimizer.optimizer
    if stage == 3:
        assert [g["weight_decay"] for g in base.param_groups] == ([0.1] if lora else [0.1, 0.0])
    steps = [st["step"] for st in base.state.values()]
    assert steps and len({id(t) for t in steps}) == len(steps) and all(float(t) == 2 for t in steps)
    # training goes on from the restored state: the same next losses as the engine that never stopped
    assert train(fresh, 2, seed=2) == pytest.approx(expected_next, rel=1e-5)


def test_resolve_resume_converts_once_and_reuses_the_copy(dist_env, tiny_llama_dir, tmp_path, monkeypatch):
    engine = make_engine(tiny_llama_dir, 2)
    train(engine, 1, seed=1)
    step_dir = ck.save_checkpoint(engine, tmp_path, 1, {"step": 1})
    manifest = json.loads((step_dir / ck.MANIFEST_NAME).read_text())
    assert ck.resolve_resume(step_dir, 2, True).universal is False  # same world, same stage: loaded as it is

    # Pretend it was written by 2 ranks (the manifest is the record resolve_resume reads; the shards of a world of
    # one convert like any other).
    manifest["world_size"] = 2
    (step_dir / ck.MANIFEST_NAME).write_text(json.dumps(manifest))
    runs = []
    real = ck._run_ds_to_universal
    monkeypatch.setattr(ck, "_run_ds_to_universal", lambda *a: runs.append(a) or real(*a))
    first = ck.resolve_resume(step_dir, 2, True)
    assert first.universal and first.load_dir == ck.universal_dir(step_dir) and first.saved_world_size == 2
    assert ck.resolve_resume(step_dir, 2, True).load_dir == first.load_dir
    assert len(runs) == 1, "a current universal copy must be reused, not converted again"
    # the source saved again (same step, new content): the copy is stale and converted again
    manifest["created_unix"] += 1
    (step_dir / ck.MANIFEST_NAME).write_text(json.dumps(manifest))
    ck.resolve_resume(step_dir, 2, True)
    assert len(runs) == 2


def test_pruning_a_checkpoint_removes_its_universal_copy(dist_env, tiny_llama_dir, tmp_path):
    engine = make_engine(tiny_llama_dir, 1)
    first = ck.save_checkpoint(engine, tmp_path, 1, {}, keep_last=1)
    udir = ck.convert_to_universal(first)
    ck.save_checkpoint(engine, tmp_path, 2, {}, keep_last=1)
    assert not first.exists() and not udir.exists()
    assert not [p for p in tmp_path.iterdir() if ".deleting-" in p.name]


_KILL_DURING_CONVERSION = """
import os, signal, sys
from deepspeed.checkpoint import ds_to_universal
from finetune import checkpoint as ck

def die(*args, **kwargs):  # after the shards were extracted and merged, before the optimizer state is written
    print("KILLING", file=sys.stderr, flush=True)  # stdout is the conversion's, captured
    os.kill(os.getpid(), signal.SIGKILL)

ds_to_universal._save_optimizer_state = die
ck.convert_to_universal(sys.argv[1])
"""


def test_a_kill_during_conversion_leaves_the_original_resumable(dist_env, tiny_llama_dir, tmp_path):
    engine = make_engine(tiny_llama_dir, 2)
    train(engine, 1, seed=1)
    step_dir = ck.save_checkpoint(engine, tmp_path, 1, {"step": 1})
    saved = full_state(engine)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_DURING_CONVERSION, str(step_dir)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == -signal.SIGKILL and "KILLING" in proc.stderr, proc.stderr[-2000:]
    partial = tmp_path / "step_00000001.universal.partial"
    assert (partial / "zero").is_dir(), "the kill should have hit a half-written copy"
    assert not ck.universal_dir(step_dir).exists()
    assert ck.find_latest_checkpoint(tmp_path) == step_dir  # original intact, verified by hash

    udir = ck.convert_to_universal(step_dir)  # the next resume converts again, over the leftover
    assert not partial.exists() and ck.verify_checkpoint(udir)
    fresh = make_engine(tiny_llama_dir, 2, universal=True, seed=5)
    ck.load_checkpoint(fresh, step_dir, universal_dir=udir)
    assert_same_state(full_state(fresh), saved)


def test_export_universal_converts_on_demand_and_refuses_a_missing_checkpoint(dist_env, tiny_llama_dir, tmp_path):
    from finetune.export import main

    engine = make_engine(tiny_llama_dir, 1)
    train(engine, 1, seed=1)
    ck.save_checkpoint(engine, tmp_path, 1, {})
    assert main(["universal", "--checkpoint", str(tmp_path)]) == 0
    assert ck.verify_checkpoint(tmp_path / "step_00000001.universal")["universal_of"]["name"] == "step_00000001"
    assert main(["universal", "--checkpoint", str(tmp_path / "nothing")]) == 2


def test_make_ds_config_sets_load_universal_only_when_asked():
    from ds_configs import make_ds_config, resolve_batch

    plan = resolve_batch(micro_batch_size=2, grad_accum=1, world_size=1)
    assert "checkpoint" not in make_ds_config(zero_stage=2, batch=plan, precision="fp32")
    cfg = make_ds_config(zero_stage=2, batch=plan, precision="fp32", load_universal=True)
    assert cfg["checkpoint"]["load_universal"] is True
