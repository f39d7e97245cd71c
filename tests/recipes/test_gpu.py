"""GPU-only tests (``gpu`` marker; skipped on CPU machines, run by ``make gpu-check``): fp16 with dynamic loss
scaling, bf16, TF32 and 4-bit QLoRA, one GPU through the real launcher; TF32 as the engine sets it; the fp16 loss
scale on an overflow, on a real DeepSpeed engine."""

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


# ---------------------------------------------------------------- TF32: set by the engine, used by fp32 matmuls


def _fp32_matmul_error() -> float:
    """Mean relative error of a 1024x1024 fp32 matmul on the GPU against float64: about 4e-4 with TF32 (inputs
    rounded to 10 mantissa bits), 2e-7 without (measured on CPU)."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(0)
    a, b = (torch.randn(1024, 1024, device="cuda", generator=g) for _ in range(2))
    exact = a.double() @ b.double()
    return ((a @ b).double() - exact).abs().mean().item() / exact.abs().mean().item()


@pytest.mark.parametrize("tf32", [True, False])
def test_tf32_is_what_the_config_says_when_the_model_loads(tmp_path, monkeypatch, tiny_llama_dir, tf32):
    """engine.run sets TF32 from `tf32` (default true) before the model loads: the flags, and the precision an fp32
    matmul on this GPU actually gets. The flags start at the opposite value, so only the engine can have set them."""
    import torch

    from tests.engine_probe import run_until_model_load

    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    seen = {}

    def at_model_load():
        seen.update(matmul=matmul.allow_tf32, cudnn=cudnn.allow_tf32, precision=torch.get_float32_matmul_precision())
        seen["error"] = _fp32_matmul_error()

    saved = matmul.allow_tf32, cudnn.allow_tf32
    matmul.allow_tf32 = cudnn.allow_tf32 = not tf32
    try:
        overrides = ["precision=fp32", f"tf32={str(tf32).lower()}"]
        run_until_model_load(monkeypatch, tmp_path, tiny_llama_dir, *overrides, on_model_load=at_model_load)
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved
    assert seen["matmul"] is tf32 and seen["cudnn"] is tf32, seen
    assert seen["precision"] == ("high" if tf32 else "highest"), seen
    if torch.cuda.get_device_capability() >= (8, 0):  # TF32 tensor cores: Ampere and later
        assert (seen["error"] > 3e-5) is tf32, seen


# ---------------------------------------------------------------- fp16: the dynamic loss scale moves on an overflow

# Times the initial 2**16 scale: the gradient of a target logit (about 1/tokens) passes fp16's largest, 65504.
OVERFLOW = 1e4


def _weights(engine):
    import deepspeed
    import torch

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):  # ZeRO-3: partitioned
        return torch.cat([p.detach().float().flatten().cpu() for p in params])


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_fp16_overflow_skips_the_step_and_halves_the_loss_scale(tmp_path, monkeypatch, tiny_llama_dir, stage):
    """A real DeepSpeed fp16 engine built the way engine.run builds it (dsft's DeepSpeed config, load_model,
    param_groups): steps whose scaled gradients overflow fp16 are skipped with the weights untouched, the scale halves
    (ZeRO-1/2/3 after `hysteresis` overflows in a row; DeepSpeed 0.19's ZeRO-0 fp16 optimizers have no hysteresis
    and halve at once), dsft does not count them as bad steps while the scale is above 1, and a clean step is then
    applied at the halved scale."""
    from types import SimpleNamespace

    import deepspeed
    import torch

    import finetune.model
    from ds_configs import make_ds_config
    from finetune import distributed as dist
    from finetune.config import load_config
    from finetune.engine import _count_bad_step, _loss_scale, skip_non_finite_steps
    from finetune.model import load_model, param_groups
    from tests.engine_probe import world_of_one_env

    world_of_one_env(monkeypatch)
    dist.init()
    monkeypatch.setattr(finetune.model, "_HF_DS_CONFIG", None)  # ZeRO-3's zero.Init for from_pretrained ends here
    cfg = load_config(
        overrides=[
            f"model.name_or_path={tiny_llama_dir}",
            "data.train=unread",  # validate() wants one; the test feeds its own batch
            "method.name=full",
            "precision=fp16",
            f"zero.stage={stage}",
            "train.micro_batch_size=2",
            "train.grad_accum=1",  # every engine.step() is an optimizer step
            "train.global_batch=null",
            f"output_dir={tmp_path}",
        ]
    )
    optimizer = {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.0, "torch_adam": True}}
    ds_config = make_ds_config(
        zero_stage=stage, batch=cfg.validate(1), precision="fp16", optimizer=optimizer, hidden_size=64
    )
    model = load_model(cfg, ds_config, "fp16", "sdpa")
    engine, *_ = deepspeed.initialize(
        args=SimpleNamespace(device_rank=dist.cuda_index()),
        model=model,
        model_parameters=param_groups(model, 0.0),
        config=ds_config,
    )
    skip_non_finite_steps(engine)
    ids = torch.randint(10, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0)).to(
        engine.device
    )

    scale = _loss_scale(engine)
    assert scale == 2.0 ** ds_config["fp16"]["initial_scale_power"]
    before = _weights(engine)
    overflows = 1 if stage == 0 else ds_config["fp16"]["hysteresis"]
    for i in range(1, overflows + 1):
        engine.backward(engine(input_ids=ids, labels=ids).loss * OVERFLOW)
        engine.step()
        assert not engine.was_step_applied(), f"overflow {i} was applied"
        assert _loss_scale(engine) == (scale / 2 if i == overflows else scale), (i, _loss_scale(engine))
        assert _count_bad_step(False, engine, 0, cfg, "fp16", i) == 0  # calibrating, not a bad step
    assert engine.skipped_steps == overflows
    assert torch.equal(_weights(engine), before), "a skipped step changed the weights"

    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    assert engine.was_step_applied() and _loss_scale(engine) == scale / 2
    assert not torch.equal(_weights(engine), before)
