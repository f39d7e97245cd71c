"""Config errors fail before launch with a message naming the key; YAML + overrides load typed values."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.config import Config, ConfigError, describe, load_config

REPO = Path(__file__).resolve().parents[3]
BASE = ["model.name_or_path=m", "data.train=d", "output_dir=o"]


def _cfg(*overrides: str, path=None) -> Config:
    return load_config(path, [*BASE, *overrides])


def test_yaml_then_overrides_typed(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("train:\n  lr: 1.0e-4\n  micro_batch_size: 2\nzero:\n  stage: 3\nmethod:\n  name: lora\n")
    cfg = _cfg("train.lr=3e-4", "method.lora.target_modules=q_proj,v_proj", "tf32=false", "data.eval=null", path=y)
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.micro_batch_size == 2 and cfg.zero.stage == 3 and cfg.method.name == "lora"
    assert cfg.method.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.tf32 is False and cfg.data.eval is None
    assert _cfg().method.lora.target_modules == "all-linear"


def test_every_shipped_yaml_loads():
    for name in ("full", "lora", "qlora", "sft", "ptuning_v2", "prompt_tuning"):
        y = REPO / "finetune" / "configs" / f"{name}.yaml"
        cfg = load_config(y)
        assert cfg.model.name_or_path, y
        assert y.read_text().startswith("#") and "finetune/" in y.read_text().splitlines()[1], f"{y}: no command line"


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.lrr=1", "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
        ("zero.stag=2", "did you mean 'zero.stage'?"),
        ("zero.stage=5", "zero.stage=5"),
        ("train.max_steps=ten", "train.max_steps='ten': expected an integer"),
        ("precision=fp8", "precision='fp8'"),
        ("model.gradient_checkpointing=maybe", "model.gradient_checkpointing"),
        ("data.over_length=cut", "data.over_length='cut': expected one of truncate, drop, error"),
        ("data.on_error=ignore", "data.on_error='ignore': expected one of fail, skip"),
        ("data.max_length=long", "data.max_length='long': expected an integer"),
    ],
)
def test_load_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        _cfg(override)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["train.micro_batch_size=3", "train.grad_accum=2", "train.global_batch=8"], "train.global_batch"),
        (["precision=fp16", "model.dtype=bfloat16"], "model.dtype"),
        (["method.name=qlora", "zero.stage=3", "zero.offload_params=cpu"], "zero.offload_params"),
        (["method.name=qlora", "method.qlora.bits=8", "zero.stage=3"], "method.qlora.bits"),
        (["zero.offload_params=cpu", "zero.stage=2"], "zero.offload_params"),
        (["zero.offload_optimizer=nvme", "zero.stage=2"], "zero.nvme_path"),
        (["method.name=prefix", "data.packing=packed"], "data.packing"),
        (["train.lr=0"], "train.lr"),
        (["train.resume=/no/such/ckpt"], "train.resume"),
        (["data.max_length=0"], "data.max_length=0 must be >= 1"),
        (["data.chat_template=/no/such/template.jinja"], "data.chat_template=/no/such/template.jinja: no such file"),
    ],
)
def test_validate_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        _cfg("train.micro_batch_size=2", *overrides).validate(world_size=2)
    assert key in str(e.value)


def test_user_deepspeed_json_with_fp16_and_bf16(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"fp16": {"enabled": True}, "bf16": {"enabled": True}}))
    with pytest.raises(ConfigError, match="deepspeed=.*both fp16.enabled and bf16.enabled"):
        _cfg(f"deepspeed={ds}", "train.micro_batch_size=1").validate(world_size=1)


def test_batch_plan_comes_from_resolve_batch():
    plan = _cfg("train.global_batch=16", "train.micro_batch_size=2").validate(world_size=2)
    assert (plan.micro_batch_size, plan.grad_accum, plan.world_size, plan.global_batch) == (2, 4, 2, 16)


def test_data_max_length_null_is_seq_len():
    assert _cfg("data.seq_len=256").data.sample_max_length("messages") == 256
    assert _cfg("data.seq_len=256").data.sample_max_length("text") is None  # documents are cut into rows, not lost
    assert _cfg("data.seq_len=256", "data.max_length=300").data.sample_max_length("text") == 300
    d = _cfg().data
    assert (d.over_length, d.on_error, d.chat_template) == ("truncate", "fail", None)


def test_packing_auto_follows_method():
    assert _cfg().packing == "packed"
    assert _cfg("method.name=prompt").packing == "padding"


def test_every_field_has_help():
    rows = describe()
    assert {"train.lr", "zero.offload_optimizer", "method.qlora.bits", "method.prompt.init_text"} <= {
        r[0] for r in rows
    }
    assert all(help_ for _, _, help_ in rows), [k for k, _, h in rows if not h]


def test_recipe_fails_before_launch_naming_the_key(tmp_path):
    """The recipe entry point validates before creating a process group: exit 2, message names the key."""
    cmd = [sys.executable, "finetune/lora.py", "--config", "finetune/configs/lora.yaml", *BASE, "train.lrr=1"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "unknown key 'train.lrr' (did you mean 'train.lr'?)" in r.stderr


def test_lr_schedule_warmup_then_decay():
    from finetune.engine import lr_factor

    f = [lr_factor(s, 10, 2, "cosine", 0.1) for s in range(10)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[2] == 1.0 and f[-1] > 0.1
    assert all(a >= b for a, b in zip(f[1:], f[2:], strict=False))
    assert lr_factor(9, 10, 0, "linear", 0.0) == pytest.approx(0.1)
    assert lr_factor(5, 10, 0, "constant", 0.0) == 1.0


def test_user_deepspeed_json_auto_precision_is_accepted(tmp_path):
    """ "auto" means "filled from precision", not "enabled": a JSON with both on auto is valid."""
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"}, "train_batch_size": "auto"}))
    assert _cfg(f"deepspeed={ds}", "train.micro_batch_size=1").validate(world_size=1).global_batch == 1
    ds.write_text(json.dumps({"fp16": {"enabled": True}}))
    with pytest.raises(ConfigError, match="precision=bf16 but deepspeed="):
        _cfg(f"deepspeed={ds}", "precision=bf16", "train.micro_batch_size=1").validate(world_size=1)
