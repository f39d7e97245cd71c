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
    assert "dsft train full --config finetune/configs/demo.yaml --num-gpus 2" in report["train_command"]
    assert report["gpu_command"].startswith("dsft train full --config finetune/configs/demo.yaml --num-gpus 1")
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


@pytest.fixture(scope="module")
def demo_scoring(demo_run):
    """The demo's own scoring of its fine-tuned model, record by record: (held-out records, accuracy, rows)."""
    from launch.demo import DEMO_DATA, exact_match, read_jsonl

    out, _, _ = demo_run
    records = read_jsonl(DEMO_DATA / "eval.jsonl")[:N_EVAL]
    accuracy, rows = exact_match(out / "run" / "final", records)
    return records, accuracy, rows


def test_demo_final_model_reloads_and_generates(demo_run, demo_scoring):
    _, report, _ = demo_run
    _, acc, rows = demo_scoring
    assert acc == report["accuracy_after"]
    assert rows[:5] == report["examples"]


def _dsft(module: str, *args: str) -> subprocess.CompletedProcess:
    """``dsft chat|eval ...`` as a user runs it (``python -m finetune.chat`` is what ``dsft chat`` dispatches to)."""
    cmd = [sys.executable, "-m", module, *args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc


def _held_out_file(records: list[dict], path) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_chat_batch_mode_gives_the_demo_accuracy(demo_run, demo_scoring, tmp_path):
    """``dsft chat RUN_DIR --prompts`` on the held-out questions answers exactly what the demo scored, record by
    record (after 30 steps the accuracy itself may be 0, so the answers are compared too)."""
    from launch.demo import EVAL_BATCH_SIZE, MAX_NEW_TOKENS

    out, report, _ = demo_run
    records, accuracy, rows = demo_scoring
    prompts, answers = _held_out_file(records, tmp_path / "held_out.jsonl"), tmp_path / "answers.jsonl"
    args = ["--prompts", prompts, "--out", str(answers), "--max-new-tokens", str(MAX_NEW_TOKENS)]
    proc = _dsft("finetune.chat", str(out / "run"), *args, "--batch-size", str(EVAL_BATCH_SIZE), "--dtype", "float32")
    # the run dir's final/ carries the template the data was rendered with and stops on the end of turn it taught
    assert f"loaded model {out / 'run' / 'final'}" in proc.stderr
    assert "chat template: the tokenizer saved with the model" in proc.stderr and "'<|im_end|>'" in proc.stderr
    got = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [g["line"] for g in got] == list(range(1, N_EVAL + 1))
    assert [g["answer"].strip() for g in got] == [r["got"] for r in rows]
    assert [g["reference"] for g in got] == [r["expected"] for r in rows]
    chat_accuracy = sum(g["exact_match"] for g in got) / len(got)
    assert chat_accuracy == accuracy == report["accuracy_after"]


def test_eval_loss_equals_the_runs_final_eval_loss(demo_run, demo_scoring, tmp_path):
    """``dsft eval`` on the run's eval split (the converted prefix, and the raw jsonl converted the way training
    converts it) gives the engine's final eval loss; its exact match is the demo's accuracy."""
    from launch.demo import DEMO_DATA, EVAL_BATCH_SIZE, MAX_NEW_TOKENS

    out, report, _ = demo_run
    records, accuracy, _ = demo_scoring
    run_dir = out / "run"
    engine_final = [r for r in metrics(run_dir, "eval") if r.get("final")][-1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["eval_loss"] == pytest.approx(engine_final["loss"], abs=1e-12)
    prompts = _held_out_file(records, tmp_path / "held_out.jsonl")
    decoding = ["--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size", str(EVAL_BATCH_SIZE), "--dtype", "float32"]
    proc = _dsft(
        "finetune.evaluate",
        str(run_dir),
        "--data",
        str(out / "data" / "eval"),
        "--prompts",
        prompts,
        *decoding,
        "--json",
    )
    res = json.loads(proc.stdout)
    assert abs(res["loss"] - engine_final["loss"]) < 1e-4, (res["loss"], engine_final["loss"])
    assert res["tokens"] == engine_final["tokens"]
    assert res["perplexity"] == pytest.approx(engine_final["ppl"], rel=1e-4)
    assert res["exact_match"] == accuracy and res["n_prompts"] == N_EVAL
    raw = json.loads(_dsft("finetune.evaluate", str(run_dir), "--data", str(DEMO_DATA / "eval.jsonl"), "--json").stdout)
    assert abs(raw["loss"] - engine_final["loss"]) < 1e-4 and raw["tokens"] == engine_final["tokens"]
