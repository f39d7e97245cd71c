"""make_ds_config: emitted sections, "auto" filling from a user's JSON, contradiction and validation messages."""

from __future__ import annotations

import json

import pytest

from ds_configs import BatchPlan, make_ds_config, resolve_precision, validate_ds_config
from ds_configs.build import gpu_arch_capability

PLAN = BatchPlan(micro_batch_size=2, grad_accum=4, world_size=2)


def test_batch_fields_come_from_the_plan():
    cfg = make_ds_config(zero_stage=2, batch=PLAN, precision="bf16")
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (
        16,
        2,
        4,
    )
    assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
    assert cfg["zero_optimization"]["stage"] == 2
    assert cfg["zero_optimization"]["overlap_comm"] is True
    assert "offload_optimizer" not in cfg["zero_optimization"]
    json.dumps(cfg)  # JSON-serialisable


def test_fp16_uses_dynamic_loss_scaling():
    fp16 = make_ds_config(zero_stage=1, batch=PLAN, precision="fp16")["fp16"]
    assert fp16["enabled"] is True and fp16["loss_scale"] == 0
    assert {"initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale"} <= set(fp16)


def test_stage3_offload_sections():
    cfg = make_ds_config(
        zero_stage=3, batch=PLAN, precision="bf16", offload_optimizer="nvme", offload_params="cpu", nvme_path="/nvme"
    )
    zero = cfg["zero_optimization"]
    assert zero["offload_optimizer"] == {**zero["offload_optimizer"], "device": "nvme", "nvme_path": "/nvme"}
    assert zero["offload_param"]["device"] == "cpu" and zero["offload_param"]["pin_memory"] is True
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert "aio" in cfg


def test_hidden_size_sizes_buckets_like_hf_auto():
    zero = make_ds_config(zero_stage=3, batch=PLAN, precision="bf16", hidden_size=4096)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 4096 * 4096
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 4096 * 4096)
    assert zero["stage3_param_persistence_threshold"] == 10 * 4096


def test_small_models_get_a_bucket_floor_not_one_collective_per_parameter():
    from ds_configs.build import MIN_BUCKET

    for stage in (2, 3):
        zero = make_ds_config(zero_stage=stage, batch=PLAN, precision="bf16", hidden_size=128)["zero_optimization"]
        assert zero["reduce_bucket_size"] == MIN_BUCKET > 128 * 128


def test_optimizer_passed_through():
    opt = {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.0}}
    assert make_ds_config(zero_stage=0, batch=PLAN, precision="fp32", optimizer=opt)["optimizer"] == opt


def test_user_config_auto_values_are_filled(tmp_path):
    user = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": 2, "reduce_bucket_size": 12345},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": [0.9, 0.95]}},
    }
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    cfg = make_ds_config(
        zero_stage=2,
        batch=PLAN,
        precision="bf16",
        gradient_clipping=0.5,
        optimizer={"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95]}},
        user_config=path,
    )
    assert cfg["train_batch_size"] == 16 and cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"]["enabled"] is True
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 12345  # user's tuning knob kept
    assert cfg["optimizer"]["params"]["lr"] == 3e-4


def test_user_bfloat16_alias_is_understood():
    cfg = make_ds_config(zero_stage=0, batch=PLAN, precision="bf16", user_config={"bfloat16": {"enabled": True}})
    assert cfg["bf16"]["enabled"] is True and "bfloat16" not in cfg


@pytest.mark.parametrize(
    ("user", "key"),
    [
        ({"train_micro_batch_size_per_gpu": 8}, "train_micro_batch_size_per_gpu"),
        ({"gradient_accumulation_steps": 1}, "gradient_accumulation_steps"),
        ({"fp16": {"enabled": True}}, "fp16.enabled"),
        ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage"),
        ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, "zero_optimization.offload_optimizer.device"),
        ({"gradient_clipping": 2.0}, "gradient_clipping"),
    ],
)
def test_contradicting_user_value_names_the_json_key(user, key):
    with pytest.raises(ValueError, match=rf'ds_config: "{key}" .* make them agree or write "auto"'):
        make_ds_config(zero_stage=2, batch=PLAN, precision="bf16", user_config=user)


def test_agreeing_explicit_user_value_is_accepted():
    cfg = make_ds_config(zero_stage=2, batch=PLAN, precision="bf16", user_config={"train_batch_size": 16.0})
    assert cfg["train_batch_size"] == 16


def test_auto_without_a_value_is_an_error():
    with pytest.raises(ValueError, match=r'"scheduler.params.warmup_num_steps" is "auto"'):
        make_ds_config(
            zero_stage=0,
            batch=PLAN,
            precision="fp32",
            user_config={"scheduler": {"params": {"warmup_num_steps": "auto"}}},
        )
    with pytest.raises(ValueError, match="pass nvme_path"):
        make_ds_config(
            zero_stage=3,
            batch=PLAN,
            precision="fp32",
            offload_optimizer="nvme",
            user_config={"zero_optimization": {"offload_optimizer": {"device": "nvme", "nvme_path": "auto"}}},
        )


def test_bad_json_file_reports_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n "train_batch_size": 4,\n oops\n}')
    with pytest.raises(ValueError, match=rf"{path}:3: not valid JSON"):
        make_ds_config(zero_stage=0, batch=PLAN, precision="fp32", user_config=path)
    with pytest.raises(ValueError, match="not found"):
        make_ds_config(zero_stage=0, batch=PLAN, precision="fp32", user_config=tmp_path / "missing.json")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(zero_stage=2, offload_params="cpu"), r'"zero_optimization.offload_param.device" is cpu .*stage" 3'),
        (dict(zero_stage=0, offload_optimizer="cpu"), r"optimizer offload needs .*>= 1"),
        (dict(zero_stage=3, offload_optimizer="nvme"), r'"zero_optimization.offload_optimizer.nvme_path" is not set'),
        (dict(zero_stage=2, offload_optimizer="nvme", nvme_path="/x"), r"nvme \(ZeRO-Infinity\), which needs"),
        (dict(zero_stage=4), r"zero_stage=4: expected 0, 1, 2 or 3"),
        (dict(zero_stage=2, precision="auto"), r"resolve 'auto' with resolve_precision"),
        (dict(zero_stage=2, offload_optimizer="disk"), r"offload_optimizer='disk'"),
        (dict(zero_stage=2, gradient_clipping=-1), r"gradient_clipping=-1"),
    ],
)
def test_invalid_combinations(kwargs, match):
    kwargs = {"batch": PLAN, "precision": "bf16", **kwargs}
    with pytest.raises(ValueError, match=match):
        make_ds_config(**kwargs)


def test_both_precisions_enabled_is_rejected():
    with pytest.raises(ValueError, match='"fp16.enabled" and "bf16.enabled" are both true'):
        validate_ds_config({"fp16": {"enabled": True}, "bf16": {"enabled": True}})


def test_validate_rejects_leftover_auto_and_bad_batch():
    with pytest.raises(ValueError, match='"train_batch_size" is still "auto"'):
        validate_ds_config({"train_batch_size": "auto"})
    with pytest.raises(ValueError, match="build the three from one ds_configs.BatchPlan"):
        validate_ds_config(
            {"train_batch_size": 10, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2},
            world_size=2,
        )


@pytest.mark.parametrize(
    ("precision", "capability", "expected"),
    [
        ("auto", (8, 0), "bf16"),
        ("auto", (9, 0), "bf16"),
        ("auto", (7, 0), "fp16"),
        ("auto", None, "fp32"),
        ("bf16", None, "bf16"),
        ("fp32", (7, 5), "fp32"),
        ("fp16", (9, 0), "fp16"),
    ],
)
def test_resolve_precision(precision, capability, expected):
    assert resolve_precision(precision, capability) == expected


def test_resolve_precision_refusals():
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        resolve_precision("fp16", None)
    with pytest.raises(ValueError, match=r"bf16 needs compute capability >= 8.0 .* 7.0"):
        resolve_precision("bf16", (7, 0))
    with pytest.raises(ValueError, match="expected one of"):
        resolve_precision("int8")


def test_gpu_arch_names():
    assert gpu_arch_capability("A100") == (8, 0)
    assert gpu_arch_capability("sm_75") == (7, 5)
    assert gpu_arch_capability("8.9") == (8, 9)
    with pytest.raises(ValueError, match="unknown"):
        gpu_arch_capability("tpu")


def test_user_value_for_an_argument_the_caller_left_unset_is_kept():
    user = {"zero_optimization": {"offload_optimizer": {"device": "nvme", "nvme_path": "/local/nvme"}}}
    cfg = make_ds_config(zero_stage=3, batch=PLAN, precision="bf16", offload_optimizer="nvme", user_config=user)
    assert cfg["zero_optimization"]["offload_optimizer"]["nvme_path"] == "/local/nvme"


def test_zero_settings_from_a_preset_make_a_consistent_config():
    from ds_configs import zero_settings_from_json
    from ds_configs.build import preset_path

    settings = zero_settings_from_json(preset_path("zero3_offload"))
    assert settings == {"zero_stage": 3, "offload_optimizer": "cpu", "offload_params": "cpu"}
    cfg = make_ds_config(batch=PLAN, precision="bf16", user_config=preset_path("zero3_offload"), **settings)
    assert cfg["zero_optimization"]["offload_param"]["device"] == "cpu"
