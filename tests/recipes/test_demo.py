"""The demo pipeline (``make demo``) end to end, reduced: 30 steps, 16 held-out questions, real deepspeed on 2 CPU
ranks, through the CLI entry ``make demo`` runs (``python -m launch.demo``) with its real accuracy margin.

30 steps do not teach 2-digit addition (accuracy stays ~0), so the reduced run must exit ``EXIT_DID_NOT_LEARN``: that
is the demo's own margin check, seen failing. What 30 steps do show is learning in the eval loss: the fine-tuned
model's loss on the held-out split is well below the base model's, both computed the same way. The accuracy rise
itself (0.0% -> 95.5% in README) needs the full 1500 steps: ``make demo`` exits 0 only if it is reached.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from launch.demo import EXIT_DID_NOT_LEARN, MIN_ACCURACY_GAIN, REPO, check_learned, format_report
from tests.recipes.conftest import metrics, reloaded_eval_loss

STEPS = 30
N_EVAL = 16
# The held-out eval loss after 30 steps must be below this fraction of the base model's. Measured: base 5.737 (random
# init, ~ln 300), after 30 steps 1.726 (0.30x); a run that does not learn (train.lr=1e-12) stays at 1.0x.
MAX_EVAL_LOSS_RATIO = 0.5


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """``python -m launch.demo`` reduced, as a user would run it: (out_dir, report.json, the finished process)."""
    out = tmp_path_factory.mktemp("demo_out")
    cmd = [sys.executable, "-m", "launch.demo", "--out-dir", str(out), "--n-eval", str(N_EVAL)]
    cmd += [f"train.max_steps={STEPS}", "train.log_every=5"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    report = out / "report.json"
    assert report.is_file(), f"exit {proc.returncode}, no report.json\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return out, json.loads(report.read_text()), proc


def test_demo_writes_model_data_and_run_files(demo_run):
    out, report, proc = demo_run
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
    assert format_report(report) in proc.stdout  # the printed report is the saved one


def test_demo_report_fields_and_loss_fell(demo_run):
    out, report, _ = demo_run
    assert report["steps"] == STEPS
    assert report["n_eval"] == N_EVAL
    assert 0.0 <= report["accuracy_before"] <= 1.0 and 0.0 <= report["accuracy_after"] <= 1.0
    # A random-init model cannot add: chance is ~1/199 per question.
    assert report["accuracy_before"] <= 1 / N_EVAL
    assert report["min_accuracy_gain"] == MIN_ACCURACY_GAIN and report["learned"] is False
    assert math.isfinite(report["loss_last"]) and report["loss_last"] < 0.7 * report["loss_first"]
    assert report["model_dir"] == str(out / "run" / "final")
    assert "--num_gpus 2" in report["train_command"] and "finetune/configs/demo.yaml" in report["train_command"]
    assert report["gpu_command"].startswith("python -m launch.run --num_gpus 1 finetune/full.py")
    assert len(report["examples"]) == 5 and {"prompt", "expected", "got", "ok"} <= set(report["examples"][0])
    text = format_report(report)
    assert f"{report['accuracy_before']:.1%} -> {report['accuracy_after']:.1%}" in text
    for field in ("loss curve", str(out / "run" / "loss.png"), "model", report["gpu_command"]):
        assert field in text


def test_demo_exits_nonzero_unless_accuracy_rose_by_the_margin(demo_run):
    """30 steps do not reach the margin, so the CLI fails with the reason; the README's full run passes it."""
    _, report, proc = demo_run
    shortfall = check_learned(report["accuracy_before"], report["accuracy_after"])
    assert shortfall is not None, f"30 steps reached the {MIN_ACCURACY_GAIN} margin? {report['accuracy_after']}"
    assert proc.returncode == EXIT_DID_NOT_LEARN, proc.stderr[-4000:]
    assert f"launch.demo: {shortfall}\n" in proc.stderr
    assert check_learned(0.0, 0.955) is None  # README: 0.0% -> 95.5% after the default 1500 steps
    assert check_learned(0.0, MIN_ACCURACY_GAIN) is None  # a tie passes
    assert check_learned(0.0, 0.795) is not None and check_learned(0.1, 0.85) is not None


def test_demo_final_eval_loss_below_base_model(demo_run):
    """The fine-tuned model's held-out eval loss against the base model's, both reloaded from their folders and scored
    on the demo's eval split with the engine's computation (checked: it reproduces the run's final eval row)."""
    out, _, _ = demo_run
    eval_prefix = str(out / "data" / "eval")
    base_dir, run_dir = out / "base_model", out / "run"
    final = reloaded_eval_loss(run_dir, base_dir, eval_prefix, "full", packing="padding")
    engine_final = [r for r in metrics(run_dir, "eval") if r.get("final")][-1]["loss"]
    assert final == pytest.approx(engine_final, rel=1e-5)
    base = reloaded_eval_loss(run_dir, base_dir, eval_prefix, "full", model_dir=base_dir, packing="padding")
    assert final < MAX_EVAL_LOSS_RATIO * base, f"eval loss {base:.4f} (base) -> {final:.4f} after {STEPS} steps"


def test_demo_final_model_reloads_and_generates(demo_run):
    from launch.demo import DEMO_DATA, exact_match, read_jsonl

    out, report, _ = demo_run
    acc, rows = exact_match(out / "run" / "final", read_jsonl(DEMO_DATA / "eval.jsonl")[:N_EVAL])
    assert acc == report["accuracy_after"]
    assert [r["got"] for r in rows[:5]] == [e["got"] for e in report["examples"]]
