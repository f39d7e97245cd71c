"""``dsft doctor``: will this config learn (before training), and what went wrong (after)?

    dsft doctor --config finetune/configs/lora.yaml model.name_or_path=DIR data.train=PREFIX output_dir=OUT
    dsft doctor runs/lora                 # a run directory: reads metrics.jsonl, summary.json, config.json

Before training it checks what fails a run silently, in the order a fine-tuner would (the classic checklist: check
the data and labels, check what trains, overfit one batch):

- the data against the tokenizer and model (``finetune.data.check_sources`` -> ``finetune.preflight``);
- the share of tokens that carry loss, with one sample printed with its trained spans in ``[[...]]``;
- samples longer than ``data.seq_len`` (``finetune.data.length_report``), pad and eos tokens;
- the trainable parameter count (the method's ``prepare`` on a meta-device model: no weights, any size);
- the learning rate against the method's usual range (``get_method(name).lr_range``);
- on the real model, on one real batch: that gradients reach every trainable tensor (PEFT + gradient checkpointing
  needs input grads), the largest activation against fp16's range, and **overfit-one-batch**: ``OVERFIT_STEPS``
  AdamW steps at ``train.lr`` on that batch, in-process (plain torch, no DeepSpeed), on CPU or the local GPU. A
  setup that cannot memorise one batch cannot learn a dataset; the loss says which way it fails.

After training it names what the rows of ``metrics.jsonl`` show, each with its fix: a NaN after a climbing grad
norm (the learning rate), an fp16 loss-scale collapse, a loss flat from step 1, eval loss rising while train loss
falls (overfitting), skipped steps, a run that never finished.

Output: one line per finding, ``OK`` / ``WARN`` / ``FAIL`` (``SKIP``: a check that could not run, and why), then
what to do. ``--json`` prints the same as one JSON object. Exit status: 0 no FAIL, 1 at least one FAIL, 2 a bad
invocation (unreadable config, no such run directory).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

OK, WARN, FAIL, SKIP = "OK", "WARN", "FAIL", "SKIP"
EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2

# Overfit-one-batch. Measured on the demo (finetune/configs/demo.yaml: 0.6M-param Llama, 16 rows, lr 3e-3, CPU,
# 40 steps, < 1 s): 5.70 -> 0.146 (0.03x). lr 1e-7 stays at 0.998x (flat), lr 10 climbs to 13024 (diverges).
# A working setup memorises one batch: 40 steps must take the loss below 30% of its start. 30% leaves room for
# a pretrained model at a cautious rate (its start loss is already low) while a rate 100x too low stays near 1.0x;
# above 90% the setup is called unable to learn, in between it learns but slowly (WARN).
OVERFIT_STEPS = 40
OVERFIT_PASS_RATIO = 0.3
OVERFIT_FLAT_RATIO = 0.9
# Loss above this multiple of its start (or non-finite) on the same batch: divergence, the learning rate.
DIVERGE_RATIO = 1.5
FP16_MAX = 65504.0  # largest finite float16
# Activations within this factor of FP16_MAX are a warning: fine-tuning can grow them, and fp16 has no headroom.
FP16_HEADROOM = 4.0
# An lr more than this factor above the method's usual range is a FAIL unless the overfit test learned at it.
LR_FAIL_FACTOR = 10.0
LOW_LOSS_SHARE = 0.05  # under 5% of tokens carrying loss: answers are tiny next to prompts (a warning, not an error)
SCAN_SAMPLES = 5000  # samples looked at for the per-sample checks (eos trained, rendering)
SAMPLE_CHARS = 400  # characters of the rendered sample
# After training. A climb: the grad norm just before the NaN >= 3x its median over the run's first third.
GRAD_CLIMB_FACTOR = 3.0
FLAT_FALL = 0.02  # the train loss fell by less than 2% of its first value: flat
OVERFIT_EVAL_RISE = 0.05  # final eval loss 5% above its best while train loss still fell: overfitting
MIN_LOSS_SCALE = 1.0  # ds_configs.build.FP16_SECTION["min_loss_scale"]: the floor DeepSpeed's scale stops at


@dataclass
class Finding:
    """One line of the report.

    Attributes:
        level: ``OK``, ``WARN``, ``FAIL`` or ``SKIP`` (the check could not run here; says why).
        check: short name of what was checked (``data.tokenizer``, ``overfit``, ``divergence`` ...).
        message: what was found, with the numbers.
        fix: what to do (empty for OK).
    """

    level: str
    check: str
    message: str
    fix: str = ""

    def line(self) -> str:
        """``LEVEL check: message. Fix: ...`` on one line (newlines in a rendered sample are shown as \\n)."""
        text = f"{self.level:<4} {self.check}: {self.message}"
        if self.fix:
            text += f" Fix: {self.fix}"
        return text.replace("\n", "\\n")


@dataclass
class Report:
    """Everything one doctor run found, plus the measurements behind it (``--json``)."""

    mode: str  # "config" (before training) or "run" (after)
    target: str
    findings: list[Finding] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def add(self, level: str, check: str, message: str, fix: str = "") -> Finding:
        finding = Finding(level, check, message, fix)
        self.findings.append(finding)
        return finding

    def level_of(self, check: str) -> str | None:
        """The level of the last finding named ``check`` (None when it was not reported)."""
        return next((f.level for f in reversed(self.findings) if f.check == check), None)

    @property
    def exit_code(self) -> int:
        return EXIT_PROBLEM if any(f.level == FAIL for f in self.findings) else EXIT_OK

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "target": self.target,
            "exit_code": self.exit_code,
            "findings": [asdict(f) for f in self.findings],
            **self.details,
        }


class _Stop(Exception):
    """A finding that leaves nothing for the later checks to look at (the report already holds it)."""


# ---------------------------------------------------------------------------------------------------------------
# Before training


def check_config(cfg, *, world_size: int = 1, device: str = "auto", overfit_steps: int = OVERFIT_STEPS) -> Report:
    """Run every before-training check on ``cfg``; never raises for a problem of the setup (it becomes a finding).

    Args:
        cfg: a loaded ``finetune.config.Config`` (not yet validated).
        world_size: ranks the run will use (only for ``Config.validate``'s batch plan).
        device: ``auto`` (the local GPU if there is one), ``cpu`` or ``cuda``: where the model checks run.
        overfit_steps: AdamW steps of the overfit-one-batch test; 0 skips it.

    Returns:
        The report; ``report.exit_code`` is 1 when any finding is FAIL.

    Raises:
        finetune.config.ConfigError: the config itself is invalid (``Config.validate``): a bad invocation.
    """
    import torch

    plan = cfg.validate(world_size)
    report = Report("config", f"{cfg.model.name_or_path} on {cfg.data.train}")
    t0 = time.perf_counter()
    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    try:
        tokenizer, model_config = _load_tokenizer_and_config(cfg, report)
        train_src = _check_data(cfg, tokenizer, model_config, report)
        stats = _check_loss_tokens(cfg, train_src, tokenizer, report)
        _check_lengths(cfg, train_src, report)
        _check_pad_eos(cfg, train_src, tokenizer, model_config, stats, report)
        counts = _check_trainable(cfg, model_config, report)
        lr_finding = _check_lr(cfg, report)
        _check_on_model(cfg, plan, train_src, tokenizer, model_config, counts, dev, overfit_steps, report)
        _settle_lr(cfg, lr_finding, report)
    except _Stop:
        pass
    report.details["seconds"] = round(time.perf_counter() - t0, 2)
    report.details["device"] = str(dev)
    return report


def _load_tokenizer_and_config(cfg, report: Report):
    from transformers import AutoConfig

    from finetune.model import load_tokenizer

    try:
        tokenizer = load_tokenizer(cfg)
        model_config = AutoConfig.from_pretrained(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as e:  # no such directory / hub id offline / not a model
        report.add(
            FAIL,
            "model",
            f"model.name_or_path={cfg.model.name_or_path}: cannot load its tokenizer and config ({e})",
            "give a local model directory or a hub id this machine can reach",
        )
        raise _Stop from e
    return tokenizer, model_config


def _check_data(cfg, tokenizer, model_config, report: Report) -> str:
    """data.train (and data.eval) resolved and checked against the tokenizer: ``finetune.data`` does both."""
    from data_tools.meta import MetaError, check_meta_matches_tokenizer
    from finetune.config import ConfigError
    from finetune.data import check_sources, resolve_data, source_meta

    sources = {}
    try:
        for key in ("train", "eval"):
            if getattr(cfg.data, key):
                sources[f"data.{key}"] = resolve_data(getattr(cfg.data, key), cfg, tokenizer, f"data.{key}")
    except (ConfigError, OSError) as e:  # missing file, a converter refusal, an output_dir that is a file
        report.add(FAIL, "data", str(e), "fix the data path or the record the message names")
        raise _Stop from e
    try:
        for src in sources.values():
            if not src.endswith(".json"):  # a WebDataset index carries its tokenizer in index.json: check_sources
                check_meta_matches_tokenizer(src, tokenizer, missing_ok=True)
    except MetaError as e:
        report.add(
            FAIL,
            "data.tokenizer",
            str(e),
            f"re-convert the data with this model's tokenizer (dsft convert ... --tokenizer {cfg.model.name_or_path}), "
            "or set model.name_or_path to the model the data was made for",
        )
        raise _Stop from e
    try:
        check_sources(list(sources.values()), tokenizer, model_config.vocab_size)
    except ConfigError as e:  # ids outside the vocabulary, truncated files, a loss mask that does not line up
        report.add(FAIL, "data.tokenizer" if "tokeniz" in str(e) else "data", str(e), "re-run the conversion")
        raise _Stop from e
    for key, src in sources.items():
        meta = source_meta(src)
        if meta is None:
            report.add(
                WARN,
                "data.tokenizer",
                f"{key}={src}: no converter meta (.meta.json), so which tokenizer made it cannot be checked; "
                "token ids are within the model's vocabulary",
                "convert with dsft convert, which records the tokenizer",
            )
        else:
            tok = meta.get("tokenizer") or {}
            report.add(
                OK,
                "data.tokenizer",
                f"{key}={src}: converted with this model's tokenizer (vocab {tok.get('vocab_size')}, hash "
                f"{str(tok.get('vocab_hash'))[:12]}), every id < vocab_size {model_config.vocab_size}",
            )
    return sources["data.train"]


@dataclass
class _LossStats:
    """Loss-mask statistics of the training source (after truncation to ``data.seq_len``)."""

    has_mask: bool
    samples: int
    tokens: int
    trained: int
    zero_target_samples: int
    stop_trained_share: float | None = None  # share of scanned SFT samples whose trained tokens include a stop id


def _mmap_loss_stats(src: str, seq_len: int) -> tuple[Any, _LossStats]:
    """Exact counts over every sample of an mmap prefix, truncated to ``seq_len`` as the loader does."""
    import numpy as np

    from data_tools import indexed
    from data_tools.loading.mmap_source import MmapSource

    source = MmapSource(src)
    sizes = source.sizes
    kept = np.minimum(sizes, seq_len)
    tokens = int(kept.sum())
    if not source.has_loss_mask:
        # every token is a target but the first of each sample (nothing predicts it)
        return source, _LossStats(False, len(sizes), tokens, int((kept - 1).clip(min=0).sum()), int((kept < 2).sum()))
    mask_ds = indexed.IndexedDataset(source.loss_mask_prefix)
    mask = np.memmap(indexed.data_path(source.loss_mask_prefix), mode="r", dtype=mask_ds.dtype)
    offsets, per_sample = source.offsets, np.zeros(len(sizes), dtype=np.int64)
    for start in range(0, len(sizes), 4096):  # chunks of samples: one pass, memory bounded by the chunk
        stop = min(start + 4096, len(sizes))
        a, b = int(offsets[start]), int(offsets[stop - 1] + sizes[stop - 1])
        segment = np.append(np.asarray(mask[a:b]) != 0, False)  # the extra 0 keeps the last bound in range
        bounds = np.stack([offsets[start:stop] - a, offsets[start:stop] - a + kept[start:stop]], axis=1).ravel()
        per_sample[start:stop] = np.add.reduceat(segment, bounds, dtype=np.int64)[::2]
    per_sample[kept == 0] = 0  # reduceat over an empty range returns the element at its start
    trained = int(per_sample.sum())
    return source, _LossStats(True, len(sizes), tokens, trained, int((per_sample == 0).sum()))


def _loader_loss_stats(cfg, src: str, tokenizer, batches: int = 20) -> tuple[list, _LossStats]:
    """Counts from the first ``batches`` loader batches (WebDataset shards: no random access to samples)."""
    from data_tools.loader import build_dataloader

    loader = build_dataloader(
        src,
        seq_len=cfg.data.seq_len,
        micro_batch_size=1,
        packing="padding",
        shuffle=False,
        drop_last=False,
        pad_id=tokenizer.pad_token_id,
    )
    rows, tokens, trained, zero = [], 0, 0, 0
    for n, batch in enumerate(loader):
        if n >= batches:
            break
        ids, labels = batch["input_ids"][0], batch["labels"][0]
        real = batch["attention_mask"][0].bool()
        mask = (labels != -100) & real
        rows.append((ids[real].numpy(), mask[real].numpy()))
        tokens += int(real.sum())
        trained += int(mask.sum())
        zero += int(mask.sum() == 0)
    has_mask = bool(getattr(loader.source, "has_loss_mask", False))
    return rows, _LossStats(has_mask, len(rows), tokens, trained, zero)


def _check_loss_tokens(cfg, src: str, tokenizer, report: Report) -> _LossStats:
    """Share of tokens that carry loss, samples with none, and one sample shown with its trained spans."""
    import numpy as np

    if src.endswith(".json"):
        rows, stats = _loader_loss_stats(cfg, src, tokenizer)
        where = f"the first {stats.samples} samples of {src}"
        sample_at = lambda i: rows[i]  # noqa: E731 - the same accessor shape as the mmap case
    else:
        source, stats = _mmap_loss_stats(src, cfg.data.seq_len)
        where = f"{stats.samples:,} samples of {src}"

        def sample_at(i):
            ids, mask = source.sample(i, cfg.data.seq_len)
            return np.asarray(ids), (np.ones(len(ids), np.uint8) if mask is None else np.asarray(mask))

    share = stats.trained / max(stats.tokens, 1)
    report.details["loss_tokens"] = {**asdict(stats), "share": share}
    if stats.samples == 0:
        report.add(FAIL, "loss_tokens", f"data.train={src} holds no sample", "convert non-empty data")
        raise _Stop
    if stats.trained == 0:
        report.add(
            FAIL,
            "loss_tokens",
            f"no token of {where} carries loss: the loss mask is all zero (no assistant tokens), so the loss is 0 "
            "and nothing is learned",
            "re-convert chat data so assistant turns are trained (data.format=messages|sharegpt|alpaca; a template "
            "with {% generation %} tags or --mask-method prefix; check loss_weight 0 on every turn)",
        )
    else:
        kind = "SFT data, loss on assistant tokens" if stats.has_mask else "text data, loss on every token"
        level = WARN if stats.has_mask and share < LOW_LOSS_SHARE else OK
        fix = (
            "fine if answers are short; otherwise check the chat template marks whole answers" if level == WARN else ""
        )
        msg = f"{share:.1%} of {stats.tokens:,} tokens carry loss ({stats.trained:,}; {kind})"
        if stats.zero_target_samples:
            msg += f"; {stats.zero_target_samples:,} of {stats.samples:,} samples carry none (after seq_len truncation)"
            level = WARN
            fix = (
                fix
                or "raise data.seq_len or drop those samples (data.over_length=drop): they cost compute, teach nothing"
            )
        report.add(level, "loss_tokens", msg, fix)
    # one sample, trained spans marked: the quickest way to see a mask that misses or overshoots the answers
    limit = min(stats.samples, SCAN_SAMPLES)
    pick = next((i for i in range(limit) if sample_at(i)[1].any()), 0)
    ids, mask = sample_at(pick)
    report.add(
        OK if mask.any() else WARN,
        "sample",
        f"#{pick} ({len(ids)} tokens, trained in [[...]]): {render_sample(ids, mask, tokenizer)}",
    )
    if stats.has_mask:
        stop_ids = set(_stop_ids(src, tokenizer))
        scanned = [sample_at(i) for i in range(limit)]
        with_stop = sum(bool(stop_ids & set(map(int, ids[mask.astype(bool)]))) for ids, mask in scanned)
        stats.stop_trained_share = with_stop / max(len(scanned), 1)
    return stats


def render_sample(ids, mask, tokenizer, color: bool = False, max_chars: int = SAMPLE_CHARS) -> str:
    """``ids`` decoded, with the runs of tokens whose ``mask`` is 1 (they carry loss) in ``[[...]]`` (or green ANSI).

    Args:
        ids: token ids of one sample.
        mask: 0/1 per token, the loss mask.
        tokenizer: decodes the ids (each run at once, so multi-byte characters stay whole).
        color: ANSI colour instead of brackets (for a terminal).
        max_chars: cut the rendering after this many characters (``...`` marks the cut).
    """
    import itertools

    out, pos = [], 0
    for trained, run in itertools.groupby(mask.tolist() if hasattr(mask, "tolist") else list(mask), key=bool):
        n = len(list(run))
        text = tokenizer.decode([int(t) for t in ids[pos : pos + n]], skip_special_tokens=False)
        pos += n
        if trained:
            text = f"\033[32m{text}\033[0m" if color else f"[[{text}]]"
        out.append(text)
    text = "".join(out)
    return text if len(text) <= max_chars else text[:max_chars] + "..."


def _stop_ids(src: str, tokenizer) -> list[int]:
    """The tokens a trained answer should end with: the data's end-of-turn tokens and eos (``serving_settings``)."""
    from finetune.data import serving_settings, source_meta

    settings, _ = serving_settings(source_meta(src), tokenizer)
    ids = list(settings.get("stop_token_ids") or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def _check_lengths(cfg, src: str, report: Report) -> None:
    """Samples longer than data.seq_len, and what the converter cut or dropped (``finetune.data.length_report``)."""
    from finetune.data import is_raw, length_messages, length_report, source_meta

    lr = length_report("data.train", src, source_meta(src), cfg)
    report.details["lengths"] = lr
    messages = [m.split(": ", 1)[1] for m in length_messages(lr, raw=is_raw(cfg.data.train))]
    for m in messages:  # each line already says what to do
        report.add(WARN, "lengths", m)
    if not messages:
        n = lr.get("loader_samples")
        report.add(
            OK,
            "lengths",
            f"no sample is longer than data.seq_len={cfg.data.seq_len}" + (f" ({n:,} samples)" if n else "")
            if "loader_samples" in lr
            else f"text data packed into data.seq_len={cfg.data.seq_len} rows: no token is lost",
        )


def _check_pad_eos(cfg, src: str, tokenizer, model_config, stats: _LossStats, report: Report) -> None:
    from finetune.data import serving_settings, source_meta

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if eos is None:
        report.add(
            WARN,
            "eos",
            "the tokenizer has no eos token: a trained model has no token to stop on",
            "use a tokenizer with an eos token (or add one and resize the embeddings)",
        )
    if pad is not None and pad >= model_config.vocab_size:
        report.add(
            FAIL,
            "pad",
            f"pad id {pad} is outside the model's vocabulary ({model_config.vocab_size} rows)",
            "use the tokenizer of model.name_or_path, or resize the model's embeddings",
        )
    elif pad is not None and pad == eos:
        report.add(
            OK,
            "pad",
            f"pad = eos ({tokenizer.convert_ids_to_tokens(pad)!r}, id {pad}): harmless here, dsft masks padding by "
            "position (labels -100 on pad positions), not by id, so eos is still trained",
        )
    elif pad is not None:
        report.add(OK, "pad", f"pad {tokenizer.convert_ids_to_tokens(pad)!r} (id {pad}), eos id {eos}")
    if not stats.has_mask or stats.trained == 0:
        return
    _, warning = serving_settings(source_meta(src), tokenizer)
    share = stats.stop_trained_share or 0.0
    if share == 0.0:
        report.add(
            WARN,
            "eos",
            "no trained token of the scanned samples is eos or an end-of-turn token: the model never learns to "
            "end an answer and generates until max_new_tokens",
            "convert with a chat template whose assistant turns end in eos/<|im_end|> inside the trained span",
        )
    else:
        report.add(
            WARN if warning else OK,
            "eos",
            f"{share:.0%} of the scanned samples train an end token (eos or end of turn)"
            + (f"; {warning}" if warning else ""),
        )


def _check_trainable(cfg, model_config, report: Report) -> tuple[int, int] | None:
    """The method's ``prepare`` on a meta-device model (no weights, seconds for any size): what would train."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.methods import get_method, trainable_report

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=cfg.model.trust_remote_code)
        model = get_method(cfg.method.name).prepare(model, cfg)
    except (ValueError, TypeError, KeyError, RuntimeError) as e:  # PEFT: target modules not found / unsupported
        report.add(
            FAIL,
            "trainable",
            f"method.name={cfg.method.name} cannot be applied to this model, nothing would train: {e}",
            _trainable_fix(cfg),
        )
        raise _Stop from e
    trainable, total, line = trainable_report(model)
    report.details["params"] = {"trainable": trainable, "total": total}
    if trainable == 0:
        report.add(FAIL, "trainable", f"method.name={cfg.method.name}: {line}", _trainable_fix(cfg))
        raise _Stop
    report.add(OK, "trainable", f"method.name={cfg.method.name}: {line}")
    return trainable, total


def _trainable_fix(cfg) -> str:
    if cfg.method.name in ("lora", "qlora"):
        return (
            f"method.lora.target_modules={cfg.method.lora.target_modules} must name Linear layers of this model "
            "(e.g. [q_proj,v_proj] for Llama, [c_attn] for GPT-2) or be all-linear"
        )
    return "check the method.* settings against the model"


def _check_lr(cfg, report: Report) -> Finding | None:
    """``train.lr`` against the method's usual range; a FAIL here may be settled by the overfit test."""
    lr_range = get_lr_range(cfg.method.name)
    if lr_range is None:
        report.add(SKIP, "lr", f"method {cfg.method.name} declares no usual learning-rate range (lr_range)")
        return None
    low, high = lr_range
    lr = cfg.train.lr
    where = f"train.lr={lr:g}, {cfg.method.name}'s usual range is {low:g}..{high:g} (AdamW, pretrained models)"
    if lr > high * LR_FAIL_FACTOR:
        return report.add(
            FAIL,
            "lr",
            f"{where}: {lr / high:.0f}x above it, expect divergence (NaN within ~100 steps)",
            f"lower train.lr to {high:g} or less",
        )
    if lr > high:
        return report.add(
            WARN, "lr", f"{where}: above it", f"lower train.lr towards {high:g} unless the model is small"
        )
    if lr < low:
        return report.add(WARN, "lr", f"{where}: below it, the loss may barely move", f"raise train.lr towards {low:g}")
    return report.add(OK, "lr", where)


def _settle_lr(cfg, finding: Finding | None, report: Report) -> None:
    """An lr far above the usual range that the overfit test learned with, without diverging: a WARN, not a FAIL
    (a small or random-init model, like the demo's, trains at rates a pretrained one would diverge at)."""
    if finding is None or finding.level != FAIL or report.level_of("overfit") != OK:
        return
    low, high = get_lr_range(cfg.method.name)
    finding.level = WARN
    finding.message = (
        f"train.lr={cfg.train.lr:g} is {cfg.train.lr / high:.0f}x above {cfg.method.name}'s usual range "
        f"{low:g}..{high:g} (for pretrained models), but the overfit test learned at it without diverging: it suits "
        "this model (small or random-init)"
    )
    finding.fix = f"with a pretrained base, lower train.lr to {high:g} or less"


def get_lr_range(method: str) -> tuple[float, float] | None:
    """``get_method(method).lr_range``: the method's usual peak learning rates (None when it declares none)."""
    from finetune.methods import get_method

    return getattr(get_method(method), "lr_range", None)


def _check_on_model(cfg, plan, src, tokenizer, model_config, counts, dev, overfit_steps: int, report: Report) -> None:
    """Load the real model (weights in fp32 on ``dev``) and run the checks that need it on one real batch."""
    import torch

    need = _bytes_needed(*counts)
    free = _free_bytes(dev)
    if free is not None and need > 0.8 * free:
        why = f"needs ~{need / 2**30:.1f} GiB for weights, gradients and AdamW in fp32, {free / 2**30:.1f} GiB free"
        for check in ("gradients", "fp16_range", "overfit"):
            report.add(SKIP, check, f"not run on {dev}: {why}", "run dsft doctor on a machine (GPU) with more memory")
        return
    hf_attn, mode = _attention(cfg, model_config, dev, report)
    batch = _first_batch(cfg, plan, src, tokenizer, mode, report)
    if batch is None:
        return
    model = _load_model(cfg, hf_attn, dev)
    _check_gradients(cfg, model, batch, dev, report)
    _check_fp16_range(cfg, model, model_config, batch, dev, report)
    if overfit_steps > 0:
        _overfit(cfg, model, batch, dev, overfit_steps, report)
    else:
        report.add(SKIP, "overfit", "--overfit-steps 0")
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _bytes_needed(trainable: int, total: int) -> int:
    """fp32 weights, plus gradient and two AdamW moments per trainable weight; activations of one batch not counted."""
    return 4 * total + 12 * trainable


def _free_bytes(dev) -> int | None:
    import torch

    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:  # not Linux: no cheap way to ask, run the checks
        return None
    return None


def _attention(cfg, model_config, dev, report: Report) -> tuple[str, str]:
    """The run's attention kernel, or this machine's default for it when the configured one cannot run here."""
    from finetune.attention import resolve_attention

    try:
        return resolve_attention(cfg.model.attn_implementation, dev.type, config=model_config, precision="fp32")
    except ValueError as e:  # e.g. flash_attention_2 on a CPU login node: check the rest with what runs here
        hf, mode = resolve_attention("auto", dev.type, config=model_config, precision="fp32")
        report.add(
            SKIP,
            "attention",
            f"model.attn_implementation={cfg.model.attn_implementation} cannot run here ({e}); the model checks use {hf}",
        )
        return hf, mode


def _first_batch(cfg, plan, src, tokenizer, mode: str, report: Report) -> dict | None:
    """The first training micro-batch (the run's seed, packing and micro batch size), as the engine builds it."""
    from data_tools.loader import build_dataloader

    loader = build_dataloader(
        src,
        seq_len=cfg.data.seq_len,
        micro_batch_size=plan.micro_batch_size,
        seed=cfg.train.seed,
        packing=cfg.packing,
        attention=mode,
        pad_id=tokenizer.pad_token_id,
        shuffle=True,
        drop_last=True,
    )
    batch = next(iter(loader), None)
    if batch is None:
        report.add(
            FAIL,
            "overfit",
            f"data.train gives no full micro-batch of {plan.micro_batch_size} rows",
            "use more data or a smaller train.micro_batch_size",
        )
        return None
    targets = int((batch["labels"][:, 1:] != -100).sum())
    report.details["batch"] = {
        "rows": int(batch["input_ids"].shape[0]),
        "length": int(batch["input_ids"].shape[1]),
        "targets": targets,
    }
    if targets == 0:
        report.add(
            FAIL,
            "overfit",
            "the first batch has no target token (every label is masked): the loss is 0/0",
            "see loss_tokens above: the data's loss mask is empty",
        )
        return None
    return batch


def _load_model(cfg, hf_attn: str, dev):
    """The base in fp32 on ``dev``, made trainable by the method's ``prepare``, as the run would (minus DeepSpeed)."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.methods import get_method

    method = get_method(cfg.method.name)
    kwargs = method.load_kwargs(cfg, "fp32")
    if "quantization_config" in kwargs:
        kwargs["device_map"] = {"": dev.index or 0} if dev.type == "cuda" else {"": "cpu"}
    torch.manual_seed(cfg.train.seed)  # PEFT adapters start as in the run
    model = AutoModelForCausalLM.from_pretrained(
        cfg.model.name_or_path,
        dtype=torch.float32,
        attn_implementation=hf_attn,
        trust_remote_code=cfg.model.trust_remote_code,
        use_safetensors=True,
        **kwargs,
    )
    model.config.use_cache = False
    model = method.prepare(model, cfg)
    return model.to(dev)


def _forward(cfg, model, batch, dev):
    from finetune.engine import _forward_kwargs  # the engine's rule for what reaches the model (one home)

    kwargs, _ = _forward_kwargs(batch, cfg, dev)
    return model(**kwargs)


def _check_gradients(cfg, model, batch, dev, report: Report) -> None:
    """A real backward on two rows: every trainable tensor must get a gradient (PEFT + checkpointing: input grads)."""
    tiny = {k: (v[:2] if hasattr(v, "shape") and v.dim() > 0 else v) for k, v in batch.items()}
    model.train()
    model.zero_grad(set_to_none=True)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    peft_gc = cfg.is_peft and cfg.model.gradient_checkpointing
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hooked = bool(getattr(base, "_require_grads_hooks", None) or getattr(base, "_require_grads_hook", None))
    check = "gradients.checkpointing" if peft_gc else "gradients"
    try:
        loss = _forward(cfg, model, tiny, dev).loss
        loss.backward()
    except RuntimeError as e:  # "element 0 of tensors does not require grad": nothing upstream of the loss trains
        report.add(
            FAIL,
            check,
            f"backward on one batch failed ({str(e).splitlines()[0]}): no gradient reaches the trainable parameters"
            + (
                " (frozen embeddings + gradient checkpointing: the checkpointed blocks see no input that needs grad)"
                if peft_gc
                else ""
            ),
            "call model.enable_input_require_grads() after enabling checkpointing (finetune.methods."
            "enable_gradient_checkpointing does), or use non-reentrant checkpointing",
        )
        return
    # Reached = autograd gave it a gradient. Zero is fine for some: LoRA's A gets exactly 0 while its B starts at 0.
    missing = [n for n, p in trainable if p.grad is None]
    moving = sum(1 for _, p in trainable if p.grad is not None and bool(p.grad.abs().sum() > 0))
    model.zero_grad(set_to_none=True)
    what = f"{len(trainable) - len(missing)} of {len(trainable)} trainable tensors get a gradient ({moving} non-zero)"
    if peft_gc:
        what += f" with gradient checkpointing (enable_input_require_grads {'set' if hooked else 'NOT set'})"
    fix_gc = (
        "call model.enable_input_require_grads() after enabling checkpointing on a frozen base (finetune.methods."
        "enable_gradient_checkpointing does), or set model.gradient_checkpointing=false"
    )
    if len(missing) == len(trainable) or moving == 0:
        report.add(
            FAIL,
            check,
            f"{what}: gradients do not reach the trainable parameters"
            + (f" ({', '.join(missing[:3])} ...)" if missing else ""),
            fix_gc if peft_gc else "check the method's prepare: the trainable tensors are not used by the forward",
        )
    elif missing:
        report.add(
            WARN if not peft_gc else FAIL,
            check,
            f"{what}; none for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}",
            fix_gc if peft_gc else "fine for layers this data never uses; otherwise they do not train",
        )
    else:
        report.add(OK, check, what)


def _planned_precision(cfg) -> str:
    """The precision the run will train in: the configured one, or what ``auto`` gives on this machine."""
    import torch

    from ds_configs import resolve_precision

    if cfg.precision != "auto":
        return cfg.precision
    return resolve_precision("auto", torch.cuda.get_device_capability() if torch.cuda.is_available() else None)


def _check_fp16_range(cfg, model, model_config, batch, dev, report: Report) -> None:
    """Largest weight and activation on one batch (fp32 forward) against fp16's 65504, when the run trains in fp16."""
    import torch

    biggest = {"value": 0.0, "where": ""}

    def hook(module_name):
        def record(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            if torch.is_tensor(out) and out.is_floating_point() and out.numel():
                m = float(out.detach().abs().max())
                if m > biggest["value"] or not math.isfinite(m):
                    biggest.update(value=m, where=module_name)

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        model.eval()
        with torch.no_grad():
            _forward(cfg, model, batch, dev)
    finally:
        for h in handles:
            h.remove()
    weight_max, weight_name = 0.0, ""
    for n, p in model.named_parameters():
        if p.is_floating_point() and p.numel():
            m = float(p.detach().abs().max())
            if m > weight_max:
                weight_max, weight_name = m, n
    act = biggest["value"]
    report.details["fp16_range"] = {
        "max_activation": act,
        "at": biggest["where"],
        "max_weight": weight_max,
        "weight": weight_name,
    }
    precision = _planned_precision(cfg)
    pretrained = str(getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", "")).replace(
        "torch.", ""
    )
    seen = f"largest activation {act:.4g} ({biggest['where']}), largest weight {weight_max:.4g} ({weight_name})"
    if precision != "fp16":
        report.add(OK, "fp16_range", f"precision={precision}: no fp16 range limit ({seen})")
        return
    to_bf16 = "use precision=bf16 (Ampere or newer: fp32's range, no loss scaling)"
    if weight_max > FP16_MAX or act > FP16_MAX or not math.isfinite(act):
        report.add(
            FAIL,
            "fp16_range",
            f"precision=fp16 but {seen} exceeds fp16's {FP16_MAX:g}: inf/NaN from the first step",
            to_bf16,
        )
    elif act * FP16_HEADROOM > FP16_MAX:
        report.add(
            WARN, "fp16_range", f"precision=fp16: {seen}, within {FP16_HEADROOM:g}x of fp16's {FP16_MAX:g}", to_bf16
        )
    elif pretrained == "bfloat16":
        report.add(
            WARN,
            "fp16_range",
            f"precision=fp16 with a model saved in bfloat16 (pretrained in bf16: its activations may leave fp16's "
            f"range on other batches; {seen} on this one)",
            to_bf16,
        )
    else:
        report.add(OK, "fp16_range", f"precision=fp16: {seen}, within fp16's range")


def _overfit(cfg, model, batch, dev, steps: int, report: Report) -> None:
    """``steps`` AdamW steps at ``train.lr`` on one batch (the run's betas, weight decay, clipping; no schedule).

    On a GPU the forward runs under autocast in the run's precision (fp32 master weights, like DeepSpeed's mixed
    precision), with a dynamic loss scaler for fp16; on CPU in fp32.
    """
    import torch

    precision = _planned_precision(cfg) if dev.type == "cuda" else "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    params = [p for p in model.parameters() if p.requires_grad]
    t = cfg.train
    opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    for _ in range(steps):
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            loss = _forward(cfg, model, batch, dev).loss
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            break
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if t.max_grad_norm > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        scaler.step(opt)
        scaler.update()
    seconds = time.perf_counter() - t0
    report.details["overfit"] = {
        "steps": len(losses),
        "losses": losses,
        "seconds": round(seconds, 2),
        "precision": precision,
        "lr": t.lr,
        "pass_ratio": OVERFIT_PASS_RATIO,
    }
    report.add(*diagnose_overfit(losses, t.lr, steps, precision, dev.type))


def diagnose_overfit(losses: list[float], lr: float, steps: int, precision: str = "fp32", device: str = "cpu"):
    """(level, check, message, fix) for the loss curve of the overfit-one-batch test."""
    start, end = losses[0], losses[-1]
    where = f"{len(losses)} AdamW steps at lr {lr:g} on one batch ({device}, {precision})"
    curve = f"loss {start:.4g} -> {end:.4g}"
    if not math.isfinite(start):
        return (
            FAIL,
            "overfit",
            f"the first loss is {start} before any update",
            ("the model's forward overflows on this batch: check fp16_range above, use fp32/bf16"),
        )
    lower = f"lower train.lr (now {lr:g}) 3-10x, or raise train.warmup"
    if not math.isfinite(end):
        return (
            FAIL,
            "overfit",
            f"{curve} (non-finite at step {len(losses)}) in {where}: the learning rate is too high, the loss diverges",
            lower,
        )
    if end > DIVERGE_RATIO * start or max(losses) > 2 * start:
        return (
            FAIL,
            "overfit",
            f"{curve} (peak {max(losses):.4g}) in {where}: the loss diverges, the learning rate is too high",
            lower,
        )
    ratio = end / start if start > 0 else 1.0
    if ratio < OVERFIT_PASS_RATIO:
        return OK, "overfit", f"{curve} ({ratio:.0%} of the start) in {where}: the setup can learn", ""
    if min(losses) < OVERFIT_PASS_RATIO * start:
        return WARN, "overfit", f"{curve} in {where}: reached {min(losses):.4g}, then climbed back: unstable", lower
    if ratio > OVERFIT_FLAT_RATIO:
        return (
            FAIL,
            "overfit",
            (
                f"{curve} ({ratio:.0%} of the start) in {where}: the setup cannot learn, the loss is flat. Gradients and "
                "labels passed above, so the learning rate is too low"
            ),
            f"raise train.lr (now {lr:g}) 10x and re-run dsft doctor",
        )
    return (
        WARN,
        "overfit",
        f"{curve} ({ratio:.0%} of the start, want < {OVERFIT_PASS_RATIO:.0%}) in {where}: learns, slowly",
        (f"raise train.lr (now {lr:g}), or --overfit-steps {2 * steps} to see if it gets there"),
    )


# ---------------------------------------------------------------------------------------------------------------
# After training


def read_rows(path: Path) -> list[dict]:
    """The rows of a ``metrics.jsonl`` (NaN/Infinity as Python's json writes them).

    Raises:
        ValueError: a line is not JSON (``path:line: ...``).
    """
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(path.read_text().splitlines()):  # a last line cut by a crash mid-write: what came before counts
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


# ---------------------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    """``dsft doctor`` arguments."""
    p = argparse.ArgumentParser(
        prog="dsft doctor",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  dsft doctor --config finetune/configs/demo.yaml model.name_or_path=demo_out/base_model \\\n"
            "      data.train=demo_out/data/train output_dir=/tmp/doctor_demo\n"
            "  dsft doctor --config finetune/configs/lora.yaml train.lr=1e-4 --json\n"
            "  dsft doctor demo_out/run            # after training: what happened, and the fix\n\n"
            "exit status: 0 no FAIL finding, 1 at least one FAIL, 2 bad invocation"
        ),
    )
    p.add_argument("--config", help="training YAML (before training); a run's config.json works too")
    p.add_argument(
        "args",
        nargs="*",
        metavar="RUN_DIR | key=value",
        help="a run directory (after training), or key=value overrides for --config",
    )
    p.add_argument("--world-size", type=int, default=1, help="ranks the run will use (for the batch plan; default 1)")
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the model checks run (auto: the local GPU if any)",
    )
    p.add_argument(
        "--overfit-steps",
        type=int,
        default=OVERFIT_STEPS,
        help=f"steps of the overfit-one-batch test (default {OVERFIT_STEPS}; 0 skips it)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    return p


def main(argv: list[str] | None = None) -> int:
    """``dsft doctor``: returns 0 (no FAIL), 1 (a FAIL finding) or 2 (bad invocation)."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from finetune.config import ConfigError, load_config

    try:
        if args.config:
            bad = [a for a in args.args if "=" not in a]
            if bad:
                raise ConfigError(
                    f"{bad[0]!r}: with --config, give key=value overrides only (a run directory goes without --config)"
                )
            if args.device == "cuda":
                import torch

                if not torch.cuda.is_available():
                    raise ConfigError("--device cuda: no CUDA GPU here; use --device cpu")
            _quiet_libraries()
            cfg = load_config(args.config, args.args)
            report = check_config(cfg, world_size=args.world_size, device=args.device, overfit_steps=args.overfit_steps)
        else:
            if len(args.args) != 1 or "=" in args.args[0]:
                raise ConfigError("give --config X.yaml [key=value ...] (before training) or one RUN_DIR (after)")
            try:
                report = diagnose_run(args.args[0])
            except (FileNotFoundError, ValueError) as e:  # no such directory, a metrics line that is not JSON
                print(f"error: {e}", file=sys.stderr)
                return EXIT_USAGE
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        for f in report.findings:
            print(f.line())
        fails = sum(f.level == FAIL for f in report.findings)
        warns = sum(f.level == WARN for f in report.findings)
        verdict = "healthy" if not fails else "problems found"
        print(f"doctor: {verdict}: {fails} FAIL, {warns} WARN ({report.target})")
    return report.exit_code


def _quiet_libraries() -> None:
    """Progress bars of every weight load would bury the findings."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
