"""``dsft doctor RUN_DIR``: what the rows of a finished (or stopped) run's ``metrics.jsonl`` show, each with its fix.

A NaN after a climbing grad norm (the learning rate), an fp16 loss-scale collapse, a loss flat from step 1, eval loss
rising while train loss falls (overfitting), skipped steps, a run that never finished (``summary.json``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ds_configs.build import FP16_SECTION
from finetune.doctor.before import get_lr_range
from finetune.doctor.model_checks import DIVERGE_RATIO
from finetune.doctor.report import FAIL, OK, SKIP, WARN, Report

# A climb: the grad norm just before the NaN >= 3x its median over the run's first third.
GRAD_CLIMB_FACTOR = 3.0
FLAT_FALL = 0.02  # the train loss fell by less than 2% of its first value: flat
OVERFIT_EVAL_RISE = 0.05  # final eval loss 5% above its best while train loss still fell: overfitting
MIN_LOSS_SCALE = FP16_SECTION["min_loss_scale"]  # the floor DeepSpeed's fp16 loss scale stops at (what dsft sets)


def read_rows(path: Path) -> list[dict]:
    """The rows of a ``metrics.jsonl`` (NaN/Infinity as Python's json writes them).

    Raises:
        ValueError: a line is not JSON (``path:line: ...``).
    """
    rows, lines = [], path.read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(lines):  # a last line cut by a crash mid-write: what came before counts
                break
            raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from e
    return rows


def _finite(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def diagnose_run(run_dir: str | Path) -> Report:
    """Read a run directory's ``metrics.jsonl`` (+ ``summary.json``, ``config.json``) and name what happened.

    Raises:
        FileNotFoundError: ``run_dir`` is not a directory (a bad invocation).
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run directory (give output_dir of a run, or --config X.yaml)")
    report = Report("run", str(run))
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    train_cfg = config.get("train", {})
    lr, method = train_cfg.get("lr"), (config.get("method") or {}).get("name")
    precision = config.get("precision", "?")
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        report.add(
            FAIL,
            "metrics",
            f"{metrics} does not exist: the run stopped before its first logged step",
            "read the run's console log for the error; dsft doctor --config ... checks the setup",
        )
        return report
    rows = read_rows(metrics)
    train = [r for r in rows if r.get("split", "train") == "train" and "loss" in r]
    evals = [r for r in rows if r.get("split") == "eval" and "loss" in r]
    for r in (r for r in rows if r.get("split") == "data"):
        from finetune.data import length_messages

        for m in length_messages(r, raw=True):
            report.add(WARN, "data", m.split(": ", 1)[1])
    if not train:
        report.add(
            FAIL,
            "metrics",
            f"{metrics} has no training row: the run stopped before step "
            f"{train_cfg.get('log_every', '?')} (the first logged one)",
            "read the run's console log",
        )
        return report
    report.details["rows"] = {"train": len(train), "eval": len(evals), "last_step": train[-1]["step"]}
    rerun = f"dsft doctor --config {run / 'config.json'}"
    nan_at = next((i for i, r in enumerate(train) if not _finite(r.get("loss"))), None)
    _diagnose_divergence(train, nan_at, lr, method, precision, report)
    _diagnose_loss_scale(train, precision, report)
    if report.level_of("divergence") == OK:  # a diverging loss is not also "flat"
        _diagnose_flat(train, lr, method, rerun, report)
    _diagnose_overfitting(train, evals, report)
    _diagnose_skipped(train, precision, report)
    _diagnose_finished(run, train, train_cfg, report)
    return report


def _lr_hint(lr, method) -> str:
    lr_range = None
    if method:
        try:
            lr_range = get_lr_range(method)
        except ValueError:  # a method this install does not know (a run from a plugin): no range to quote
            lr_range = None
    where = f" ({method}'s usual range {lr_range[0]:g}..{lr_range[1]:g})" if lr_range else ""
    return f"train.lr={lr:g}{where}" if lr is not None else f"train.lr{where}"


def _diagnose_divergence(train, nan_at, lr, method, precision, report: Report) -> None:
    losses = [r["loss"] for r in train]
    if nan_at is not None:
        step = train[nan_at]["step"]
        norms = [r.get("grad_norm") for r in train[:nan_at]]
        norms = [g for g in norms if _finite(g)]
        climb = ""
        if len(norms) >= 3:
            early = sorted(norms[: max(1, len(norms) // 3)])
            baseline = early[len(early) // 2]
            peak = max(norms[-3:])
            if baseline > 0 and peak >= GRAD_CLIMB_FACTOR * baseline:
                climb = f"after the grad norm climbed {baseline:.3g} -> {peak:.3g} ({peak / baseline:.0f}x)"
        scale = [r.get("loss_scale") for r in train[: nan_at + 1] if _finite(r.get("loss_scale"))]
        if climb:
            report.add(
                FAIL,
                "divergence",
                f"the loss turned {train[nan_at]['loss']} at step {step} {climb}: the "
                f"learning rate is too high ({_lr_hint(lr, method)})",
                "lower train.lr 3-10x or raise train.warmup; the grad-norm clip (train.max_grad_norm) does "
                "not stop Adam's step size",
            )
        elif precision == "fp16" and scale and min(scale) <= MIN_LOSS_SCALE:
            report.add(
                FAIL,
                "divergence",
                f"the loss turned {train[nan_at]['loss']} at step {step} with the fp16 "
                "loss scale at its floor: fp16 overflow, not the learning rate",
                "use precision=bf16 (same range as fp32)",
            )
        else:
            report.add(
                FAIL,
                "divergence",
                f"the loss turned {train[nan_at]['loss']} at step {step} without a "
                "grad-norm climb before it: a numerical overflow or a bad batch, more often than the lr",
                f"check the data and setup (dsft doctor --config ...); try precision=bf16/fp32; lower "
                f"{_lr_hint(lr, method)}",
            )
        return
    first, low = losses[0], min(losses)
    tail = losses[-max(1, len(losses) // 10) :]
    if len(losses) >= 3 and (
        sum(tail) / len(tail) > DIVERGE_RATIO * first or (low < first and tail[-1] > 2 * low and tail[-1] > first)
    ):
        at = train[losses.index(low)]["step"]
        shape = (
            f"the loss rose from {first:.4g} to {tail[-1]:.4g}"
            if low >= first
            else f"the loss fell to {low:.4g} at step {at}, then climbed to {tail[-1]:.4g} (started at {first:.4g})"
        )
        report.add(
            FAIL,
            "divergence",
            f"{shape}: divergence, the learning rate is too high",
            f"lower {_lr_hint(lr, method)} 3-10x or raise train.warmup",
        )
        return
    report.add(
        OK, "divergence", f"the loss stayed finite ({len(train)} rows, steps {train[0]['step']}..{train[-1]['step']})"
    )


def _diagnose_loss_scale(train, precision, report: Report) -> None:
    scales = [(r["step"], r["loss_scale"]) for r in train if _finite(r.get("loss_scale"))]
    if not scales:
        if precision == "fp16":
            report.add(WARN, "loss_scale", "precision=fp16 but no row logs loss_scale: cannot tell a collapse")
        return
    peak = max(s for _, s in scales)
    low_step, low = min(scales, key=lambda x: x[1])
    if low <= MIN_LOSS_SCALE:
        report.add(
            FAIL,
            "loss_scale",
            f"the fp16 loss scale collapsed from {peak:g} to {low:g} (its floor) by step "
            f"{low_step}: gradients overflow fp16 even unscaled, those steps are skipped and the model stops "
            "learning",
            "use precision=bf16 (Ampere+); on older GPUs lower train.lr or use fp32",
        )
    elif scales[-1][1] < peak / 2**10 and scales[-1][1] <= min(s for _, s in scales[len(scales) // 2 :]):
        report.add(
            WARN,
            "loss_scale",
            f"the fp16 loss scale fell from {peak:g} to {scales[-1][1]:g} and is still falling: repeated overflows",
            "watch for a collapse; precision=bf16 avoids loss scaling",
        )
    else:
        report.add(OK, "loss_scale", f"fp16 loss scale {scales[0][1]:g} -> {scales[-1][1]:g} (lowest {low:g})")


def _diagnose_flat(train, lr, method, rerun: str, report: Report) -> None:
    losses = [r["loss"] for r in train]
    if len(losses) < 3:
        report.add(SKIP, "progress", f"only {len(losses)} logged rows: too few to judge the loss curve")
        return
    first, last = losses[0], sum(losses[-3:]) / 3
    if all(x == 0 for x in losses):
        report.add(
            FAIL,
            "progress",
            "the loss is exactly 0 at every step: no token carries loss (every label "
            "masked, e.g. SFT data without assistant tokens)",
            f"check the data's loss mask: {rerun}",
        )
    elif first > 0 and abs(first - last) / first < FLAT_FALL:
        report.add(
            FAIL,
            "progress",
            f"the loss is flat from the first row: {first:.4g} -> {last:.4g} over "
            f"{train[-1]['step']} steps. Causes: lr too low ({_lr_hint(lr, method)}), nothing trainable, or all "
            "labels masked",
            f"{rerun} tells which (its overfit test runs in seconds)",
        )
    else:
        report.add(OK, "progress", f"train loss {first:.4g} -> {last:.4g} over {train[-1]['step']} steps")


def _diagnose_overfitting(train, evals, report: Report) -> None:
    evals = sorted(evals, key=lambda r: (r["step"], bool(r.get("final"))))
    points = [(r["step"], r["loss"]) for r in evals if _finite(r["loss"])]
    if len(points) < 3:
        return  # one final eval (eval_every=0) cannot show a trend: nothing to report
    best_step, best = min(points, key=lambda p: p[1])
    last_step, last = points[-1]

    def train_near(step):
        return min(train, key=lambda r: abs(r["step"] - step))["loss"]

    t_best, t_last = train_near(best_step), train_near(last_step)
    if best_step < last_step and last > best * (1 + OVERFIT_EVAL_RISE) and _finite(t_last) and t_last < t_best:
        report.add(
            FAIL,
            "overfitting",
            f"eval loss fell to {best:.4g} at step {best_step}, then rose to {last:.4g} "
            f"at step {last_step} while train loss fell {t_best:.4g} -> {t_last:.4g}: overfitting",
            f"stop near step {best_step} (train.max_steps, or keep that checkpoint with train.save_every), "
            "add data, train fewer epochs, lower train.lr or raise train.weight_decay",
        )
    else:
        report.add(
            OK, "overfitting", f"eval loss {points[0][1]:.4g} -> {last:.4g} (best {best:.4g} at step {best_step})"
        )


def _diagnose_skipped(train, precision, report: Report) -> None:
    skipped = [r for r in train if r.get("skipped")]
    total = train[-1].get("skipped_total") if train else None
    if isinstance(total, int) and total > len(skipped) and not (precision == "fp16" and total <= 2):
        # the engine's cumulative count (DeepSpeed's skipped_steps): exact whatever train.log_every is
        share = total / max(train[-1]["step"], 1)
        report.add(
            FAIL if share >= 0.1 else WARN,
            "skipped",
            f"{total} of {train[-1]['step']} optimizer steps were skipped (non-finite gradients)",
            "lower train.lr, use precision=bf16 instead of fp16, check the data (dsft doctor --config ...)",
        )
        return
    if not skipped:
        return
    steps = ", ".join(str(r["step"]) for r in skipped[:8]) + (" ..." if len(skipped) > 8 else "")
    note = " (only the last step of each row is logged; with train.log_every > 1 there may be more)"
    calibrating = precision == "fp16" and all(
        _finite(r.get("loss_scale")) and r["loss_scale"] > MIN_LOSS_SCALE for r in skipped
    )
    if calibrating and len(skipped) <= max(2, len(train) // 20):
        report.add(
            OK,
            "skipped",
            f"{len(skipped)} logged rows ended on a skipped step ({steps}) while the fp16 "
            "loss scale was above its floor: normal loss-scale calibration",
        )
        return
    share = len(skipped) / len(train)
    report.add(
        FAIL if share >= 0.1 else WARN,
        "skipped",
        f"{len(skipped)} of {len(train)} logged rows ended on a "
        f"skipped step (non-finite gradients; steps {steps}){note}",
        "non-finite gradients: lower train.lr, "
        "use precision=bf16 instead of fp16, check the data (dsft doctor --config ...)",
    )


def _diagnose_finished(run: Path, train, train_cfg, report: Report) -> None:
    summary = run / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        if s.get("aborted"):  # written by engine.main when training stopped with a diagnosis (exit 3)
            report.add(FAIL, "finished", f"training aborted (exit {s.get('exit_code')}): {s['aborted']}")
            return
        extra = f", eval loss {s['eval_loss']:.4g}" if _finite(s.get("eval_loss")) else ""
        report.add(OK, "finished", f"summary.json: step {s.get('step')}, last train loss {s.get('loss')}{extra}")
    else:
        report.add(
            WARN,
            "finished",
            f"no summary.json: the run stopped at or after step {train[-1]['step']} of "
            f"{train_cfg.get('max_steps') or '?'} (aborted, crashed, or still running)",
            "read the run's console log; it resumes with the same command (train.resume=auto)",
        )
