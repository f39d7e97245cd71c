"""The demo pipeline (``make demo``) end to end, reduced: 30 steps, 16 held-out questions, real deepspeed on 2 CPU ranks.

The accuracy rise itself is only asserted by the full demo (1500 steps); 30 steps only show the pipeline works:
model built, data converted, launcher trained and saved, losses fell, report written and printed.
"""

from __future__ import annotations

import json
import math

import pytest

from launch.demo import format_report, run_demo

STEPS = 30
N_EVAL = 16


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_out")
    report = run_demo(
        out, overrides=[f"train.max_steps={STEPS}", "train.log_every=5"], n_eval=N_EVAL, log=lambda s: None
    )
    return out, report


def test_demo_writes_model_data_and_run_files(demo_report):
    out, report = demo_report
    for rel in (
        "tokenizer/tokenizer.json",
        "base_model/model.safetensors",
        "data/train.bin",
        "data/train.idx",
        "data/train_loss_mask.bin",
        "data/train.meta.json",
        "run/metrics.jsonl",
        "run/loss.png",
        "run/final/model.safetensors",
        "run/final/tokenizer.json",
        "report.json",
    ):
        assert (out / rel).is_file(), rel
    assert json.loads((out / "report.json").read_text()) == report


def test_demo_report_fields_and_loss_fell(demo_report):
    out, report = demo_report
    assert report["steps"] == STEPS
    assert report["n_eval"] == N_EVAL
    assert 0.0 <= report["accuracy_before"] <= 1.0 and 0.0 <= report["accuracy_after"] <= 1.0
    # A random-init model cannot add: chance is ~1/199 per question.
    assert report["accuracy_before"] <= 1 / N_EVAL
    assert math.isfinite(report["loss_last"]) and report["loss_last"] < 0.7 * report["loss_first"]
    assert report["model_dir"] == str(out / "run" / "final")
    assert "--num_gpus 2" in report["train_command"] and "finetune/configs/demo.yaml" in report["train_command"]
    assert report["gpu_command"].startswith("python -m launch.run --num_gpus 1 finetune/full.py")
    assert len(report["examples"]) == 5 and {"prompt", "expected", "got", "ok"} <= set(report["examples"][0])
    text = format_report(report)
    assert f"{report['accuracy_before']:.1%} -> {report['accuracy_after']:.1%}" in text
    for field in ("loss curve", str(out / "run" / "loss.png"), "model", report["gpu_command"]):
        assert field in text


def test_demo_final_model_reloads_and_generates(demo_report):
    from launch.demo import DEMO_DATA, exact_match, read_jsonl

    out, report = demo_report
    acc, rows = exact_match(out / "run" / "final", read_jsonl(DEMO_DATA / "eval.jsonl")[:N_EVAL])
    assert acc == report["accuracy_after"]
    assert [r["got"] for r in rows[:5]] == [e["got"] for e in report["examples"]]
