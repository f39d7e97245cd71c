"""``dsft doctor --config X.yaml``: the checks before training, in the order a fine-tuner would run them.

The data against the tokenizer and model, the share of tokens that carry loss (one sample shown with its trained
spans), sample lengths, pad and eos, the trainable parameter count and the learning rate against the method's usual
range; then the checks on the real model on one real batch (:mod:`finetune.doctor.model_checks`: gradient flow,
fp16 range, overfit-one-batch). Each problem becomes a finding of the :class:`~finetune.doctor.report.Report`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from finetune.doctor.model_checks import OVERFIT_STEPS, check_on_model
from finetune.doctor.report import FAIL, OK, SKIP, WARN, Finding, Report

# An lr more than this factor above the method's usual range is a FAIL unless the overfit test learned at it.
LR_FAIL_FACTOR = 10.0
LOW_LOSS_SHARE = 0.05  # under 5% of tokens carrying loss: answers are tiny next to prompts (a warning, not an error)
SCAN_SAMPLES = 5000  # samples looked at for the per-sample checks (eos trained, rendering)
SAMPLE_CHARS = 400  # characters of the rendered sample


class _Stop(Exception):
    """A finding that leaves nothing for the later checks to look at (the report already holds it)."""


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
    from finetune.data import item_path, source_paths

    given = cfg.data.train if isinstance(cfg.data.train, str) else ", ".join(map(item_path, cfg.data.train))
    report = Report("config", f"{cfg.model.name_or_path} on {given}")
    t0 = time.perf_counter()
    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    try:
        tokenizer, model_config = _load_tokenizer_and_config(cfg, report)
        train = _check_data(cfg, tokenizer, model_config, report)  # one path, or a mixture's resolved items
        paths = source_paths(train)
        # Per source: a mixture's sources each carry their own masks and lengths; the run serves the first's template.
        stats = [_check_loss_tokens(cfg, src, tokenizer, report) for src in paths][0]
        for i, src in enumerate(paths):
            _check_lengths(cfg, src, report, "data.train" if len(paths) == 1 else f"data.train[{i}]")
        _check_pad_eos(cfg, paths[0], tokenizer, model_config, stats, report)
        counts = _check_trainable(cfg, model_config, report)
        lr_finding = _check_lr(cfg, report)
        check_on_model(cfg, plan, train, tokenizer, model_config, counts, dev, overfit_steps, report)
        _settle_lr(cfg, lr_finding, report)
    except _Stop:
        pass  # the finding that ended the checks is already in the report; the later ones need its output
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
    from finetune.data import check_sources, resolve_data, source_meta, source_paths

    sources = {}
    try:
        for key in ("train", "eval"):
            if getattr(cfg.data, key):
                sources[f"data.{key}"] = resolve_data(getattr(cfg.data, key), cfg, tokenizer, f"data.{key}")
    except (ConfigError, OSError) as e:  # missing file, a converter refusal, an output_dir that is a file
        report.add(FAIL, "data", str(e), "fix the data path or the record the message names")
        raise _Stop from e
    try:
        for src in (p for r in sources.values() for p in source_paths(r)):
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
    labelled = [
        (key if len(source_paths(r)) == 1 else f"{key}[{i}]", p)
        for key, r in sources.items()
        for i, p in enumerate(source_paths(r))
    ]
    for key, src in labelled:
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


def _check_lengths(cfg, src: str, report: Report, key: str = "data.train") -> None:
    """Samples longer than data.seq_len, and what the converter cut or dropped (``finetune.data.length_report``)."""
    from finetune.data import is_raw, item_path, length_messages, length_report, source_meta

    lr = length_report(key, src, source_meta(src), cfg)
    report.details.setdefault("lengths", {})[key] = lr
    given = cfg.data.train if key == "data.train" else cfg.data.train[int(key.split("[")[1].rstrip("]"))]
    messages = [m.split(": ", 1)[1] for m in length_messages(lr, raw=is_raw(item_path(given)))]
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
