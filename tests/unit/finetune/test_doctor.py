"""``dsft doctor`` (finetune/doctor/): each failure the issue names is flagged with the right diagnosis, and the
healthy demo config passes, overfit-one-batch included.

Before training: the demo's own base model and data (``launch.demo`` builds them: a 0.6M-param Llama, the 2-digit
addition task), run through ``main`` in-process. After training: ``metrics.jsonl`` files written with the engine's
own ``MetricsLogger`` in the rows the engine logs (step, split, loss, lr, grad_norm, loss_scale, skipped, ...).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from finetune import doctor

REPO = Path(__file__).resolve().parents[3]
DEMO_YAML = str(REPO / "finetune" / "configs" / "demo.yaml")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    """The demo's base model and converted train split, built as ``launch.demo`` builds them."""
    from data_tools.convert import convert
    from launch.demo import DEMO_DATA, build_base_model, read_jsonl

    out = tmp_path_factory.mktemp("doctor_demo")
    base = build_base_model(out, read_jsonl(DEMO_DATA / "train.jsonl"))
    convert(DEMO_DATA / "train.jsonl", out / "data" / "train", str(base), fmt="messages", progress=False)
    return {"base": base, "train": out / "data" / "train", "root": out}


def run_doctor(capsys, *argv: str) -> tuple[int, dict]:
    """``dsft doctor ARGV --json``: (exit code, the JSON report, or {} when none was printed)."""
    code = doctor.main([*argv, "--json"])
    out = capsys.readouterr().out
    return code, (json.loads(out) if out.strip() else {})


def demo_args(demo, tmp_path, *overrides: str) -> list[str]:
    return [
        "--config",
        DEMO_YAML,
        f"model.name_or_path={demo['base']}",
        f"data.train={demo['train']}",
        f"output_dir={tmp_path / 'run'}",
        *overrides,
    ]


def finding(report: dict, check: str) -> dict:
    found = [f for f in report["findings"] if f["check"] == check]
    assert found, f"no {check!r} finding in {[f['check'] for f in report['findings']]}"
    return found[-1]


def levels(report: dict) -> dict[str, str]:
    return {f["check"]: f["level"] for f in report["findings"]}


# ---------------------------------------------------------------------------------------------------------------
# Before training


def test_healthy_demo_config_passes_with_its_overfit_test(demo, tmp_path, capsys):
    code, report = run_doctor(capsys, *demo_args(demo, tmp_path))
    assert code == 0, [f for f in report["findings"] if f["level"] == "FAIL"]
    got = levels(report)
    for check in ("data.tokenizer", "loss_tokens", "sample", "lengths", "pad", "eos", "trainable", "gradients"):
        assert got[check] == "OK", (check, finding(report, check))
    assert got["overfit"] == "OK"
    losses = report["overfit"]["losses"]
    assert len(losses) == doctor.OVERFIT_STEPS
    assert losses[-1] < doctor.OVERFIT_PASS_RATIO * losses[0]  # measured 5.70 -> 0.146
    # demo.yaml's 3e-3 is 30x above full fine-tuning's usual range: the overfit test settles it to a warning
    assert got["lr"] == "WARN" and "overfit test learned" in finding(report, "lr")["message"]
    assert 0.1 < report["loss_tokens"]["share"] < 0.3  # "1 5 2<|im_end|>" of a 20-token sample
    assert "[[" in finding(report, "sample")["message"] and "<|im_end|>]]" in finding(report, "sample")["message"]


def test_lines_output_one_per_finding(demo, tmp_path, capsys):
    # train.lr inside full's usual range: without the overfit test nothing can settle demo.yaml's 30x-above rate
    code = doctor.main([*demo_args(demo, tmp_path, "train.lr=1e-4"), "--overfit-steps", "0"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert lines[-1].startswith("doctor: healthy: 0 FAIL")
    assert all(line.split()[0] in ("OK", "WARN", "FAIL", "SKIP") for line in lines[:-1]), lines
    assert any(line.startswith("SKIP overfit:") for line in lines)


def test_lr_10_diverges_and_names_the_learning_rate(demo, tmp_path, capsys):
    code, report = run_doctor(capsys, *demo_args(demo, tmp_path, "train.lr=10"), "--overfit-steps", "10")
    assert code == 1
    over = finding(report, "overfit")
    assert over["level"] == "FAIL" and "diverges" in over["message"] and "learning rate is too high" in over["message"]
    assert "lower train.lr" in over["fix"]
    lr = finding(report, "lr")
    assert lr["level"] == "FAIL" and "above it" in lr["message"]  # not settled: the overfit test diverged


def test_lr_far_too_low_is_flat(demo, tmp_path, capsys):
    code, report = run_doctor(capsys, *demo_args(demo, tmp_path, "train.lr=1e-9"), "--overfit-steps", "10")
    over = finding(report, "overfit")
    assert code == 1 and over["level"] == "FAIL"
    assert "cannot learn" in over["message"] and "too low" in over["message"]


def test_data_without_assistant_tokens(demo, tmp_path, capsys):
    """An SFT prefix whose loss mask is all zero (e.g. made by another tool): nothing carries loss."""
    from data_tools.indexed import IndexedDataset, IndexedDatasetBuilder

    prefix = tmp_path / "masked" / "train"
    prefix.parent.mkdir()
    for ext in (".bin", ".idx", ".meta.json"):
        shutil.copy(f"{demo['train']}{ext}", f"{prefix}{ext}")
    sizes = IndexedDataset(prefix).sizes
    builder = IndexedDatasetBuilder(f"{prefix}_loss_mask", dtype=np.uint8)
    for n in sizes:
        builder.add_document(np.zeros(int(n), np.uint8))
    builder.finalize()
    code, report = run_doctor(capsys, *demo_args(demo, tmp_path, f"data.train={prefix}"))
    assert code == 1
    loss = finding(report, "loss_tokens")
    assert loss["level"] == "FAIL" and "loss mask is all zero (no assistant tokens)" in loss["message"]
    # the overfit test does not blame the learning rate for a 0/0 loss
    over = finding(report, "overfit")
    assert over["level"] == "FAIL" and "every label is masked" in over["message"]
    assert report["loss_tokens"]["trained"] == 0


def test_data_converted_with_another_tokenizer(demo, tmp_path, capsys, tiny_tokenizer):
    from data_tools.convert import convert
    from launch.demo import DEMO_DATA

    prefix = tmp_path / "other" / "train"
    convert(DEMO_DATA / "train.jsonl", prefix, tiny_tokenizer, fmt="messages", progress=False)
    code, report = run_doctor(capsys, *demo_args(demo, tmp_path, f"data.train={prefix}"))
    assert code == 1
    tok = finding(report, "data.tokenizer")
    assert tok["level"] == "FAIL" and "converted with tokenizer" in tok["message"]
    assert "re-convert" in tok["fix"]
    assert "overfit" not in levels(report)  # nothing downstream runs on garbage ids


def test_lora_that_matches_no_module_trains_nothing(demo, tmp_path, capsys):
    """PEFT raises on target_modules that match nothing; the doctor turns it into a finding, not a traceback."""
    code, report = run_doctor(
        capsys, *demo_args(demo, tmp_path, "method.name=lora", "method.lora.target_modules=[nonexistent]")
    )
    assert code == 1
    tr = finding(report, "trainable")
    assert tr["level"] == "FAIL" and "nothing would train" in tr["message"] and "nonexistent" in tr["message"]
    assert "target_modules" in tr["fix"]


def test_peft_with_gradient_checkpointing_reaches_the_adapters(demo, tmp_path, capsys):
    args = demo_args(demo, tmp_path, "method.name=lora", "model.gradient_checkpointing=true")
    code, report = run_doctor(capsys, *args, "--overfit-steps", "0")
    grads = finding(report, "gradients.checkpointing")
    assert grads["level"] == "OK" and "enable_input_require_grads set" in grads["message"], grads
    assert code == 0


def test_checkpointing_without_input_grads_is_caught(demo, tmp_path, capsys, monkeypatch):
    """Reentrant checkpointing on a frozen base without enable_input_require_grads: no gradient reaches the adapters
    inside the checkpointed blocks. PEFT calls enable_input_require_grads itself for a checkpointed model, so the
    hook is disabled here too, as in a model or version that lacks it."""
    from transformers import PreTrainedModel

    import finetune.methods

    def broken(model):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})

    monkeypatch.setattr(finetune.methods, "enable_gradient_checkpointing", broken)
    monkeypatch.setattr(PreTrainedModel, "enable_input_require_grads", lambda self: None)
    args = demo_args(demo, tmp_path, "method.name=lora", "model.gradient_checkpointing=true")
    code, report = run_doctor(capsys, *args, "--overfit-steps", "0")
    grads = finding(report, "gradients.checkpointing")
    assert code == 1 and grads["level"] == "FAIL", grads
    assert "enable_input_require_grads" in grads["fix"]


def test_fp16_with_weights_beyond_its_range(demo, tmp_path, capsys):
    """A weight above 65504 is inf in fp16: flagged from the config alone (fp16 itself needs a GPU to train)."""
    import torch
    from transformers import AutoModelForCausalLM

    big = tmp_path / "big"
    model = AutoModelForCausalLM.from_pretrained(demo["base"])
    with torch.no_grad():
        model.model.norm.weight.fill_(1e5)
    model.save_pretrained(big)
    for f in Path(demo["base"]).glob("tokenizer*"):
        shutil.copy(f, big / f.name)
    for f in Path(demo["base"]).glob("special_tokens_map.json"):
        shutil.copy(f, big / f.name)
    code, report = run_doctor(
        capsys,
        *demo_args(demo, tmp_path, f"model.name_or_path={big}", "precision=fp16", "model.dtype=auto"),
        "--overfit-steps",
        "0",
    )
    fp16 = finding(report, "fp16_range")
    assert fp16["level"] == "FAIL" and "exceeds fp16" in fp16["message"] and "bf16" in fp16["fix"]
    assert code == 1


def test_render_sample_marks_trained_spans(tiny_tokenizer):
    ids = tiny_tokenizer("hello world", add_special_tokens=False)["input_ids"]
    ids = ids + tiny_tokenizer(" fox", add_special_tokens=False)["input_ids"]
    mask = np.array([0] * (len(ids) - 1) + [1])
    assert doctor.render_sample(np.array(ids), mask, tiny_tokenizer) == "hello world[[ fox]]"
    assert "\033[32m fox\033[0m" in doctor.render_sample(np.array(ids), mask, tiny_tokenizer, color=True)


@pytest.mark.parametrize(
    ("losses", "level", "words"),
    [
        ([5.0, 3.0, 1.0], "OK", "can learn"),
        ([5.0, 4.9, 4.8], "FAIL", "too low"),
        ([5.0, 9.0, float("nan")], "FAIL", "too high"),
        ([5.0, 1.0, 3.0], "WARN", "unstable"),
        ([5.0, 4.0, 3.0], "WARN", "slowly"),
    ],
)
def test_overfit_curves(losses, level, words):
    got, check, message, _ = doctor.diagnose_overfit(losses, lr=1e-3, steps=3)
    assert (got, check) == (level, "overfit") and words in message


def test_bad_invocations_exit_2(tmp_path, capsys):
    assert doctor.main([str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert doctor.main([]) == 2
    assert doctor.main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config error" in capsys.readouterr().err
    assert doctor.main(["--config", DEMO_YAML, "some_dir"]) == 2


# ---------------------------------------------------------------------------------------------------------------
# After training: metrics files in the engine's format


def write_run(path: Path, rows: list[dict], precision: str = "bf16", lr: float = 1e-4, summary: bool = True) -> Path:
    """A run directory as the engine leaves it: config.json, metrics.jsonl (through MetricsLogger), summary.json."""
    from finetune.config import load_config, to_dict
    from finetune.metrics import MetricsLogger

    cfg = load_config(None, [f"precision={precision}", f"train.lr={lr}", "method.name=lora", "train.max_steps=100"])
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    logger = MetricsLogger(path)
    for row in rows:
        logger.log(row)
    logger.close()
    if summary:
        last = [r for r in rows if r["split"] == "train"][-1]
        (path / "summary.json").write_text(json.dumps({"step": last["step"], "loss": last["loss"], "data": {}}))
    return path


def train_row(step: int, loss: float, grad_norm: float | None = 1.0, loss_scale=None, skipped=False, lr=1e-4) -> dict:
    """One engine train row (finetune/engine.py: the keys of ``last`` and memory_stats)."""
    return {
        "step": step,
        "split": "train",
        "epoch": 0,
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "loss_scale": loss_scale,
        "tokens_per_s": 1000.0,
        "real_tokens": 4096,
        "step_time_s": 0.5,
        "steps": 1,
        "mfu": None,
        "skipped": skipped,
        "mem_rss_gib": 1.0,
    }


def test_nan_after_a_climbing_grad_norm_is_the_learning_rate(tmp_path, capsys):
    norms = [1.0, 0.9, 1.1, 1.0, 0.95, 1.2, 2.5, 6.0, 15.0, 40.0]
    rows = [train_row(i + 1, 2.0 - 0.05 * i, g) for i, g in enumerate(norms)]
    rows.append(train_row(11, float("nan"), float("nan"), skipped=True))
    run = write_run(tmp_path / "run", rows, summary=False)
    assert "NaN" in (run / "metrics.jsonl").read_text()  # the engine's writer: NaN as json.dumps writes it
    code, report = run_doctor(capsys, str(run))
    div = finding(report, "divergence")
    assert code == 1 and div["level"] == "FAIL"
    assert "step 11" in div["message"] and "grad norm climbed" in div["message"]
    assert "learning rate is too high" in div["message"] and "lower train.lr" in div["fix"]


def test_nan_without_a_climb_is_not_blamed_on_the_lr(tmp_path, capsys):
    rows = [train_row(i + 1, 2.0 - 0.05 * i, 1.0) for i in range(10)]
    rows.append(train_row(11, float("nan"), float("nan"), skipped=True))
    code, report = run_doctor(capsys, str(write_run(tmp_path / "run", rows)))
    div = finding(report, "divergence")
    assert code == 1 and "without a grad-norm climb" in div["message"]
    assert "learning rate is too high" not in div["message"]


def test_fp16_loss_scale_collapse(tmp_path, capsys):
    """DeepSpeed halves the scale on each overflow down to min_loss_scale=1, skipping those steps."""
    rows, scale = [], 65536.0
    for step in range(1, 31):
        overflow = step > 8
        scale = max(1.0, scale / 2) if overflow else scale
        rows.append(train_row(step, 2.0 - 0.01 * min(step, 8), None if overflow else 1.0, scale, skipped=overflow))
    code, report = run_doctor(capsys, str(write_run(tmp_path / "run", rows, precision="fp16", summary=False)))
    ls = finding(report, "loss_scale")
    assert code == 1 and ls["level"] == "FAIL"
    assert "collapsed from 65536 to 1" in ls["message"] and "bf16" in ls["fix"]
    assert finding(report, "skipped")["level"] == "FAIL"


def test_fp16_calibration_skips_are_normal(tmp_path, capsys):
    rows = [train_row(1, 2.0, None, 32768.0, skipped=True), train_row(2, 1.9, None, 16384.0, skipped=True)]
    rows += [train_row(s, 1.9 - 0.02 * s, 1.0, 16384.0) for s in range(3, 60)]
    code, report = run_doctor(capsys, str(write_run(tmp_path / "run", rows, precision="fp16")))
    assert code == 0, report["findings"]
    assert levels(report)["loss_scale"] == "OK" and "calibration" in finding(report, "skipped")["message"]


def test_flat_loss_names_the_three_causes(tmp_path, capsys):
    rows = [train_row(10 * i, 5.7 - 0.001 * i) for i in range(1, 20)]
    code, report = run_doctor(capsys, str(write_run(tmp_path / "run", rows, lr=1e-8)))
    flat = finding(report, "progress")
    assert code == 1 and flat["level"] == "FAIL" and "flat from the first row" in flat["message"]
    for cause in ("lr too low", "nothing trainable", "labels masked"):
        assert cause in flat["message"]
    assert "dsft doctor --config" in flat["fix"] and "config.json" in flat["fix"]


def test_zero_loss_everywhere_is_all_labels_masked(tmp_path, capsys):
    code, report = run_doctor(capsys, str(write_run(tmp_path / "run", [train_row(s, 0.0) for s in range(1, 6)])))
    assert code == 1 and "no token carries loss" in finding(report, "progress")["message"]


def test_eval_rising_while_train_falls_is_overfitting(tmp_path, capsys):
    rows = []
    for step in range(10, 101, 10):
        rows.append(train_row(step, 3.0 - 0.025 * step))
        rows.append({"step": step, "split": "eval", "loss": 2.0 - 0.01 * step + max(0, step - 40) * 0.02, "ppl": 1.0})
    rows.append({"step": 100, "split": "eval", "final": True, "loss": 2.4, "ppl": 11.0, "tokens": 100})
    code, report = run_doctor(capsys, str(write_run(tmp_path / "run", rows)))
    over = finding(report, "overfitting")
    assert code == 1 and over["level"] == "FAIL" and "step 40" in over["message"]
    assert "stop near step 40" in over["fix"]


def test_healthy_run_exits_0(tmp_path, capsys):
    rows = [train_row(s, 3.0 * math.exp(-s / 30)) for s in range(10, 101, 10)]
    rows += [{"step": s, "split": "eval", "loss": 2.5 - s / 100, "ppl": 1.0} for s in (50, 100)]
    code, report = run_doctor(capsys, str(write_run(tmp_path / "run", rows)))
    assert code == 0, report["findings"]
    assert levels(report)["progress"] == "OK" and levels(report)["finished"] == "OK"


def test_unfinished_run_and_missing_metrics(tmp_path, capsys):
    run = write_run(tmp_path / "run", [train_row(s, 3.0 - 0.1 * s) for s in range(1, 6)], summary=False)
    code, report = run_doctor(capsys, str(run))
    assert code == 0 and levels(report)["finished"] == "WARN"
    (run / "metrics.jsonl").unlink()
    code, report = run_doctor(capsys, str(run))
    assert code == 1 and levels(report)["metrics"] == "FAIL"


# ---------------------------------------------------------------------------------------------------------------
# After a real run: the rows the engine really writes


@pytest.mark.slow  # two real engine runs: ~60 s alone, ~190 s on the shared 2-core machine
def test_real_demo_run_with_lr_10_is_diagnosed_as_divergence(demo, tmp_path, capsys):
    """The demo recipe for 12 steps at lr 10, one rank (plain python, gloo): the doctor reads the engine's real
    metrics.jsonl and blames the learning rate; the same run at the demo's lr 3e-3 is healthy."""
    import subprocess
    import sys

    from tests.recipes.conftest import _env

    def train(out: Path, lr: str) -> Path:
        cmd = [sys.executable, "finetune/full.py", "--config", DEMO_YAML, f"model.name_or_path={demo['base']}"]
        cmd += [f"data.train={demo['train']}", f"output_dir={out}", f"train.lr={lr}", "train.max_steps=12"]
        cmd += ["train.log_every=1", "train.micro_batch_size=8", "train.warmup=0", "train.max_bad_steps=100"]
        proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
        assert (out / "metrics.jsonl").is_file(), proc.stderr[-3000:]
        return out

    code, report = run_doctor(capsys, str(train(tmp_path / "lr10", "10")))
    div = finding(report, "divergence")
    assert code == 1 and div["level"] == "FAIL", report["findings"]
    assert "learning rate is too high" in div["message"] and "train.lr=10" in div["fix"]
    assert "progress" not in levels(report)  # a diverging loss is not also called flat
    code, report = run_doctor(capsys, str(train(tmp_path / "ok", "3e-3")))
    assert code == 0, report["findings"]
    assert levels(report)["progress"] == "OK"


def test_a_rising_loss_without_nan_is_divergence_not_flat(tmp_path, capsys):
    """What the engine logged for the demo at lr 10 (measured: 5.665 at step 1, 7865 at step 12, never NaN)."""
    rows = [train_row(s, 5.665 * 3 ** (s - 1), 10.0 * s) for s in range(1, 8)]
    code, report = run_doctor(capsys, str(write_run(tmp_path / "run", rows, lr=10.0)))
    div = finding(report, "divergence")
    assert code == 1 and div["level"] == "FAIL" and "rose from 5.665" in div["message"]
    assert "progress" not in levels(report)


def test_skipped_steps_counted_from_the_engines_cumulative_total(tmp_path, capsys):
    """With train.log_every=10 a row's `skipped` is its last step only; `skipped_total` counts all of them."""
    rows = [{**train_row(s, 3.0 - 0.01 * s), "steps": 10, "skipped_total": 3 * (s // 10)} for s in range(10, 110, 10)]
    code, report = run_doctor(capsys, str(write_run(tmp_path / "run", rows)))
    assert code == 1 and levels(report)["skipped"] == "FAIL"
    assert (
        "30 of 100 optimizer steps were skipped"
        in next(f for f in report["findings"] if f["check"] == "skipped")["message"]
    )


def test_an_aborted_run_is_quoted_from_summary_json(tmp_path, capsys):
    run = write_run(tmp_path / "run", [train_row(s, 3.0 - 0.1 * s) for s in range(1, 6)], summary=False)
    reason = "5 consecutive steps with a non-finite loss or gradient norm (up to step 5): lower train.lr=10"
    (run / "summary.json").write_text(json.dumps({"aborted": reason, "exit_code": 3}))
    code, report = run_doctor(capsys, str(run))
    finding = next(f for f in report["findings"] if f["check"] == "finished")
    assert code == 1 and finding["level"] == "FAIL" and reason in finding["message"]


def test_a_mixture_is_checked_source_by_source(demo, tmp_path, capsys):
    """A weighted data.train list: every source is checked (tokenizer, loss tokens, lengths) and the overfit test
    runs on the blended batches the run would see; one empty-mask source fails by name."""
    import numpy as np

    from data_tools.indexed import IndexedDataset, IndexedDatasetBuilder

    blank = tmp_path / "blank"  # the demo data with every loss-mask bit cleared: no assistant token
    for suffix in (".bin", ".idx", ".meta.json"):
        (tmp_path / f"blank{suffix}").write_bytes(Path(f"{demo['train']}{suffix}").read_bytes())
    mask = IndexedDataset(f"{demo['train']}_loss_mask")
    builder = IndexedDatasetBuilder(f"{blank}_loss_mask", dtype=np.uint8)
    for i in range(len(mask)):
        builder.add_document(np.zeros(len(mask[i]), np.uint8))
    builder.finalize()
    mixture = (
        f"data.train=[{{path: {demo['train']}, weight: 0.7}}, {{path: {demo['train']}, weight: 0.3, name: again}}]"
    )
    code, report = run_doctor(capsys, *demo_args(demo, tmp_path), mixture)
    assert code == 0, [f for f in report["findings"] if f["level"] == "FAIL"]
    assert {"data.train[0]", "data.train[1]"} <= set(report["lengths"])
    assert levels(report)["overfit"] == "OK"
    bad = f"data.train=[{{path: {demo['train']}, weight: 0.7}}, {{path: {blank}, weight: 0.3}}]"
    code, report = run_doctor(capsys, *demo_args(demo, tmp_path), bad)
    assert code == 1 and str(blank) in finding(report, "loss_tokens")["message"]
