"""What ``--input`` (and a raw ``data.train``) can name, read as a stream of ``(row, record)`` with bounded memory.

Kinds (:func:`input_kind`):

``jsonl`` / ``json``        a ``.jsonl`` file (lines as raw bytes, parsed in the workers: the fast path) or a ``.json``
                            array (streamed through an incremental decoder). Any other file suffix is read the same
                            way, sniffing ``[`` for an array.
``jsonl.gz`` / ``json.gz``  the same through ``gzip``.
``parquet`` ``arrow`` ``csv``  one file, streamed by ``datasets`` (``load_dataset(builder, streaming=True)``).
``save_to_disk``            a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``
                            (``load_from_disk``: memory-mapped Arrow); a ``DatasetDict`` needs ``--split``.
``shards``                  a folder of data files (``*.parquet``, ``*.arrow``, ``*.jsonl[.gz]``, ``*.json[.gz]``,
                            ``*.csv``): each file is its own source, in sorted order, so errors name the shard.
``hub``                     ``namespace/name`` that is no local path: ``load_dataset(id, subset, split=split)``, which
                            works offline (``HF_HUB_OFFLINE=1``) from the local ``datasets`` cache.

Rows are numbered from 1: the line for jsonl, the element's first line for a ``.json`` array, the row for the
others; errors read ``file:row`` (``id[split]:row`` for a hub dataset). Each source also says what identifies its
content (:attr:`Source.fingerprint`): the sha256 of a file's bytes, ``datasets``' own fingerprint of a
``save_to_disk`` folder or a cached hub split (it changes when the data does).
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ARRAY_READ_BYTES = 1 << 20  # read size of the incremental .json array parser
TABLE_BATCH_ROWS = 1024  # rows per Arrow batch turned into Python records (bounded memory on multi-GB inputs)
# Suffixes read by ``datasets``' packaged builders, and the builder that reads each.
TABLE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}
SHARD_SUFFIXES = (".parquet", ".arrow", ".csv", ".jsonl", ".json", ".jsonl.gz", ".json.gz")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class SourceError(RuntimeError):
    """An input cannot be read; the message starts with the input (``file:row:`` when a row is to blame)."""


def input_kind(path: str | os.PathLike) -> str:
    """The kind of input ``path`` names (see the module docstring); ``missing`` when it names nothing."""
    p = Path(path)
    name = p.name.lower()
    if p.is_dir():
        return "save_to_disk" if (p / "state.json").is_file() or (p / "dataset_dict.json").is_file() else "shards"
    if p.is_file():
        if name.endswith((".jsonl.gz", ".json.gz")):
            return "json.gz"
        return TABLE_BUILDERS.get(p.suffix.lower(), "json")
    if _HUB_ID.match(str(path)) and not name.endswith(SHARD_SUFFIXES):
        return "hub"
    return "missing"


def missing_input_message(path: str | os.PathLike) -> str:
    """The error for an input that names nothing (what ``--input`` accepts)."""
    return (
        f"{path}: input file not found (expected a .jsonl/.json[.gz]/.parquet/.arrow/.csv file, a save_to_disk folder, "
        "a folder of shards, or a hub dataset id namespace/name in the local cache)"
    )


def is_hub_id(path: str | os.PathLike) -> bool:
    """``path`` names a hub dataset (``namespace/name``, not a local path)."""
    return input_kind(path) == "hub"


class _HashingReader:
    """A binary file that hashes and counts the bytes read through it (gzip reads the compressed bytes via this)."""

    def __init__(self, fh, sha256, counter: list[int]):
        self._fh, self._sha256, self._counter = fh, sha256, counter

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n)
        self._sha256.update(data)
        self._counter[0] += len(data)
        return data

    def __getattr__(self, name: str):
        return getattr(self._fh, name)


class Source:
    """One input: iterating yields ``(row, payload)``; payload is raw line bytes (jsonl) or a parsed record.

    Attributes:
        path: the file, folder or hub id as given.
        label: how errors name it (``path``, or ``id[split]`` for a hub dataset).
        kind: see :func:`input_kind`.
        bytes: input bytes read so far (compressed bytes for ``.gz``; file or Arrow cache size for tables).
        records: records yielded so far; ``blank_lines``: blank jsonl lines passed over.
        columns: the column names of a table source (None for json kinds, known after :meth:`open`).
    """

    def __init__(self, path: str | os.PathLike, kind: str, split: str | None = None, subset: str | None = None):
        self.path, self.kind, self.split, self.subset = str(path), kind, split, subset
        self.label = f"{self.path}[{split or 'train'}]" if kind == "hub" else self.path
        self.bytes = 0
        self.records = 0
        self.blank_lines = 0
        self.columns: list[str] | None = None
        self.read_bytes = ARRAY_READ_BYTES  # read size of the .json array parser
        # Set by the converter before a pass: ``{new: old}`` renames (--columns; applied here to parsed records,
        # by the workers to raw jsonl lines) and the keys the format needs (checked against a table's columns).
        self.renames: dict[str, str] = {}
        self.required: tuple[str, ...] = ()
        self.format: str | None = None
        self._sha256 = hashlib.sha256()
        self._complete = False  # a full pass hashed every byte of a json file
        self._fingerprint: str | None = None

    def fresh(self) -> Source:
        """A new reader of the same input (format detection reads ahead without disturbing the real pass)."""
        other = Source(self.path, self.kind, self.split, self.subset)
        other.renames, other.required, other.format = self.renames, self.required, self.format
        other.read_bytes = self.read_bytes
        return other

    @property
    def fingerprint(self) -> str:
        """What identifies the content: the file's sha256 (of the compressed bytes for ``.gz``), or ``datasets``'
        fingerprint of a ``save_to_disk`` folder / hub split."""
        if self._fingerprint is None:
            if self.kind in ("json", "json.gz"):
                self._fingerprint = self._sha256.hexdigest() if self._complete else file_sha256(self.path)
            elif self.kind in TABLE_BUILDERS.values():
                self._fingerprint = file_sha256(self.path)
            else:
                self._fingerprint = self._dataset()._fingerprint
        return self._fingerprint

    # -- iteration ---------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[int, Any]]:
        if self.kind == "json":
            yield from self._iter_json(open(self.path, "rb"))  # noqa: SIM115 - closed by the generator
        elif self.kind == "json.gz":
            counter = [0]
            raw = open(self.path, "rb")  # noqa: SIM115 - closed with the gzip stream
            hashing = _HashingReader(raw, self._sha256, counter)
            try:
                yield from self._iter_json(gzip.GzipFile(fileobj=hashing, mode="rb"), counter)
            except (OSError, EOFError, gzip.BadGzipFile) as exc:
                raise SourceError(f"{self.label}: not a readable gzip file ({exc})") from exc
            finally:
                raw.close()
        else:
            yield from self._iter_table()

    def _iter_json(self, fh, gz_counter: list[int] | None = None) -> Iterator[tuple[int, Any]]:
        with fh:
            head = fh.peek(4096)[:4096] if hasattr(fh, "peek") else b""
            is_array = head.removeprefix(codecs.BOM_UTF8).lstrip().startswith(b"[")
            lines = self._iter_array(fh, gz_counter) if is_array else self._iter_lines(fh, gz_counter)
            for row, payload in lines:
                yield row, payload if isinstance(payload, bytes) else rename_fields(payload, self.renames)
        self._complete = True

    def _count(self, data: bytes, gz_counter: list[int] | None) -> None:
        if gz_counter is None:  # plain file: hash what is read; gzip: the hashing reader saw the compressed bytes
            self._sha256.update(data)
            self.bytes += len(data)
        else:
            self.bytes = gz_counter[0]

    def _iter_lines(self, fh, gz_counter: list[int] | None) -> Iterator[tuple[int, bytes]]:
        for line_no, raw in enumerate(fh, start=1):
            self._count(raw, gz_counter)
            if line_no == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            line = raw.rstrip(b"\r\n")
            if not line.strip():
                self.blank_lines += 1
                continue
            self.records += 1
            yield line_no, line

    def _iter_array(self, fh, gz_counter: list[int] | None) -> Iterator[tuple[int, Any]]:
        """Stream the elements of a top-level JSON array without loading the file (raw_decode on a rolling buffer).

        Hand-written: ``json``/``datasets`` load a whole array into memory, and Arrow's json reader needs jsonl.
        """
        decoder = json.JSONDecoder()
        text_decoder = codecs.getincrementaldecoder("utf-8-sig")()
        buf, pos, line, eof = "", 0, 1, False

        def fill() -> bool:
            nonlocal buf, pos, eof
            chunk = fh.read(self.read_bytes)
            self._count(chunk, gz_counter)
            try:
                text = text_decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                raise SourceError(f"{self.label}:{line}: not valid UTF-8 ({exc.reason})") from exc
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

        def fail(what: str) -> SourceError:
            # A broken array cannot be resynchronised, so this stops the run even with --on-error skip.
            return SourceError(f"{self.label}:{line}: {what} (a malformed JSON array stops the conversion)")

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

    # -- tables through `datasets` -----------------------------------------------------------------------------
    def _dataset(self):
        """The ``datasets`` object to read: a streaming ``IterableDataset`` for a file, a memory-mapped ``Dataset``
        for a ``save_to_disk`` folder or a cached hub split."""
        import datasets

        datasets.utils.logging.disable_progress_bar()
        try:
            if self.kind in TABLE_BUILDERS.values():
                return datasets.load_dataset(self.kind, data_files=[self.path], split="train", streaming=True)
            if self.kind == "save_to_disk":
                loaded = datasets.load_from_disk(self.path)
                if isinstance(loaded, datasets.DatasetDict):
                    return self._pick_split(loaded, "a save_to_disk DatasetDict")
                if self.split not in (None, "train"):
                    raise SourceError(
                        f"{self.path}: --split {self.split}: this save_to_disk folder holds one split; drop --split"
                    )
                return loaded
            return self._load_hub()
        except SourceError:
            raise
        except Exception as exc:  # noqa: BLE001 - any reader failure is re-raised naming the input
            raise SourceError(f"{self.label}: cannot read it as {self.kind} ({type(exc).__name__}: {exc})") from exc

    def _pick_split(self, splits, what: str):
        names = list(splits)
        if self.split is None and len(names) == 1:
            return splits[names[0]]
        if self.split not in names:
            given = f"--split {self.split}" if self.split else "no --split"
            raise SourceError(f"{self.path}: {given}, but {what} has splits {names}; pass --split NAME")
        return splits[self.split]

    def _load_hub(self):
        import datasets

        split = self.split or "train"
        try:
            return datasets.load_dataset(self.path, self.subset, split=split)
        except ValueError as exc:
            text = str(exc)
            if "Unknown split" in text:  # datasets: 'Unknown split "x". Should be one of [...]'
                raise SourceError(f"{self.label}: unknown split {split!r} ({text}); pass --split NAME") from exc
            if "config" in text.lower():
                raise SourceError(
                    f"{self.path}: subset {self.subset!r} not found ({text}); pass --subset NAME"
                ) from exc
            raise
        except (ConnectionError, FileNotFoundError) as exc:
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
            why = "not in the local datasets cache (HF_HUB_OFFLINE=1)" if offline else "not found on the hub or cache"
            raise SourceError(
                f"{self.path}: hub dataset {why}; load it once with network access, or give a local path"
            ) from exc

    def _check_columns(self) -> None:
        """A table's columns must hold what the renames and the format read: say so before any row is encoded."""
        if not self.columns:  # a streamed csv/json may not know its columns before the first row
            return
        shown = ", ".join(self.columns)
        for new, old in self.renames.items():
            if old not in self.columns:
                raise SourceError(f'{self.label}: --columns {new}={old}: no column "{old}" (columns: {shown})')
        have = (set(self.columns) - set(self.renames.values())) | set(self.renames)
        for key in self.required:
            if key not in have:
                raise SourceError(
                    f'{self.label}: no column "{key}", which format {self.format} reads (columns: {shown}); '
                    f"rename one with --columns {key}=COLUMN, or pass --format"
                )

    def _iter_table(self) -> Iterator[tuple[int, dict]]:
        if self.kind in TABLE_BUILDERS.values() and os.path.getsize(self.path) == 0:
            raise SourceError(f"{self.label}: empty file (0 bytes); nothing to convert")
        dataset = self._dataset()
        self.columns = list(dataset.column_names or [])
        self._check_columns()
        if self.kind in TABLE_BUILDERS.values():
            self.bytes = os.path.getsize(self.path)
        else:
            self.bytes = sum(os.path.getsize(f["filename"]) for f in dataset.cache_files if "filename" in f)
        row = 0
        batches = dataset.iter(batch_size=TABLE_BATCH_ROWS)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as exc:  # noqa: BLE001 - a corrupt file fails mid-stream: name it and the row
                raise SourceError(
                    f"{self.label}:{row + 1}: cannot read it as {self.kind} ({type(exc).__name__}: {exc})"
                ) from exc
            names = list(batch)
            for values in zip(*(batch[n] for n in names), strict=True):
                row += 1
                self.records += 1
                record = {n: drop_nested_nulls(v) for n, v in zip(names, values, strict=True)}
                yield row, rename_fields(record, self.renames)


def parse_renames(spec: str | None) -> dict[str, str]:
    """``--columns new=old,new2=old2`` as ``{new: old}``.

    Raises:
        SourceError: an entry that is not ``new=old``, or a name given twice.
    """
    renames: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in (spec or "").split(","))):
        new, sep, old = (x.strip() for x in item.partition("="))
        if not sep or not new or not old:
            raise SourceError(f"--columns {spec}: {item!r} is not new=old (e.g. --columns prompt=question)")
        if new in renames or old in renames.values():
            raise SourceError(f"--columns {spec}: {new if new in renames else old!r} is named twice")
        renames[new] = old
    return renames


def rename_fields(record: Any, renames: dict[str, str]) -> Any:
    """``record`` with the fields ``renames`` names moved to their new names (a field the record lacks stays
    absent, so the format reports the missing key); non-dict records pass through."""
    if not renames or not isinstance(record, dict):
        return record
    out = {k: v for k, v in record.items() if k not in renames.values()}
    for new, old in renames.items():
        if old in record:
            out[new] = record[old]
    return out


def drop_nested_nulls(value: Any) -> Any:
    """Remove null-valued keys from the dicts inside ``value`` (lists and structs, recursively).

    Arrow gives every struct the union of the keys of all rows, with null where a row had none: a message without
    ``tool_calls`` or ``loss_weight`` in a parquet file comes back with ``"loss_weight": None``. Dropping those keys
    gives the record that was written; top-level columns keep their nulls, so a null ``text`` is a wrong type.
    """
    if isinstance(value, dict):
        return {k: drop_nested_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [drop_nested_nulls(v) for v in value]
    return value


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, as recorded in ``meta["sources"]``."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class InputOptions:
    """How to pick what to read from a dataset with several: ``split`` (default: the only one, or ``train`` on the
    hub) and ``subset`` (a hub dataset's config name)."""

    split: str | None = None
    subset: str | None = None


def open_sources(paths: list[str | os.PathLike], options: InputOptions | None = None) -> list[Source]:
    """One :class:`Source` per input, a folder of shards expanded into its files (sorted).

    Raises:
        SourceError: an input that names nothing, an empty folder, or ``--subset`` on something that is no hub id.
    """
    options = options or InputOptions()
    sources: list[Source] = []
    for path in paths:
        kind = input_kind(path)
        if kind == "missing":
            raise SourceError(missing_input_message(path))
        if options.subset and kind != "hub":
            raise SourceError(f"{path}: --subset {options.subset} applies to hub dataset ids only; drop it")
        if kind == "shards":
            files = shard_files(path)
            if not files:
                raise SourceError(
                    f"{path}: folder with no data files (expected {', '.join('*' + s for s in SHARD_SUFFIXES)} "
                    "or a save_to_disk folder)"
                )
            sources += [Source(f, input_kind(f)) for f in files]
        elif kind in ("save_to_disk", "hub"):
            sources.append(Source(path, kind, options.split, options.subset))
        else:
            sources.append(Source(path, kind))
    return sources


def shard_files(folder: str | os.PathLike) -> list[str]:
    """Data files under ``folder`` (recursively, hidden files skipped), sorted by relative path."""
    root = Path(folder)
    found = [
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.name.lower().endswith(SHARD_SUFFIXES)
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    return [str(p) for p in sorted(found, key=lambda p: p.relative_to(root).as_posix())]


def _snake(name: str) -> str:
    """``datasets``' ``camelcase_to_snakecase`` (the cache folder of a hub dataset), without importing it."""
    name = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    return re.sub(r"([a-z\d])([A-Z])", r"\1_\2", name).lower()


def hub_cache_has(dataset_id: str) -> bool:
    """Whether ``dataset_id`` (``namespace/name``) is in the local caches ``load_dataset`` reads offline: the
    ``datasets`` cache (``HF_DATASETS_CACHE``) or the hub file cache (``HF_HUB_CACHE``). Reads folders only."""
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    namespace, _, name = dataset_id.partition("/")
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE", home / "datasets"))
    hub_cache = Path(os.environ.get("HF_HUB_CACHE", os.environ.get("HUGGINGFACE_HUB_CACHE", home / "hub")))
    return (datasets_cache / f"{namespace}___{_snake(name)}").is_dir() or (
        hub_cache / f"datasets--{namespace}--{name}"
    ).is_dir()


def listing_key(path: str | os.PathLike) -> str:
    """A cheap key of what ``path`` holds now (for naming a cache): size and mtime of the file, or of every file
    of a folder; the id itself for a hub dataset (its content is checked by fingerprint before reuse)."""
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if p.is_dir():
        entries = []
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            st = f.stat()
            entries.append(f"{f.relative_to(p).as_posix()}|{st.st_size}|{st.st_mtime_ns}")
        return f"{p.resolve()}|" + hashlib.sha256("\n".join(entries).encode()).hexdigest()
    return f"hub:{path}"
