"""jsonl / json → Megatron ``MMIDIDX`` (``P.bin/.idx``, ``P_loss_mask.bin/.idx``, ``P.meta.json``) and/or WebDataset.

    python -m data_tools.convert --input data/train.jsonl --output-prefix data/train \\
        --tokenizer Qwen/Qwen2.5-0.5B-Instruct --format auto --workers 4

How it runs: the main process streams the inputs (jsonl lines as raw bytes; ``.json`` arrays through an incremental
decoder), cuts them into chunks and keeps at most ``2 × workers + 2`` chunks in flight; worker processes parse and
batch-encode a chunk each; the main process writes results in input order under temporary names and renames them into
place only when everything succeeded. Memory is bounded by the chunks in flight, not by the input size.

Bad records (``--on-error fail``, the default) stop the run with ``file:line: what is wrong (format X)`` and a
non-zero exit, leaving no output under the final names; ``--on-error skip`` drops them and counts them by reason in
the meta. Samples over ``--max-length`` follow ``--over-length``: ``error`` (default; a bad record like the others),
``truncate`` (keep the first N tokens; counted as ``truncated``; an SFT sample left with no assistant token is
dropped and counted) or ``drop`` (dropped and counted even with ``--on-error fail``).
"""

from __future__ import annotations

import argparse
import codecs
import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_tools import indexed
from data_tools.encoding import Encoded, SampleEncoder
from data_tools.encoding import encode_raw_batch as _encode_raw_batch
from data_tools.formats import FORMATS, SFT_FORMATS, BadRecord, FormatError, detect_format
from data_tools.formats import parse_json_line as _parse_json_line
from data_tools.meta import META_VERSION, meta_path, read_meta, tokenizer_fingerprint, vocab_hash, write_meta
from data_tools.templates import resolve_chat_template, template_meta

LOSS_MASK_SUFFIX = "_loss_mask"
CHUNK_RECORDS = 1024  # records per work unit: large enough to amortise IPC and batch encoding, small for latency
CHUNK_BYTES = 4 << 20  # ...or this many input bytes, whichever comes first (bounds memory for long documents)
ARRAY_READ_BYTES = 1 << 20  # read size of the incremental .json array parser
MAX_SKIP_EXAMPLES = 20
AUTO_DETECT_RECORDS = 1000  # --format auto with --on-error skip: records looked at before giving up  # "file:line: reason" examples kept in the meta


class ConversionError(RuntimeError):
    """A conversion stopped; the message starts with ``file:line:`` when a record is to blame."""


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


# ---------------------------------------------------------------------------------------------------------- reading
class _Source:
    """One input file: yields ``(line_no, payload)``; payload is raw line bytes (jsonl) or a parsed object (array)."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.sha256 = hashlib.sha256()
        self.bytes = 0
        self.blank_lines = 0
        self.records = 0

    def _is_json_array(self) -> bool:
        with open(self.path, "rb") as fh:
            head = fh.read(4096)
        head = head.removeprefix(codecs.BOM_UTF8).lstrip()
        return head.startswith(b"[")

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        if not os.path.isfile(self.path):
            raise ConversionError(f"{self.path}: input file not found")
        yield from (self._iter_array() if self._is_json_array() else self._iter_lines())

    def _iter_lines(self) -> Iterator[tuple[int, bytes]]:
        with open(self.path, "rb") as fh:
            for line_no, raw in enumerate(fh, start=1):
                self.sha256.update(raw)
                self.bytes += len(raw)
                if line_no == 1:
                    raw = raw.removeprefix(codecs.BOM_UTF8)
                line = raw.rstrip(b"\r\n")
                if not line.strip():
                    self.blank_lines += 1
                    continue
                self.records += 1
                yield line_no, line

    def _iter_array(self) -> Iterator[tuple[int, Any]]:
        """Stream the elements of a top-level JSON array without loading the file (raw_decode on a rolling buffer)."""
        decoder = json.JSONDecoder()
        text_decoder = codecs.getincrementaldecoder("utf-8-sig")()
        buf, pos, line, eof = "", 0, 1, False
        with open(self.path, "rb") as fh:

            def fill() -> bool:
                nonlocal buf, pos, eof
                chunk = fh.read(ARRAY_READ_BYTES)
                self.sha256.update(chunk)
                self.bytes += len(chunk)
                try:
                    text = text_decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as exc:
                    raise ConversionError(f"{self.path}:{line}: not valid UTF-8 ({exc.reason})") from exc
                buf = buf[pos:] + text
                pos = 0
                eof = not chunk
                return bool(chunk)

            def skip_ws() -> bool:
                """Advance past whitespace; False at the end of the file."""
                nonlocal pos, line
                while True:
                    while pos < len(buf) and buf[pos] in " \t\r\n":
                        line += buf[pos] == "\n"
                        pos += 1
                    if pos < len(buf):
                        return True
                    if not fill():
                        return False

            def fail(what: str) -> ConversionError:
                # A broken array cannot be resynchronised, so this stops the run even with --on-error skip.
                return ConversionError(f"{self.path}:{line}: {what} (a malformed JSON array stops the conversion)")

            fill()
            if not skip_ws() or buf[pos] != "[":
                raise fail("expected '[' to open a JSON array")
            pos += 1
            first = True
            while True:
                if not skip_ws():
                    raise fail("unexpected end of file inside the array")
                if buf[pos] == "]":
                    pos += 1
                    if skip_ws():
                        raise fail("unexpected data after the closing ']'")
                    return
                if not first:
                    if buf[pos] != ",":
                        raise fail(f"expected ',' or ']' but found {buf[pos]!r}")
                    pos += 1
                    if not skip_ws():
                        raise fail("unexpected end of file inside the array")
                while True:
                    try:
                        obj, end = decoder.raw_decode(buf, pos)
                        # An element ending exactly at the buffer end may be cut (a number): read more and retry.
                        if end < len(buf) or eof:
                            break
                        if not fill():
                            break
                    except json.JSONDecodeError as exc:
                        if eof or not fill():
                            raise fail(f"malformed JSON ({exc.msg})") from exc
                start_line = line
                line += buf.count("\n", pos, end)
                pos = end
                first = False
                self.records += 1
                yield start_line, obj


# ---------------------------------------------------------------------------------------------------------- workers
_WORKER: dict[str, SampleEncoder] = {}


def _init_worker(tokenizer, encoder_kwargs: dict[str, Any]) -> None:
    # One single-threaded tokenizer per process: N workers on N cores, no oversubscription by the Rust thread pool.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["encoder"] = SampleEncoder(tokenizer, **encoder_kwargs)


def _encode_in_worker(payloads: list) -> list:
    return _encode_raw_batch(_WORKER["encoder"], payloads)


def _chunks(sources: list[_Source]) -> Iterator[tuple[list[tuple[int, int]], list]]:
    """Group ``(source index, line)`` locations and payloads into work units."""
    where: list[tuple[int, int]] = []
    payloads: list = []
    size = 0
    for s_idx, source in enumerate(sources):
        for line_no, payload in source:
            where.append((s_idx, line_no))
            payloads.append(payload)
            size += len(payload) if isinstance(payload, bytes) else 256
            if len(payloads) >= CHUNK_RECORDS or size >= CHUNK_BYTES:
                yield where, payloads
                where, payloads, size = [], [], 0
    if payloads:
        yield where, payloads


def _parsed_records(sources: list[_Source]) -> Iterator[tuple[str, int, Any]]:
    """``(path, line, record)`` of the records that parse, from separate readers (the real pass hashes the files)."""
    for source in sources:
        for line_no, payload in _Source(source.path):
            if not isinstance(payload, bytes):
                yield source.path, line_no, payload
                continue
            try:
                yield source.path, line_no, _parse_json_line(payload)
            except BadRecord:
                continue  # left to the real pass, which reports or skips it like any bad line


def _detect(sources: list[_Source], text_key: str, on_error: str) -> str:
    """``--format auto``: the format of the first record that parses.

    With ``--on-error skip``, records whose keys fit no format are passed over (up to ``AUTO_DETECT_RECORDS``);
    they are skipped and counted by the real pass.
    """
    first_error = None
    for n, (path, line_no, record) in enumerate(_parsed_records(sources)):
        try:
            return detect_format(record, text_key)
        except FormatError as exc:
            first_error = first_error or ConversionError(f"{path}:{line_no}: {exc}")
            if on_error == "fail" or n + 1 >= AUTO_DETECT_RECORDS:
                raise first_error from exc
    if first_error is not None:
        raise first_error
    raise ConversionError(f"{', '.join(s.path for s in sources)}: no records; nothing to convert")


def detect_input_format(inputs: list[str | os.PathLike], text_key: str = "text", on_error: str = "fail") -> str:
    """What ``--format auto`` would detect for these files (the first record that parses; see :func:`_detect`).

    Raises:
        ConversionError: a missing file, or no record of a known format (``file:line:`` of the first bad one).
    """
    for p in inputs:
        if not os.path.isfile(p):
            raise ConversionError(f"{p}: input file not found")
    return _detect([_Source(p) for p in inputs], text_key, on_error)


def _load_tokenizer(tokenizer):
    if not isinstance(tokenizer, str | os.PathLike):
        return tokenizer
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tokenizer))
    except Exception as exc:  # noqa: BLE001 - re-raised with the flag to fix
        raise ConversionError(f"--tokenizer {tokenizer}: cannot load it ({type(exc).__name__}: {exc})") from exc


def _results(chunks: Iterator, encoder_kwargs: dict, tokenizer, workers: int) -> Iterator[tuple[list, list]]:
    """Encoded chunks in input order; with workers > 1 a bounded number of chunks is in flight."""
    if workers <= 1:
        encoder = SampleEncoder(tokenizer, **encoder_kwargs)
        for where, payloads in chunks:
            yield where, _encode_raw_batch(encoder, payloads)
        return
    # fork: workers inherit the loaded tokenizer instead of unpickling or reloading it (spawn costs seconds each).
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer, encoder_kwargs))
    try:
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
) -> ConversionResult:
    """Convert jsonl/json files into ``output_prefix`` (Megatron MMIDIDX) and/or WebDataset shards.

    Args:
        inputs: one path or a list; records are taken in this order.
        output_prefix: ``P`` for ``P.bin/.idx`` (+ ``P_loss_mask.*`` for SFT) and ``P.meta.json``; None to write
            only WebDataset shards.
        tokenizer: a loaded Hugging Face tokenizer, or a path / hub id for ``AutoTokenizer.from_pretrained``.
        fmt: ``auto`` (detected from the first record) or one of ``text``, ``alpaca``, ``sharegpt``, ``messages``.
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

    Returns:
        A :class:`ConversionResult` with the meta and throughput.

    Raises:
        ConversionError: a bad record with ``on_error="fail"``, a malformed JSON array, unreadable input, or a
            tokenizer that cannot be loaded. Nothing is left under the final output names.
    """
    paths = [inputs] if isinstance(inputs, str | os.PathLike) else list(inputs)
    if not paths:
        raise ConversionError("--input: give at least one file")
    if output_prefix is None and webdataset_dir is None:
        raise ConversionError("give --output-prefix and/or --webdataset")
    if on_error not in ("fail", "skip"):
        raise ConversionError(f"--on-error {on_error!r}: expected fail or skip")
    if fmt != "auto" and fmt not in FORMATS:
        raise ConversionError(f"--format {fmt!r}: expected auto or one of {FORMATS}")
    for p in paths:
        if not os.path.isfile(p):
            raise ConversionError(f"{p}: input file not found")

    tok = _load_tokenizer(tokenizer)
    sources = [_Source(p) for p in paths]
    if fmt == "auto":
        fmt = _detect(sources, text_key, on_error)
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

    tag = f"tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp_prefix = f"{output_prefix}.{tag}" if output_prefix is not None else None
    builders: list[indexed.IndexedDatasetBuilder] = []
    wds_writer = None
    # Folders this run creates are removed again on failure: nothing is left behind, not even an empty folder.
    made_dir = None
    bar = None
    if output_prefix is not None and not Path(output_prefix).parent.exists():
        made_dir = Path(output_prefix).parent
    try:
        if tmp_prefix is not None:
            builders.append(indexed.IndexedDatasetBuilder(tmp_prefix, dtype))
            if has_mask:
                builders.append(indexed.IndexedDatasetBuilder(tmp_prefix + LOSS_MASK_SUFFIX, np.uint8))
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
        for where, results in _results(_chunks(sources), encoder_kwargs, tok, workers):
            for (s_idx, line_no), result in zip(where, results, strict=True):
                if not isinstance(result, Encoded):
                    location = f"{sources[s_idx].path}:{line_no}"
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
                if builders:
                    builders[0].add_document(result.ids)
                    if has_mask:
                        builders[1].add_document(result.mask)
                if wds_writer is not None:
                    wds_writer.write(result.ids, result.mask)
                counts["documents"] += 1
                counts["tokens"] += len(result.ids)
                if has_mask:
                    counts["masked_tokens"] += int(result.mask.sum(dtype=np.int64))
                counts["truncated"] += result.truncated
                counts["truncated_tokens"] += result.lost
                turn_ends.update(result.turn_ends)
                ignored.update(result.ignored)
            if bar is not None:
                bar.update(len(where))
                elapsed = max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"{counts['tokens'] / elapsed:,.0f} tokens/s", refresh=False)
        if bar is not None:
            bar.close()
            bar = None
        if counts["documents"] == 0:
            raise ConversionError(
                f"{', '.join(map(str, paths))}: no usable records (skipped: {dict(skipped) or 'none'}); nothing written"
            )

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
            "sources": [
                {
                    "path": os.path.abspath(s.path),
                    "sha256": s.sha256.hexdigest(),
                    "bytes": s.bytes,
                    "records": s.records,
                }
                for s in sources
            ],
        }
        if wds_writer is not None:
            wds_writer.close(meta)
            wds_writer = None
        if tmp_prefix is not None:
            for b in builders:
                b.finalize()
            # The old meta goes first: while data files are being swapped, no meta says "finished".
            meta_path(output_prefix).unlink(missing_ok=True)
            indexed.rename(tmp_prefix, output_prefix)
            if has_mask:
                indexed.rename(tmp_prefix + LOSS_MASK_SUFFIX, f"{output_prefix}{LOSS_MASK_SUFFIX}")
            else:
                indexed.remove(f"{output_prefix}{LOSS_MASK_SUFFIX}")  # a stale mask from an earlier SFT run
            write_meta(output_prefix, meta)  # last: its presence says the conversion finished
    except BaseException:
        if bar is not None:
            bar.close()
        for b in builders:
            b.abort()
        if tmp_prefix is not None:
            indexed.remove(tmp_prefix)
            indexed.remove(tmp_prefix + LOSS_MASK_SUFFIX)
        if wds_writer is not None:
            wds_writer.abort()
        if made_dir is not None and made_dir.is_dir() and not any(made_dir.iterdir()):
            made_dir.rmdir()
        raise
    stats = {
        "documents": counts["documents"],
        "tokens": counts["tokens"],
        "input_bytes": sum(s.bytes for s in sources),
        "docs_per_s": counts["documents"] / seconds,
        "tokens_per_s": counts["tokens"] / seconds,
        "mb_per_s": sum(s.bytes for s in sources) / 1e6 / seconds,
    }
    return ConversionResult(
        output_prefix=str(output_prefix) if output_prefix is not None else None,
        webdataset_dir=str(webdataset_dir) if webdataset_dir is not None else None,
        meta=meta,
        seconds=seconds,
        stats=stats,
    )


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, as recorded in ``meta["sources"]``."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_conversion_current(
    output_prefix: str | os.PathLike,
    inputs: list[str | os.PathLike] | str | os.PathLike,
    tokenizer,
    **options: Any,
) -> bool:
    """True when ``output_prefix`` already holds a finished conversion of exactly these inputs with this tokenizer.

    For callers that convert on the fly into a cache (the engine): the inputs' sha256, the tokenizer's vocab hash and
    the options that change the ids must all match the meta, so an edited file or another tokenizer re-converts.

    Args:
        output_prefix: the cache prefix.
        inputs: the raw files, in order.
        tokenizer: the tokenizer (object or path / id).
        **options: the :func:`convert` keyword options to compare (``fmt``, ``text_key``, ``append_eod``,
            ``max_length``, ``over_length``, ``on_error``, ``chat_template``); ``fmt="auto"`` matches any detected
            format. For SFT data the template that would be used now (``chat_template``, else the tokenizer's, else
            the default) must be the one recorded: a tokenizer whose template changed re-converts.
    """
    keys = {"fmt": "format", "text_key": "text_key", "append_eod": "append_eod", "max_length": "max_length"}
    keys.update(over_length="over_length", on_error="on_error", chat_template="chat_template")
    unknown = sorted(set(options) - set(keys))
    if unknown:
        raise TypeError(f"is_conversion_current: unknown option(s) {unknown}; expected some of {sorted(keys)}")
    if not (meta_path(output_prefix).is_file() and indexed.exists(output_prefix)):
        return False
    meta = read_meta(output_prefix)
    if meta.get("has_loss_mask") and not indexed.exists(f"{output_prefix}{LOSS_MASK_SUFFIX}"):
        return False
    paths = [inputs] if isinstance(inputs, str | os.PathLike) else list(inputs)
    recorded = [s.get("sha256") for s in meta.get("sources", [])]
    if recorded != [file_sha256(p) for p in paths]:
        return False
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
        description="Convert jsonl/json records into Megatron-compatible .bin/.idx (+ loss mask) or WebDataset shards.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  dsft convert --input launch/demo_data/train.jsonl --output-prefix data/train "
        "--tokenizer MODEL_DIR --format messages\n  (then data.train=data/train in the training config)",
    )
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help=".jsonl or .json (array) files, in order")
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
