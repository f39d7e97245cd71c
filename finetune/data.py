"""From ``data.train`` / ``data.eval`` to sources the loader can read, checked against the tokenizer and model.

``resolve_data`` converts a raw .jsonl/.json once into a cache (main rank; the others wait) and passes mmap
prefixes and WebDataset indexes through; ``check_sources`` runs ``finetune.preflight`` on the main rank and makes
every rank raise the same ``ConfigError``. Once resolved, a source's converter meta says what training should know:
``length_report`` (samples truncated, dropped or skipped, by the converter and by the loader) and
``serving_settings`` (the chat template the data was rendered with and the tokens its assistant turns end with).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from finetune import distributed as dist
from finetune.config import Config, ConfigError

# The converter's messages name its CLI flags; a training user sets config keys. Flag -> (key, the values the flag
# takes in those messages), so "use --on-error skip to drop bad lines" reads "use data.on_error=skip ...".
CONVERTER_FLAGS = {
    "--on-error": ("data.on_error", r"fail|skip"),
    "--over-length": ("data.over_length", r"error|truncate|drop"),
    "--max-length": ("data.max_length", r"\d+|N"),
    "--format": ("data.format", r"auto|text|alpaca|sharegpt|messages|prompt_completion|'[^']*'"),
    "--chat-template": ("data.chat_template", r"FILE"),
    "--columns": ("data.columns", r"[\w.-]+=[\w.-]+"),
    "--split": ("data.split", r"[\w.-]+"),
    "--subset": ("data.subset", r"[\w.-]+"),
}
# What a raw data.train / data.eval can be (converted once by resolve_data): data_tools.sources reads them.
RAW_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet", ".arrow", ".csv")


def converter_message(message: str, chat_template: str | None = None) -> str:
    """A converter error message with its CLI flags replaced by the training config keys of ``CONVERTER_FLAGS``.

    Args:
        message: ``str(ConversionError)`` or ``str(FormatError)``.
        chat_template: ``data.chat_template``, so ``--chat-template PATH`` becomes ``data.chat_template=PATH``.
    """
    for flag, (key, values) in CONVERTER_FLAGS.items():
        if flag == "--chat-template" and chat_template:
            values += "|" + re.escape(chat_template)

        def to_key(m: re.Match, key: str = key) -> str:
            return f"{key}={m[1]}" if m[1] else key

        message = re.sub(rf"{flag}(?: ({values})(?![\w-]))?", to_key, message)
    # "data.chat_template=FILE (data.chat_template)": the converter already named the key once
    return re.sub(r"(data\.\w+)(=\S+)? \(\1\)", r"\1\2", message)


def is_raw(path: str) -> bool:
    """``path`` is raw data that ``resolve_data`` converts: a file of :data:`RAW_SUFFIXES` (not a WebDataset
    ``index.json``), a ``save_to_disk`` folder or a folder of shards (a folder without ``index.json``), or a hub
    dataset id (``namespace/name`` that is neither a path nor an mmap prefix)."""
    from data_tools.sources import is_hub_id

    p = Path(path)
    if p.name == "index.json":
        return False
    if p.is_dir():
        return not (p / "index.json").is_file()
    if p.name.lower().endswith(RAW_SUFFIXES):
        return True
    return is_hub_id(path) and not (Path(f"{p}.idx").exists() or Path(f"{p}.bin").exists())


def _cache_stem(path: str) -> str:
    """A readable start of the cache name: the file name without its data suffixes, the folder, or ``ns__name``."""
    name = path.rstrip("/").replace("/", "__") if not Path(path).exists() else Path(path).name
    for suffix in (".gz", *RAW_SUFFIXES):
        name = name.removesuffix(suffix)
    return name or "data"


def resolve_data(path, cfg: Config, tokenizer, key: str = "data.train"):
    """Turn ``data.train``/``data.eval`` into what the loader reads; convert raw data (:func:`is_raw`) once.

    A mixture (a list of ``DataSource`` items or ``{"path", "weight", "name"}`` dicts) resolves item by item, errors
    naming ``key[i]``, into the list ``build_dataloader`` takes: ``[{"path": resolved, "weight": w, "name": n}]``.

    Raw inputs are converted on the main rank into ``data.cache_dir`` (default ``output_dir/data_cache``) under a
    name keyed by the input (a file's size and mtime, every file's of a folder, a hub id with ``data.split`` and
    ``data.subset``), the tokenizer and every option that changes the ids (``data.format``, ``data.columns``,
    ``data.max_length``, ``data.over_length``, ``data.on_error``, the ``data.chat_template`` file's content), while
    the other ranks wait. A later run reuses the cache once ``is_conversion_current`` agrees: the inputs' content
    fingerprints (file sha256, or ``datasets``' fingerprint of a folder / cached hub split) match the meta.

    Args:
        path: the value of ``key``.
        cfg: the run config.
        tokenizer: the run's tokenizer.
        key: ``data.train`` or ``data.eval``, named in errors.

    Raises:
        ConfigError: on every rank, when the file is missing or the converter refuses it (``key: file:line: ...``
            with the config key that changes the outcome).
    """
    if isinstance(path, list | tuple):
        return [
            {"path": resolve_data(item_path(item), cfg, tokenizer, f"{key}[{i}]"), **_weight_and_name(item)}
            for i, item in enumerate(path)
        ]
    from data_tools.meta import vocab_hash
    from data_tools.sources import listing_key
    from finetune.preflight import data_path_problem

    p = Path(path)
    problem = data_path_problem(path, key)  # the same check `dsft train` runs before launch
    if problem:
        raise ConfigError(problem)
    if is_raw(path):
        d = cfg.data
        split, subset, columns = d.split, d.subset, d.columns or None
        template = hashlib.sha256(Path(d.chat_template).read_bytes()).hexdigest() if d.chat_template else None
        options = dict(
            fmt=d.format,
            max_length=None,  # depends on the format: see DataConfig.sample_max_length
            over_length=d.over_length,
            on_error=d.on_error,
            chat_template=d.chat_template,
            columns=columns,
        )
        cache_key = "|".join(
            map(
                str,
                (listing_key(path), split, subset, vocab_hash(tokenizer), *options.values(), template)
                + (d.max_length, d.seq_len),
            )
        )
        cache = Path(d.cache_dir or Path(cfg.output_dir) / "data_cache")
        prefix = cache / f"{_cache_stem(path)}-{hashlib.sha1(cache_key.encode()).hexdigest()[:12]}"
        error = None
        if dist.is_main():
            from data_tools.convert import ConversionError, convert, detect_input_format, is_conversion_current
            from data_tools.formats import FormatError

            # The meta is written last by convert(): checking it (not just the .idx) means a conversion killed
            # between its renames is redone instead of trained on.
            try:
                where = dict(split=split, subset=subset)
                fmt = d.format
                if fmt == "auto":
                    fmt = detect_input_format([path], on_error=d.on_error, columns=columns, **where)
                options.update(fmt=fmt, max_length=d.sample_max_length(fmt))
                if not is_conversion_current(prefix, [path], tokenizer, **where, **options):
                    cache.mkdir(parents=True, exist_ok=True)
                    print(f"[dsft] converting {path} -> {prefix} (once; cached for later runs)", flush=True)
                    convert([path], prefix, tokenizer, **where, **options)
            except (ConversionError, FormatError) as e:
                error = f"{key}: {converter_message(str(e), d.chat_template)}"
        # Also the barrier the other ranks wait at; every rank raises alike instead of hanging in the next collective.
        error = dist.broadcast_object(error)
        if error:
            raise ConfigError(error)
        return str(prefix)
    if p.is_dir():  # a WebDataset folder given instead of its index
        return str(p / "index.json")
    return str(p)  # mmap prefix or WebDataset index: checked against the tokenizer and the model by check_sources


def item_path(item) -> str:
    """The path of a mixture item (a ``DataSource`` or a ``{"path", ...}`` dict; a plain path stays itself)."""
    if isinstance(item, str | Path):
        return str(item)
    return str(item["path"] if isinstance(item, dict) else item.path)


def _weight_and_name(item) -> dict[str, Any]:
    from data_tools.loading.blend import default_name

    get = item.get if isinstance(item, dict) else lambda k, d=None: getattr(item, k, d)
    return {"weight": get("weight", 1.0), "name": get("name") or default_name(item_path(item))}


def source_paths(resolved) -> list[str]:
    """The resolved paths of a ``resolve_data`` result: one, a mixture's each, or none (None)."""
    if not resolved:
        return []
    return [item_path(it) for it in resolved] if isinstance(resolved, list | tuple) else [str(resolved)]


def tokenizer_mismatch(labelled: list[tuple[str, str]]) -> str | None:
    """Why the sources of one mixture cannot train together, or None: they were converted with different tokenizers.

    Args:
        labelled: ``(label, resolved path)`` per source; the label names it in the message (``data.train[1]=B``).
            Sources without a converter meta (converted by another tool) are not compared.
    """
    seen: list[tuple[str, dict]] = []
    for label, src in labelled:
        try:
            meta = source_meta(src)
        except (OSError, ValueError):  # unreadable meta: the per-source checks report it with their own message
            continue
        tok = (meta or {}).get("tokenizer") or {}
        if not tok.get("vocab_hash"):
            continue
        for other_label, other in seen:
            if other["vocab_hash"] != tok["vocab_hash"]:
                return (
                    f"{other_label} and {label} were converted with different tokenizers ({other.get('name')!r}, "
                    f"vocab {other.get('vocab_size')} vs {tok.get('name')!r}, vocab {tok.get('vocab_size')}): the "
                    "same ids would mean different tokens. Re-convert every source with the model's tokenizer"
                )
        seen.append((label, tok))
    return None


def check_sources(sources: list, tokenizer, vocab_size: int) -> None:
    """Data vs model checks (tokenizer hash, ids < vocab, intact files) on the main rank; every rank raises.

    ``sources`` are ``resolve_data`` results (a path, a mixture list, or None). The sources of a mixture must also
    agree with each other on the tokenizer (named by their mixture names), checked first.
    """
    from finetune.preflight import PreflightError, check_training_data

    error = None
    if dist.is_main():
        mixtures = [r for r in sources if isinstance(r, list | tuple)]
        for resolved in mixtures:
            error = error or tokenizer_mismatch(
                [(f"source {it['name']!r} ({it['path']})", it["path"]) for it in resolved]
            )
        labelled = [
            (f"mixture source {it['name']!r}: " if isinstance(r, list | tuple) else "", item_path(it))
            for r in sources
            for it in (r if isinstance(r, list | tuple) else source_paths(r))
        ]
        for label, src in [] if error else labelled:
            try:
                check_training_data(src, tokenizer, vocab_size)
            except PreflightError as e:
                error = f"{label}{e}"
                break
    error = dist.broadcast_object(error)  # the other ranks would otherwise wait forever in the next collective
    if error:
        raise ConfigError(error)


def source_meta(source: str) -> dict[str, Any] | None:
    """The converter's meta of a resolved source (``P.meta.json`` or ``index.json["meta"]``); None when it has none
    (e.g. data converted by Megatron-LM)."""
    from data_tools.meta import meta_path, read_meta

    if source.endswith(".json"):
        return json.loads(Path(source).read_text()).get("meta")
    return read_meta(source) if meta_path(source).is_file() else None


def serving_settings(meta: dict[str, Any] | None, tokenizer) -> tuple[dict[str, Any], str | None]:
    """What a model trained on data of ``meta`` should be served with (``output_dir/serving.json``), and a warning.

    Returns:
        ``({"chat_template": text or None, "chat_template_source": file|tokenizer|default or None,
        "stop_token_ids": ids or None, "turn_end_tokens": [...]}, warning or None)``. ``stop_token_ids`` is None
        unless the data had assistant turns (text data keeps the model's own eos).
    """
    from data_tools.templates import stop_token_ids

    meta = meta or {}
    template = meta.get("chat_template")
    if not isinstance(template, dict) or not isinstance(template.get("template"), str):
        template = {}  # text data, or a meta written before templates were recorded (a plain string there)
    turns = meta.get("turn_end_tokens") or []
    stop_ids, warning = stop_token_ids(meta, tokenizer) if turns else (None, None)
    settings = {
        "chat_template": template.get("template"),
        "chat_template_source": template.get("source"),
        "stop_token_ids": stop_ids,
        "turn_end_tokens": turns,
    }
    return settings, warning


def length_report(key: str, source: str, meta: dict[str, Any] | None, cfg: Config) -> dict[str, Any]:
    """What one source loses to length limits and bad records: the converter's counts and the loader's truncation.

    The converter's part comes from ``meta`` (records read, truncated to ``max_length`` and tokens cut off, dropped
    for length, skipped as unusable by reason). The loader's part is counted from the sample lengths (the ``.idx``
    sizes, or the ``.npy`` headers of WebDataset shards; no token is read): samples longer than ``data.seq_len`` lose
    their tail. Text in packed mode is cut into ``data.seq_len`` chunks, nothing lost, so it has no loader part.

    Returns:
        A flat dict (the ``metrics.jsonl`` row and the ``summary.json`` entry); keys absent where unknown.
    """
    import numpy as np

    report: dict[str, Any] = {"source": key}
    if meta:
        counts = meta.get("counts") or {}
        by_reason = dict((meta.get("skipped") or {}).get("by_reason") or {})
        dropped = by_reason.pop("over_length", 0)
        documents = int(counts.get("documents", 0))
        report.update(
            records=documents + int(counts.get("skipped", dropped + sum(by_reason.values()))),  # lines read
            samples=documents + int(dropped),  # records that encoded, before the length limit
            documents=documents,  # samples kept
            format=meta.get("format"),
            max_length=meta.get("max_length"),
            over_length=meta.get("over_length"),
            truncated=int(counts.get("truncated", 0)),
            truncated_tokens=counts.get("truncated_tokens"),  # None in metas written before it was counted
            dropped_over_length=int(dropped),
            skipped=int(sum(by_reason.values())),
            skipped_by_reason=by_reason,
        )
    if source.endswith(".json"):
        from data_tools.loading.webdataset_source import WebDatasetSource

        wds = WebDatasetSource(source)
        has_mask, sizes = wds.has_loss_mask, np.concatenate([np.zeros(0, np.int64), *wds.sample_lengths()])
    else:
        from data_tools import indexed

        has_mask = indexed.has_loss_mask(source)
        sizes = np.asarray(indexed.IndexedDataset(source).sizes, dtype=np.int64)
    if has_mask or cfg.packing != "packed":
        over = sizes > cfg.data.seq_len
        report.update(
            seq_len=cfg.data.seq_len,
            loader_samples=int(len(sizes)),
            loader_truncated=int(over.sum()),
            loader_truncated_tokens=int((sizes[over] - cfg.data.seq_len).sum()),
        )
    return report


def report_lengths(cfg: Config, sources: dict[str, str | None]) -> dict[str, dict[str, Any]]:
    """``length_report`` of each resolved source (``{"data.train": src, "data.eval": src or None}``), its console
    lines printed. Main rank only: it reads every sample length once."""
    reports = {}
    for key, src in sources.items():
        if not src:
            continue
        given = getattr(cfg.data, key.split(".")[1])
        if isinstance(src, list | tuple):  # a mixture: one report per source, data.train[i]
            entries = [(f"{key}[{i}]", item_path(it), item_path(given[i])) for i, it in enumerate(src)]
        else:
            entries = [(key, src, given)]
        for k, path, original in entries:
            reports[k] = length_report(k, path, source_meta(path), cfg)
            for line in length_messages(reports[k], raw=is_raw(original)):
                print(line, flush=True)
    return reports


def length_messages(report: dict[str, Any], raw: bool) -> list[str]:
    """Console lines for a ``length_report`` (none when nothing was cut, dropped or skipped).

    Args:
        report: from ``length_report``.
        raw: the source was converted by this run, so the advice names config keys; otherwise (a pre-converted
            prefix) it names the converter's flags.
    """
    key, lines = report["source"], []
    n, limit = report.get("samples", 0), report.get("max_length")
    truncated, dropped = report.get("truncated", 0), report.get("dropped_over_length", 0)
    keep_whole = "raise data.seq_len/data.max_length" if raw else "re-convert with a larger --max-length"
    if truncated:
        lost = report.get("truncated_tokens")
        line = f"{truncated:,} of {n:,} samples ({truncated / n:.1%}) truncated to {limit:,} tokens"
        line += f", {lost:,} tokens lost" if lost is not None else ""
        line += f"; {dropped:,} dropped (no assistant token left)" if dropped else ""
        if report.get("format") == "text":  # the loader would cut whole documents into rows without losing a token
            fix = f"{'raise data.max_length' if raw else 're-convert without --max-length'}: packed text is cut into "
            lines.append(f"{line}. To keep them, {fix}data.seq_len rows by the loader")
        else:
            drop = "set data.over_length=drop" if raw else "re-convert with --over-length drop"
            lines.append(f"{line}. {drop[0].upper()}{drop[1:]} to drop them, or {keep_whole}")
    elif dropped:
        why = f"truncation to {limit:,} tokens left no assistant token"
        if report.get("over_length") != "truncate":
            why = f"longer than {limit:,} tokens"
        lines.append(f"{dropped:,} of {n:,} samples ({dropped / n:.1%}) dropped: {why}. To keep them, {keep_whole}")
    if report.get("skipped"):
        reasons = ", ".join(f"{r}: {c:,}" for r, c in report["skipped_by_reason"].items())
        how = "data.on_error=skip" if raw else "--on-error skip"
        records = report["records"]
        lines.append(f"{report['skipped']:,} of {records:,} records skipped as unusable ({reasons}; {how})")
    cut = report.get("loader_truncated", 0)
    if cut:
        t, total = report["seq_len"], report["loader_samples"]
        lines.append(
            f"{cut:,} of {total:,} samples ({cut / total:.1%}) are longer than data.seq_len={t:,}: the loader "
            f"truncates them, {report['loader_truncated_tokens']:,} tokens lost. Raise data.seq_len"
            + (", or set data.max_length <= data.seq_len to let data.over_length decide" if raw else "")
        )
    return [f"[dsft] {key}: {line}" for line in lines]
