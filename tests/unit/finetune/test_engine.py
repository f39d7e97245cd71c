"""Engine pieces that need no process group: the bad-step policy and metrics files."""

from __future__ import annotations

import json

import pytest

from finetune.config import load_config
from finetune.engine import TrainingAborted, _count_bad_step
from finetune.metrics import MetricsLogger, flops_per_token, matmul_params, mfu, peak_flops_per_gpu

NAN = float("nan")


class _Engine:
    def __init__(self, fp16: bool = False, scale: float = 1.0):
        self._fp16 = fp16

        class _Opt:
            cur_scale = scale

        self.optimizer = _Opt()

    def fp16_enabled(self) -> bool:
        return self._fp16

    def get_global_grad_norm(self) -> float:
        return NAN


def _cfg(**train):
    return load_config(None, [f"train.{k}={v}" for k, v in train.items()])


def test_skipped_steps_count_then_abort_with_lr_hint():
    cfg, engine = _cfg(max_bad_steps=3, lr=0.5), _Engine()
    streak = _count_bad_step(False, engine, 0, cfg, "fp32", 1)
    streak = _count_bad_step(False, engine, streak, cfg, "fp32", 2)
    assert streak == 2
    assert _count_bad_step(True, engine, streak, cfg, "fp32", 3) == 0  # an applied step resets the streak
    streak = 0
    for step in (4, 5):
        streak = _count_bad_step(False, engine, streak, cfg, "bf16", step)
    with pytest.raises(TrainingAborted, match=r"3 consecutive.*train.lr=0.5"):
        _count_bad_step(False, engine, streak, cfg, "bf16", 6)


def test_fp16_overflow_only_counts_at_the_loss_scale_floor():
    cfg = _cfg(max_bad_steps=1)
    assert _count_bad_step(False, _Engine(fp16=True, scale=2.0**15), 0, cfg, "fp16", 1) == 0
    with pytest.raises(TrainingAborted, match="precision=bf16"):
        _count_bad_step(False, _Engine(fp16=True, scale=1.0), 0, cfg, "fp16", 2)


def test_metrics_jsonl_tensorboard_and_plot(tmp_path):
    log = MetricsLogger(tmp_path)
    for step, loss in enumerate([3.0, 2.0, 1.5], start=1):
        log.log({"step": step, "split": "train", "loss": loss, "lr": 1e-3, "grad_norm": None})
    log.log({"step": 3, "split": "eval", "loss": 1.7, "ppl": 5.47})
    assert log.plot().stat().st_size > 1000
    log.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [3.0, 2.0, 1.5, 1.7] and rows[0]["grad_norm"] is None
    assert list((tmp_path / "tensorboard").iterdir())
    assert not MetricsLogger(tmp_path / "other", enabled=False).enabled and not (tmp_path / "other").exists()


def test_a_resume_drops_later_rows_and_the_data_rows(tmp_path):
    """Data rows (step 0) are logged again at every start; rows past the checkpoint are recomputed."""
    from finetune.engine import _truncate_metrics

    log = MetricsLogger(tmp_path)
    log.log({"step": 0, "split": "data", "source": "data.train", "truncated": 3})
    for step in (1, 2, 3):
        log.log({"step": step, "split": "train", "loss": 1.0 / step})
    log.close()
    _truncate_metrics(tmp_path / "metrics.jsonl", 2)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in rows] == [(1, "train"), (2, "train")]


def test_mfu_is_none_without_a_known_gpu():
    import torch

    if torch.cuda.is_available():
        value = mfu(6e9, 1000.0, peak_flops_per_gpu(), 1)  # None only for a GPU missing from the peak table
        assert value is None or 0 < value < 1
    else:
        assert peak_flops_per_gpu() is None and mfu(6e9, 1000.0, None, 2) is None  # CPU: no peak to compare with


def test_flops_per_token_counts_matmul_weights_of_the_real_model(tiny_llama_dir):
    """6 per trainable weight, 4 per frozen one, the input embedding (a lookup) left out: the benchmark's convention."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    assert matmul_params(model) == (total - embedding, 0)
    assert flops_per_token(*matmul_params(model)) == 6 * (total - embedding)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert matmul_params(lora) == (trainable, total - embedding)
    assert flops_per_token(*matmul_params(lora)) == 6 * trainable + 4 * (total - embedding)


def test_raw_jsonl_is_converted_once_and_redone_when_unfinished(tmp_path, tiny_tokenizer):
    from data_tools.meta import meta_path
    from finetune.data import resolve_data

    raw = tmp_path / "chat.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"{i}+1"}, {"role": "assistant", "content": f"{i + 1}"}]}
        for i in range(4)
    ]
    raw.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = load_config(None, [f"output_dir={tmp_path / 'out'}", "data.format=messages", "data.seq_len=64"])
    prefix = resolve_data(str(raw), cfg, tiny_tokenizer)
    bin_file = tmp_path / "out" / "data_cache" / f"{prefix.rsplit('/', 1)[1]}.bin"
    first = bin_file.stat().st_mtime_ns
    assert resolve_data(str(raw), cfg, tiny_tokenizer) == prefix
    assert bin_file.stat().st_mtime_ns == first, "a finished conversion is reused"
    meta_path(prefix).unlink()  # as if the converter died after renaming the data files but before the meta
    assert resolve_data(str(raw), cfg, tiny_tokenizer) == prefix
    assert meta_path(prefix).is_file(), "an unfinished conversion is redone"


def test_a_nan_step_is_skipped_on_every_zero_stage_and_precision(tiny_llama_dir, tmp_path):
    """Real DeepSpeed engines (world of one, fresh process): the NaN step is not applied and the weights stay finite,
    then training goes on. Without skip_non_finite_steps, ZeRO-0 fp32 turns every weight into NaN."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("nan_step_script.py")
    out = tmp_path / "nan.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR")}
    repo = Path(__file__).resolve().parents[3]
    proc = subprocess.run(
        [sys.executable, str(script), str(tiny_llama_dir), str(out)],
        cwd=repo,
        env={**env, "PYTHONPATH": str(repo)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert len(results) == 8
    for case, (good, poisoned, after) in results.items():
        assert good == {"applied": True, "finite": True}, case
        assert poisoned == {"applied": False, "finite": True}, case
        assert after == {"applied": True, "finite": True}, case


@pytest.mark.parametrize(
    ("name", "precision", "tf32", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", True, 989.0),
        ("NVIDIA H100 80GB HBM3", "fp32", True, 494.5),  # fp32 matmuls run on TF32 tensor cores
        ("NVIDIA H100 80GB HBM3", "fp32", False, 66.9),
        ("NVIDIA H100 PCIe", "bf16", True, 756.0),  # the longer name wins
        ("NVIDIA L40", "bf16", True, 181.0),  # not the L4's 121
        ("NVIDIA L40S", "bf16", True, 362.0),
        ("NVIDIA L4", "bf16", True, 121.0),
        ("Tesla V100-SXM2-32GB", "fp32", True, 15.7),  # no TF32 on Volta
    ],
)
def test_mfu_uses_the_peak_of_the_gpu_and_precision(monkeypatch, name, precision, tf32, tflops):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    assert mfu(6e9, 1e4, peak_flops_per_gpu(precision, tf32), 2) == pytest.approx(6e9 * 1e4 / (tflops * 1e12 * 2))
