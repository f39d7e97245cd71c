"""Records (jsonl, json, parquet, arrow, csv, gz, ``datasets`` folders, hub ids) → Megatron ``MMIDIDX``
(``P.bin/.idx``, ``P_loss_mask.bin/.idx``, ``P.meta.json``) and/or WebDataset.

    python -m data_tools.convert --input data/train.jsonl --output-prefix data/train \\
        --tokenizer Qwen/Qwen2.5-0.5B-Instruct --format auto --workers 4
    python -m data_tools.convert --input tatsu-lab/alpaca --split train --output-prefix data/alpaca --tokenizer DIR

How it runs: the main process streams the inputs (:mod:`data_tools.sources`: jsonl lines as raw bytes, ``.json``
arrays through an incremental decoder, tables in Arrow batches through ``datasets``), cuts them into chunks and keeps
at most ``2 × workers + 2`` chunks in flight; worker processes parse and batch-encode a chunk each; the main process
writes results in input order under temporary names (:class:`data_tools.indexed.DatasetWriter`) and renames them into
place only when everything succeeded. Memory is bounded by the chunks in flight, not by the input size.

Text with a local tokenizer folder is encoded with ``tokenizers`` loaded straight from ``tokenizer.json``
(:mod:`data_tools.rust_tokenizer`): no transformers import before the first token, the workers fork at once, and a
thread checks the ids against ``AutoTokenizer`` meanwhile (once per tokenizer; a disagreement redoes the run with it).

Bad records (``--on-error fail``, the default) stop the run with ``file:row: what is wrong (format X)`` and a
non-zero exit, leaving no output under the final names; ``--on-error skip`` drops them and counts them by reason in
the meta. Samples over ``--max-length`` follow ``--over-length``: ``error`` (default; a bad record like the others),
``truncate`` (keep the first N tokens; counted as ``truncated``; an SFT sample left with no assistant token is
dropped and counted) or ``drop`` (dropped and counted even with ``--on-error fail``).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_tools import indexed
from data_tools.encoding import Encoded, Rejected, SampleEncoder
from data_tools.encoding import encode_raw_batch as _encode_raw_batch
from data_tools.formats import (
    FORMATS,
    SFT_FORMATS,
    BadRecord,
    FormatError,
    detect_format,
    record_to_text,
    required_keys,
)
from data_tools.formats import parse_json_line as _parse_json_line
from data_tools.indexed import LOSS_MASK_SUFFIX  # noqa: F401 - re-exported: callers import it from here
from data_tools.meta import META_VERSION, meta_path, read_meta, tokenizer_fingerprint, vocab_hash
from data_tools.sources import InputOptions, Source, SourceError, open_sources, parse_renames, rename_fields
from data_tools.sources import file_sha256 as file_sha256
from data_tools.templates import resolve_chat_template, template_meta

CHUNK_RECORDS = 1024  # records per work unit: large enough to amortise IPC and batch encoding, small for latency
CHUNK_BYTES = 4 << 20  # ...or this many input bytes, whichever comes first (bounds memory for long documents)
ARRAY_READ_BYTES = 1 << 20  # read size of the incremental .json array parser (data_tools.sources)
MAX_SKIP_EXAMPLES = 20  # "file:row: reason" examples kept in the meta
AUTO_DETECT_RECORDS = 1000  # --format auto with --on-error skip: records looked at before giving up
PROBE_RECORDS = 32  # input texts the tokenizer agreement check compares (with its fixed probes)


class ConversionError(RuntimeError):
    """A conversion stopped; the message starts with ``file:row:`` when a record is to blame."""


@dataclass
class ConversionResult:
    """What :func:`convert` produced.

    Attributes:
        output_prefix: the ``P`` of ``P.bin/.idx`` (None when only WebDataset output was asked for).
        webdataset_dir: folder of the shards and ``index.json`` (or None).
        meta: the content of ``P.meta.json``.
        seconds: wall time of the streaming pass (reading, encoding, writing; not the tokenizer load).
        stats: documents, tokens, input_bytes, docs_per_s, tokens_per_s, mb_per_s.
    """

    output_prefix: str | None
    webdataset_dir: str | None
    meta: dict[str, Any]
    seconds: float
    stats: dict[str, float] = field(default_factory=dict)


class _TokenizerDisagrees(Exception):
    """The fast tokenizer gave other ids than transformers' (found before anything was committed)."""

    def __init__(self, why: str, tokenizer):
        super().__init__(why)
        self.why, self.tokenizer = why, tokenizer


# ---------------------------------------------------------------------------------------------------------- workers
_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer, encoder_kwargs: dict[str, Any], renames: dict[str, str]) -> None:
    # One single-threaded tokenizer per process: N workers on N cores, no oversubscription by the Rust thread pool.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["encoder"] = SampleEncoder(tokenizer, **encoder_kwargs)
    _WORKER["renames"] = renames


def _encode_payloads(encoder: SampleEncoder, payloads: list, renames: dict[str, str]) -> list:
    """Parse and encode one chunk; raw jsonl lines get the ``--columns`` renames here, after parsing."""
    if not renames:
        return _encode_raw_batch(encoder, payloads)
    prepared: list = []
    for payload in payloads:
        if isinstance(payload, bytes):
            try:
                payload = rename_fields(_parse_json_line(payload), renames)
            except BadRecord as bad:
                payload = Rejected(bad.reason, bad.message)
        prepared.append(payload)
    keep = [n for n, p in enumerate(prepared) if not isinstance(p, Rejected)]
    results = list(prepared)
    for n, result in zip(keep, _encode_raw_batch(encoder, [prepared[n] for n in keep]), strict=True):
        results[n] = result
    return results


def _encode_in_worker(payloads: list) -> list:
    return _encode_payloads(_WORKER["encoder"], payloads, _WORKER["renames"])


# ---------------------------------------------------------------------------------------------------------- reading
def _chunks(sources: list[Source]) -> Iterator[tuple[list[tuple[int, int]], list]]:
    """Group ``(source index, row)`` locations and payloads into work units."""
    where: list[tuple[int, int]] = []
    payloads: list = []
    size = 0
    for s_idx, source in enumerate(sources):
        for row, payload in source:
            where.append((s_idx, row))
            payloads.append(payload)
            size += len(payload) if isinstance(payload, bytes) else 256
            if len(payloads) >= CHUNK_RECORDS or size >= CHUNK_BYTES:
                yield where, payloads
                where, payloads, size = [], [], 0
    if payloads:
        yield where, payloads


def _parsed_records(sources: list[Source]) -> Iterator[tuple[str, int, Any]]:
    """``(label, row, record)`` of the records that parse, renamed, from fresh readers (the real pass hashes)."""
    for source in sources:
        for row, payload in source.fresh():
            if not isinstance(payload, bytes):
                yield source.label, row, payload
                continue
            try:
                yield source.label, row, rename_fields(_parse_json_line(payload), source.renames)
            except BadRecord:
                continue  # left to the real pass, which reports or skips it like any bad line


def _detect(sources: list[Source], text_key: str, on_error: str) -> str:
    """``--format auto``: the format of the first record that parses.

    With ``--on-error skip``, records whose keys fit no format are passed over (up to ``AUTO_DETECT_RECORDS``);
    they are skipped and counted by the real pass.
    """
    first_error = None
    for n, (label, row, record) in enumerate(_parsed_records(sources)):
        try:
            return detect_format(record, text_key)
        except FormatError as exc:
            first_error = first_error or ConversionError(f"{label}:{row}: {exc}")
            if on_error == "fail" or n + 1 >= AUTO_DETECT_RECORDS:
                raise first_error from exc
    if first_error is not None:
        raise first_error
    raise ConversionError(f"{', '.join(s.label for s in sources)}: no records; nothing to convert")


def _open(paths: list, split: str | None, subset: str | None, columns: str | dict[str, str] | None) -> list[Source]:
    renames = parse_renames(columns) if isinstance(columns, str | type(None)) else dict(columns)
    sources = open_sources(paths, InputOptions(split=split, subset=subset))
    for s in sources:
        s.renames = renames
        s.read_bytes = ARRAY_READ_BYTES
    return sources


def detect_input_format(
    inputs: list[str | os.PathLike],
    text_key: str = "text",
    on_error: str = "fail",
    split: str | None = None,
    subset: str | None = None,
    columns: str | dict[str, str] | None = None,
) -> str:
    """What ``--format auto`` would detect for these inputs (the first record that parses; see :func:`_detect`).

    Raises:
        ConversionError: a missing input, or no record of a known format (``file:row:`` of the first bad one).
    """
    try:
        return _detect(_open(list(inputs), split, subset, columns), text_key, on_error)
    except SourceError as exc:
        raise ConversionError(str(exc)) from exc


def _load_tokenizer(tokenizer):
    if not isinstance(tokenizer, str | os.PathLike):
        return tokenizer
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tokenizer))
    except Exception as exc:  # noqa: BLE001 - re-raised with the flag to fix
        raise ConversionError(f"--tokenizer {tokenizer}: cannot load it ({type(exc).__name__}: {exc})") from exc


def _results(
    chunks: Iterator, encoder_kwargs: dict, tokenizer, workers: int, renames: dict, on_started: Callable[[], None]
) -> Iterator[tuple[list, list]]:
    """Encoded chunks in input order; with workers > 1 a bounded number of chunks is in flight.

    ``on_started`` runs once the workers exist (right away with one worker): threads may start only after the fork.
    """
    if workers <= 1:
        # One worker is one core, as N workers are N: without this the Rust batch encoder would spread over every
        # core of a machine the user asked to leave alone (tokenizers reads the variable at each batch call).
        before = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            encoder = SampleEncoder(tokenizer, **encoder_kwargs)
            on_started()
            for where, payloads in chunks:
                yield where, _encode_payloads(encoder, payloads, renames)
        finally:
            if before is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = before
        return
    # fork: workers inherit the loaded tokenizer instead of unpickling or reloading it (spawn costs seconds each).
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer, encoder_kwargs, renames))
    try:
        on_started()
        pending: deque = deque()
        max_in_flight = 2 * workers + 2  # Pool.imap would read the whole input ahead: memory must stay bounded
        for where, payloads in chunks:
            pending.append((where, pool.apply_async(_encode_in_worker, (payloads,))))
            if len(pending) >= max_in_flight:
                where0, job = pending.popleft()
                yield where0, job.get()
        while pending:
            where0, job = pending.popleft()
            yield where0, job.get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _probe_texts(sources: list[Source], text_key: str) -> list[str]:
    """The first texts of the input, for the tokenizer agreement check."""
    texts: list[str] = []
    for _, _, record in _parsed_records(sources):
        try:
            texts.append(record_to_text(record, text_key))
        except BadRecord:
            continue
        if len(texts) >= PROBE_RECORDS:
            break
    return texts


def _fast_text_tokenizer(tokenizer, fmt: str, sources: list[Source], text_key: str):
    """``(RustTokenizer, AgreementCheck)`` for text with a local tokenizer folder, else ``(None, None)``."""
    from data_tools.rust_tokenizer import AgreementCheck, RustTokenizer, tokenizer_folder

    folder = tokenizer_folder(tokenizer)
    if fmt != "text" or folder is None or os.environ.get("DSFT_CONVERT_TOKENIZER") == "transformers":
        return None, None
    try:
        rust = RustTokenizer(folder)
    except Exception as exc:  # noqa: BLE001 - the transformers loader reports a broken folder with the flag to fix
        print(f"note: {folder}/tokenizer.json: {exc}; loading it with transformers", file=sys.stderr, flush=True)
        return None, None
    check = AgreementCheck(rust)
    if check.cached and not check.result()["agrees"]:
        return None, None  # known to differ: transformers it is, from the start
    check.probe = _probe_texts(sources, text_key) if not check.cached else []
    return rust, check


# ---------------------------------------------------------------------------------------------------------- convert
def convert(
    inputs: list[str | os.PathLike] | str | os.PathLike,
    output_prefix: str | os.PathLike | None,
    tokenizer,
    fmt: str = "auto",
    text_key: str = "text",
    append_eod: bool = False,
    max_length: int | None = None,
    over_length: str = "error",
    workers: int = 1,
    on_error: str = "fail",
    webdataset_dir: str | os.PathLike | None = None,
    shard_size: int = 10_000,
    progress: bool = True,
    mask_method: str = "auto",
    chat_template: str | os.PathLike | None = None,
    split: str | None = None,
    subset: str | None = None,
    columns: str | dict[str, str] | None = None,
) -> ConversionResult:
    """Convert records into ``output_prefix`` (Megatron MMIDIDX) and/or WebDataset shards.

    Args:
        inputs: one input or a list, taken in this order: files (``.jsonl``, ``.json``, ``.jsonl.gz``, ``.json.gz``,
            ``.parquet``, ``.arrow``, ``.csv``), ``save_to_disk`` folders, folders of shards, hub dataset ids
            (see :mod:`data_tools.sources`).
        output_prefix: ``P`` for ``P.bin/.idx`` (+ ``P_loss_mask.*`` for SFT) and ``P.meta.json``; None to write
            only WebDataset shards.
        tokenizer: a loaded Hugging Face tokenizer, or a path / hub id for ``AutoTokenizer.from_pretrained``.
        fmt: ``auto`` (detected from the first record) or one of :data:`data_tools.formats.FORMATS`.
        text_key: key of the text for ``text``.
        append_eod: append the end-of-document token to each ``text`` document.
        max_length: longest sample in tokens (None: no limit).
        over_length: ``error``, ``truncate`` or ``drop`` for samples over ``max_length``.
        workers: tokenizer processes (1: in this process).
        on_error: ``fail`` (stop at the first bad record) or ``skip`` (drop and count it).
        webdataset_dir: also (or only) write WebDataset shards + ``index.json`` here.
        shard_size: samples per WebDataset shard.
        progress: show a tqdm bar with docs/s and tokens/s.
        mask_method: ``auto``, ``generation`` or ``prefix`` (see :mod:`data_tools.encoding`).
        chat_template: a Jinja file to render SFT records with instead of the tokenizer's template (see
            :mod:`data_tools.templates`).
        split: the split of a hub dataset (default ``train``) or of a ``save_to_disk`` DatasetDict.
        subset: the subset (config name) of a hub dataset.
        columns: ``"new=old,..."`` or ``{new: old}``: fields renamed before format detection.

    Returns:
        A :class:`ConversionResult` with the meta and throughput.

    Raises:
        ConversionError: a bad record with ``on_error="fail"``, a malformed JSON array, unreadable input, or a
            tokenizer that cannot be loaded. Nothing is left under the final output names.
    """
    paths = [inputs] if isinstance(inputs, str | os.PathLike) else list(inputs)
    if not paths:
        raise ConversionError("--input: give at least one input")
    if output_prefix is None and webdataset_dir is None:
        raise ConversionError("give --output-prefix and/or --webdataset")
    if on_error not in ("fail", "skip"):
        raise ConversionError(f"--on-error {on_error!r}: expected fail or skip")
    if fmt != "auto" and fmt not in FORMATS:
        raise ConversionError(f"--format {fmt!r}: expected auto or one of {FORMATS}")
    try:
        sources = _open(paths, split, subset, columns)
        if fmt == "auto":
            fmt = _detect(sources, text_key, on_error)
        for s in sources:
            s.format, s.required = fmt, required_keys(fmt, text_key)
        options = dict(
            fmt=fmt,
            text_key=text_key,
            append_eod=append_eod,
            max_length=max_length,
            over_length=over_length,
            workers=workers,
            on_error=on_error,
            webdataset_dir=webdataset_dir,
            shard_size=shard_size,
            progress=progress,
            mask_method=mask_method,
            chat_template=chat_template,
        )
        fast, check = _fast_text_tokenizer(tokenizer, fmt, sources, text_key)
        if fast is not None:
            try:
                return _convert(sources, output_prefix, fast, check=check, **options)
            except _TokenizerDisagrees as exc:
                print(
                    f"note: {exc.why} for {tokenizer}; converting again with the transformers tokenizer",
                    file=sys.stderr,
                    flush=True,
                )
                tokenizer = exc.tokenizer
                sources = [s.fresh() for s in sources]
        return _convert(sources, output_prefix, _load_tokenizer(tokenizer), check=None, **options)
    except SourceError as exc:
        raise ConversionError(str(exc)) from exc


def _convert(
    sources: list[Source],
    output_prefix: str | os.PathLike | None,
    tok,
    check,
    fmt: str,
    text_key: str,
    append_eod: bool,
    max_length: int | None,
    over_length: str,
    workers: int,
    on_error: str,
    webdataset_dir: str | os.PathLike | None,
    shard_size: int,
    progress: bool,
    mask_method: str,
    chat_template: str | os.PathLike | None,
) -> ConversionResult:
    """One pass of :func:`convert` with a loaded tokenizer; ``check`` (an ``AgreementCheck`` of a fast tokenizer)
    must agree before anything is committed."""
    has_mask = fmt in SFT_FORMATS
    dtype = indexed.token_dtype_for_vocab(len(tok))
    encoder_kwargs = dict(
        fmt=fmt,
        dtype=dtype,
        text_key=text_key,
        append_eod=append_eod,
        max_length=max_length,
        over_length=over_length,
        mask_method=mask_method,
        chat_template=None if chat_template is None else str(chat_template),
    )
    try:
        probe = SampleEncoder(tok, **encoder_kwargs)  # validates the options once, before any process starts
    except FormatError as exc:
        raise ConversionError(str(exc)) from exc
    if probe.template is not None and probe.template.warning:
        print(f"warning: {probe.template.warning}", file=sys.stderr, flush=True)
    renames = sources[0].renames if sources else {}

    writer: indexed.DatasetWriter | None = None
    wds_writer = None
    # Folders this run creates are removed again on failure: nothing is left behind, not even an empty folder.
    made_dir = None
    bar = None
    if output_prefix is not None and not Path(output_prefix).parent.exists():
        made_dir = Path(output_prefix).parent
    try:
        if output_prefix is not None:
            writer = indexed.DatasetWriter(output_prefix, dtype, with_loss_mask=has_mask)
        if webdataset_dir is not None:
            from data_tools.webdataset_writer import WebDatasetWriter

            wds_writer = WebDatasetWriter(webdataset_dir, shard_size=shard_size, has_loss_mask=has_mask)

        counts = Counter()
        skipped = Counter()
        turn_ends: Counter = Counter()
        ignored: Counter = Counter()
        examples: list[str] = []
        bar = _progress_bar(progress)
        start = time.perf_counter()  # throughput counts the streaming pass, not the tokenizer load

        def started() -> None:
            if check is not None:
                check.start(check.probe)

        for where, results in _results(_chunks(sources), encoder_kwargs, tok, workers, renames, started):
            chunk_ids: list = []
            chunk_masks: list | None = [] if has_mask else None
            for (s_idx, row), result in zip(where, results, strict=True):
                if not isinstance(result, Encoded):
                    location = f"{sources[s_idx].label}:{row}"
                    # Over-length samples under truncate/drop were accepted by the user: dropped and counted, not fatal.
                    # (Under truncate only a sample whose assistant tokens were all cut off comes back rejected.)
                    if on_error == "fail" and not (result.reason == "over_length" and over_length != "error"):
                        raise ConversionError(
                            f"{location}: {result.message} (format {fmt}); use --on-error skip to drop bad lines"
                        )
                    skipped[result.reason] += 1
                    if len(examples) < MAX_SKIP_EXAMPLES:
                        examples.append(f"{location}: {result.message}")
                    continue
                chunk_ids.append(result.ids)
                if has_mask:
                    chunk_masks.append(result.mask)
                    counts["masked_tokens"] += int(result.mask.sum(dtype=np.int64))
                if wds_writer is not None:
                    wds_writer.write(result.ids, result.mask)
                counts["documents"] += 1
                counts["tokens"] += len(result.ids)
                if result.truncated:
                    counts["truncated"] += 1
                    counts["truncated_tokens"] += result.lost
                if result.turn_ends:
                    turn_ends.update(result.turn_ends)
                if result.ignored:
                    ignored.update(result.ignored)
            if writer is not None:
                writer.add_many(chunk_ids, chunk_masks)  # one write per chunk
            if bar is not None:
                bar.update(len(where))
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"{counts['tokens'] / elapsed:,.0f} tokens/s", refresh=False)
        if bar is not None:
            bar.close()
            bar = None
        if counts["documents"] == 0:
            raise ConversionError(
                f"{', '.join(s.label for s in sources)}: no usable records (skipped: {dict(skipped) or 'none'}); "
                "nothing written"
            )
        if check is not None:
            verdict = check.result()
            if not verdict["agrees"]:
                raise _TokenizerDisagrees(verdict["why"], check.hf_tokenizer)

        seconds = time.perf_counter() - start
        if ignored:
            shown = ", ".join(f"{k} ({n} records)" for k, n in sorted(ignored.items()))
            print(f"note: fields the {fmt} format does not read were ignored: {shown}", file=sys.stderr, flush=True)
        meta = {
            "dsft_meta_version": META_VERSION,
            "format": fmt,
            "tokenizer": tokenizer_fingerprint(tok),
            "vocab_size": len(tok),
            "dtype": np.dtype(dtype).name,
            "has_loss_mask": has_mask,
            "text_key": text_key if fmt == "text" else None,
            "append_eod": bool(append_eod and fmt == "text"),
            "eod_token_id": probe.eod,
            "chat_template": template_meta(probe.template) if probe.template is not None else None,
            "mask_method": probe.mask_method,
            "turn_end_tokens": [
                {"id": i, "token": tok.convert_ids_to_tokens(i), "count": n} for i, n in turn_ends.most_common()
            ],
            "ignored_fields": dict(sorted(ignored.items())),
            "max_length": max_length,
            "over_length": over_length,
            "on_error": on_error,
            "columns": dict(renames) or None,
            "counts": {
                "documents": counts["documents"],
                "tokens": counts["tokens"],
                "masked_tokens": counts["masked_tokens"] if has_mask else None,
                "truncated": counts["truncated"],
                "truncated_tokens": counts["truncated_tokens"],
                "skipped": sum(skipped.values()),
                "blank_lines": sum(s.blank_lines for s in sources),
            },
            "skipped": {"by_reason": dict(sorted(skipped.items())), "examples": examples},
            "sources": [_source_meta(s) for s in sources],
        }
        if wds_writer is not None:
            wds_writer.close(meta)
            wds_writer = None
        if writer is not None:
            writer.commit(meta)
            writer = None
    except BaseException:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.abort()
        if wds_writer is not None:
            wds_writer.abort()
        if made_dir is not None and made_dir.is_dir() and not any(made_dir.iterdir()):
            made_dir.rmdir()
        raise
    input_bytes = sum(s.bytes for s in sources)
    stats = {
        "documents": counts["documents"],
        "tokens": counts["tokens"],
        "input_bytes": input_bytes,
        "docs_per_s": counts["documents"] / seconds,
        "tokens_per_s": counts["tokens"] / seconds,
        "mb_per_s": input_bytes / 1e6 / seconds,
    }
    return ConversionResult(
        output_prefix=str(output_prefix) if output_prefix is not None else None,
        webdataset_dir=str(webdataset_dir) if webdataset_dir is not None else None,
        meta=meta,
        seconds=seconds,
        stats=stats,
    )


def _source_meta(source: Source) -> dict[str, Any]:
    """One ``meta["sources"]`` entry: what was read and what identifies it (``is_conversion_current`` compares
    ``fingerprint``; ``sha256`` stays for files, as metas before ``datasets`` inputs had it)."""
    entry: dict[str, Any] = {
        "path": source.path if source.kind == "hub" else os.path.abspath(source.path),
        "kind": source.kind,
        "fingerprint": source.fingerprint,
        "bytes": source.bytes,
        "records": source.records,
    }
    if source.kind in ("json", "json.gz", "parquet", "arrow", "csv"):
        entry["sha256"] = source.fingerprint
    if source.kind in ("hub", "save_to_disk"):
        entry.update(split=source.split, subset=source.subset)
    return entry


def is_conversion_current(
    output_prefix: str | os.PathLike,
    inputs: list[str | os.PathLike] | str | os.PathLike,
    tokenizer,
    split: str | None = None,
    subset: str | None = None,
    **options: Any,
) -> bool:
    """True when ``output_prefix`` already holds a finished conversion of exactly these inputs with this tokenizer.

    For callers that convert on the fly into a cache (the engine): the inputs' sha256, the tokenizer's vocab hash and
    the options that change the ids must all match the meta, so an edited file or another tokenizer re-converts.

    Args:
        output_prefix: the cache prefix.
        inputs: the raw inputs, in order (files, folders, hub ids).
        tokenizer: the tokenizer (object or path / id).
        split: ``--split`` of a hub dataset / DatasetDict folder.
        subset: ``--subset`` of a hub dataset.
        **options: the :func:`convert` keyword options to compare (``fmt``, ``text_key``, ``append_eod``,
            ``max_length``, ``over_length``, ``on_error``, ``chat_template``); ``fmt="auto"`` matches any detected
            format. For SFT data the template that would be used now (``chat_template``, else the tokenizer's, else
            the default) must be the one recorded: a tokenizer whose template changed re-converts.
    """
    keys = {"fmt": "format", "text_key": "text_key", "append_eod": "append_eod", "max_length": "max_length"}
    keys.update(over_length="over_length", on_error="on_error", chat_template="chat_template", columns="columns")
    unknown = sorted(set(options) - set(keys))
    if unknown:
        raise TypeError(f"is_conversion_current: unknown option(s) {unknown}; expected some of {sorted(keys)}")
    if not indexed.is_complete(output_prefix):
        return False
    meta = read_meta(output_prefix)
    paths = [inputs] if isinstance(inputs, str | os.PathLike) else list(inputs)
    recorded = [s.get("fingerprint", s.get("sha256")) for s in meta.get("sources", [])]
    try:
        sources = open_sources(paths, InputOptions(split=split, subset=subset))
        if recorded != [s.fingerprint for s in sources]:
            return False
    except SourceError:
        return False  # the input is gone or unreadable now: convert() will say why
    tok = _load_tokenizer(tokenizer)
    if meta.get("tokenizer", {}).get("vocab_hash") != vocab_hash(tok):
        return False
    if meta.get("has_loss_mask"):
        recorded_template = meta.get("chat_template")
        if not isinstance(recorded_template, dict):  # converted before templates were recorded
            return False
        try:
            now = resolve_chat_template(tok, options.get("chat_template"))
        except FormatError:
            return False
        if recorded_template.get("sha256") != now.sha256:
            return False
    for option, value in options.items():
        if option == "chat_template" or (option == "fmt" and value == "auto"):
            continue
        if option == "columns":
            value = (parse_renames(value) if isinstance(value, str) else dict(value)) if value else None
        if option == "text_key" and meta.get("format") != "text":
            continue
        if meta.get(keys[option]) != value:
            return False
    return True


def _progress_bar(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(unit=" docs", unit_scale=True, desc="convert", file=sys.stderr, mininterval=0.5)


# ---------------------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    """The ``dsft-convert`` / ``python -m data_tools.convert`` argument parser."""
    p = argparse.ArgumentParser(
        prog="dsft convert",
        description="Convert records (jsonl, json, parquet, arrow, csv, .gz, datasets folders, hub ids) into "
        "Megatron-compatible .bin/.idx (+ loss mask) or WebDataset shards.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  dsft convert --input launch/demo_data/train.jsonl --output-prefix data/train "
        "--tokenizer MODEL_DIR --format messages\n  (then data.train=data/train in the training config)\n"
        "  dsft convert --input data/qa.parquet --columns prompt=question,completion=answer "
        "--output-prefix data/qa --tokenizer MODEL_DIR\n"
        "  HF_HUB_OFFLINE=1 dsft convert --input tatsu-lab/alpaca --split train --output-prefix data/alpaca "
        "--tokenizer MODEL_DIR",
    )
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="in order: .jsonl/.json[.gz], .parquet, .arrow, .csv files, save_to_disk folders, folders of shards, "
        "or hub dataset ids (namespace/name, read from the local cache when offline)",
    )
    p.add_argument("--split", metavar="NAME", help="split of a hub dataset (default train) or a DatasetDict folder")
    p.add_argument("--subset", metavar="NAME", help="subset (config name) of a hub dataset")
    p.add_argument(
        "--columns",
        metavar="NEW=OLD,...",
        help="rename fields before format detection, e.g. prompt=question,completion=answer",
    )
    p.add_argument("--output-prefix", metavar="P", help="writes P.bin/.idx, P_loss_mask.bin/.idx (SFT), P.meta.json")
    p.add_argument("--tokenizer", required=True, metavar="PATH_OR_ID", help="AutoTokenizer.from_pretrained argument")
    p.add_argument("--format", default="auto", choices=("auto", *FORMATS), help="record format (auto: from the keys)")
    p.add_argument("--text-key", default="text", help="key of the text for --format text (default: text)")
    p.add_argument(
        "--chat-template",
        metavar="FILE",
        help="Jinja chat template for SFT formats, instead of the tokenizer's (or the default for tokenizers without one)",
    )
    p.add_argument("--append-eod", action="store_true", help="append <|endoftext|> (else eos) to each text document")
    p.add_argument("--max-length", type=int, default=None, metavar="N", help="longest sample in tokens")
    p.add_argument(
        "--over-length",
        default="error",
        choices=("error", "truncate", "drop"),
        help="samples over --max-length: error (default; a bad record, see --on-error), truncate to N tokens, "
        "or drop (counted in the meta)",
    )
    p.add_argument("--workers", type=int, default=1, metavar="N", help="tokenizer processes (one per core)")
    p.add_argument(
        "--on-error",
        default="fail",
        choices=("fail", "skip"),
        help="fail: stop at the first bad record (default); skip: drop bad records and count them in the meta",
    )
    p.add_argument("--webdataset", metavar="DIR", help="also write WebDataset tar shards + index.json into DIR")
    p.add_argument("--shard-size", type=int, default=10_000, metavar="N", help="samples per WebDataset shard")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 conversion error, 2 usage error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.output_prefix is None and args.webdataset is None:
        parser.error("give --output-prefix and/or --webdataset")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    try:
        result = convert(
            args.input,
            args.output_prefix,
            args.tokenizer,
            fmt=args.format,
            text_key=args.text_key,
            append_eod=args.append_eod,
            max_length=args.max_length,
            over_length=args.over_length,
            workers=args.workers,
            on_error=args.on_error,
            webdataset_dir=args.webdataset,
            shard_size=args.shard_size,
            progress=not args.no_progress,
            chat_template=args.chat_template,
            split=args.split,
            subset=args.subset,
            columns=args.columns,
        )
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    c, s = result.meta["counts"], result.stats
    outputs = [str(meta_path(result.output_prefix))] if result.output_prefix else []
    if result.webdataset_dir:
        outputs.append(str(Path(result.webdataset_dir) / "index.json"))
    print(
        f"{c['documents']} documents, {c['tokens']} tokens"
        + (f", {c['masked_tokens']} trained (loss mask 1)" if c["masked_tokens"] is not None else "")
        + (
            f", {c['truncated']} truncated ({c['truncated'] / max(c['documents'], 1):.1%}, "
            f"{c['truncated_tokens']} tokens lost)"
            if c["truncated"]
            else ", 0 truncated"
        )
        + f", {c['skipped']} skipped"
        + (f" {result.meta['skipped']['by_reason']}" if c["skipped"] else "")
        + f" in {result.seconds:.1f}s ({s['docs_per_s']:,.0f} docs/s, {s['tokens_per_s']:,.0f} tokens/s, "
        f"{s['mb_per_s']:.1f} MB/s) -> {', '.join(outputs)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
