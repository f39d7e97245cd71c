"""Megatron-LM compatible indexed dataset (``MMIDIDX``): ``prefix.bin`` raw tokens + ``prefix.idx`` index.

Byte layout of ``.idx`` (little endian), identical to ``megatron/core/datasets/indexed_dataset.py``::

    magic     9 bytes   b"MMIDIDX\\x00\\x00"
    version   uint64    1
    dtype     uint8     code from DTYPE_CODES
    S         uint64    number of sequences
    D         uint64    number of entries in the document index (documents + 1; it starts at 0)
    sizes     int32[S]  tokens per sequence
    pointers  int64[S]  byte offset of each sequence in .bin
    doc_idx   int64[D]  sequence index where each document starts, then the total S

so an index is exactly ``34 + 12*S + 8*D`` bytes. Random access is O(1) through ``numpy.memmap``.
Written by hand because Megatron-core is a heavy dependency (apex, transformer-engine) for ~150 lines of format.

This module owns dsft's whole on-disk dataset: ``P.bin/.idx`` (token ids), ``P_loss_mask.bin/.idx``
(:data:`LOSS_MASK_SUFFIX`; uint8, the same sequence sizes: :func:`check_loss_mask_aligned`) and ``P.meta.json``
(written last by :class:`DatasetWriter`, whose presence says the conversion finished; content: ``data_tools.meta``).
"""

from __future__ import annotations

import os
import shutil
import struct
from array import array
from pathlib import Path

import numpy as np

LOSS_MASK_SUFFIX = "_loss_mask"  # P_loss_mask.bin/.idx beside P.bin/.idx: which tokens are trained (SFT)
MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8  # 34

# Megatron's DType enum: the code stored in the header.
DTYPE_CODES: dict[int, type] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF_DTYPE = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


class IndexedDatasetError(ValueError):
    """A .bin/.idx pair is missing, truncated or not in MMIDIDX format."""


def token_dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), int32 otherwise (e.g. Qwen's 151k vocabulary)."""
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


def index_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.idx")


def data_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.bin")


def exists(prefix: str | os.PathLike) -> bool:
    return index_path(prefix).is_file() and data_path(prefix).is_file()


class IndexedDataset:
    """Read-only view of ``prefix.bin/.idx``; ``ds[i]`` is sequence ``i`` as a numpy array (a memmap slice)."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        idx_file, bin_file = index_path(prefix), data_path(prefix)
        for f in (idx_file, bin_file):
            if not f.is_file():
                raise IndexedDatasetError(f"{f}: not found; convert your jsonl first (python -m data_tools.convert)")
        idx_bytes = idx_file.stat().st_size
        with open(idx_file, "rb") as fh:
            header = fh.read(HEADER_BYTES)
        if len(header) < HEADER_BYTES or header[: len(MAGIC)] != MAGIC:
            raise IndexedDatasetError(f"{idx_file}: not a Megatron MMIDIDX index (bad magic or truncated header)")
        (version,) = struct.unpack("<Q", header[9:17])
        if version != VERSION:
            raise IndexedDatasetError(f"{idx_file}: index version {version}, only version {VERSION} is supported")
        code = header[17]
        if code not in DTYPE_CODES:
            raise IndexedDatasetError(f"{idx_file}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        n_seq, n_doc = struct.unpack("<QQ", header[18:34])
        expected = HEADER_BYTES + 12 * n_seq + 8 * n_doc
        if idx_bytes != expected:
            raise IndexedDatasetError(
                f"{idx_file}: {idx_bytes} bytes, expected {expected} for {n_seq} sequences / {n_doc} doc entries "
                "(truncated or corrupt; re-run the conversion)"
            )
        self._idx = np.memmap(idx_file, mode="r", dtype=np.uint8)
        off = HEADER_BYTES
        self.sizes = np.frombuffer(self._idx, dtype=np.int32, count=n_seq, offset=off)
        off += 4 * n_seq
        self.pointers = np.frombuffer(self._idx, dtype=np.int64, count=n_seq, offset=off)
        off += 8 * n_seq
        self.doc_idx = np.frombuffer(self._idx, dtype=np.int64, count=n_doc, offset=off)

        bin_bytes = bin_file.stat().st_size
        needed = int(self.pointers[-1] + self.sizes[-1] * self.dtype.itemsize) if n_seq else 0
        if bin_bytes != needed:
            raise IndexedDatasetError(
                f"{bin_file}: {bin_bytes} bytes but the index describes {needed} "
                "(the .bin was truncated or belongs to another index; re-run the conversion)"
            )
        # np.memmap of a zero-byte file raises, so an empty dataset gets an empty array.
        self._bin = np.memmap(bin_file, mode="r", dtype=self.dtype) if bin_bytes else np.empty(0, self.dtype)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {self.prefix} ({len(self)} sequences)")
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self._bin[start : start + int(self.sizes[i])]

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))

    @property
    def num_documents(self) -> int:
        return len(self.doc_idx) - 1


class IndexedDatasetBuilder:
    """Streams sequences into ``prefix.bin`` and writes ``prefix.idx`` on :meth:`finalize`.

    Each :meth:`add_item` is one sequence; :meth:`end_document` closes a document (Megatron's semantics).
    Write under a temporary prefix and :func:`rename` at the end so a failure never leaves final names behind.
    """

    def __init__(self, prefix: str | os.PathLike, dtype: np.dtype | type):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(f"dtype {self.dtype} has no MMIDIDX code")
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._bin = open(data_path(prefix), "wb")  # noqa: SIM115 - closed in finalize()/abort()
        # array.array, not lists: 4/8 bytes per entry instead of ~36, so 100M documents fit in ~1.2 GB.
        self._sizes = array("i")
        self._doc_idx = array("q", [0])

    def add_item(self, tokens) -> None:
        arr = np.asarray(tokens)
        if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token id out of range for {self.dtype} (min {arr.min()}, max {arr.max()})")
        self._bin.write(arr.astype(self.dtype, copy=False).tobytes(order="C"))
        self._sizes.append(int(arr.size))

    def add_documents(self, documents: list) -> None:
        """Many one-sequence documents at once: one range check and one write for the lot (the converter's path;
        per-document numpy calls cost more than the write itself)."""
        if not documents:
            return
        arrays = [np.asarray(d) for d in documents]
        flat = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
        if flat.size and (flat.min() < 0 or flat.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token id out of range for {self.dtype} (min {flat.min()}, max {flat.max()})")
        self._bin.write(flat.astype(self.dtype, copy=False).tobytes(order="C"))
        first = len(self._sizes)
        self._sizes.extend(len(a) for a in arrays)
        self._doc_idx.extend(range(first + 1, first + len(arrays) + 1))

    def end_document(self) -> None:
        self._doc_idx.append(len(self._sizes))

    def add_document(self, tokens) -> None:
        self.add_item(tokens)
        self.end_document()

    def add_index(self, other_prefix: str | os.PathLike) -> None:
        """Append a whole existing dataset (same dtype), like Megatron's ``add_index`` used to merge shards."""
        other = IndexedDataset(other_prefix)
        if other.dtype != self.dtype:
            raise ValueError(f"{other_prefix}: dtype {other.dtype} differs from {self.dtype}")
        offset = len(self._sizes)
        self._sizes.frombytes(np.ascontiguousarray(other.sizes, dtype=np.int32).tobytes())
        self._doc_idx.frombytes((np.asarray(other.doc_idx[1:], dtype=np.int64) + offset).tobytes())
        with open(data_path(other_prefix), "rb") as src:
            shutil.copyfileobj(src, self._bin, length=16 << 20)

    def finalize(self) -> None:
        self._bin.close()
        sizes = np.frombuffer(self._sizes, dtype=np.int32) if self._sizes else np.zeros(0, np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        if len(sizes) > 1:
            np.cumsum(sizes[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        doc_idx = np.frombuffer(self._doc_idx, dtype=np.int64)
        with open(index_path(self.prefix), "wb") as fh:
            fh.write(MAGIC)
            fh.write(struct.pack("<Q", VERSION))
            fh.write(struct.pack("<B", CODE_OF_DTYPE[self.dtype]))
            fh.write(struct.pack("<QQ", len(sizes), len(doc_idx)))
            fh.write(sizes.tobytes(order="C"))
            fh.write(pointers.tobytes(order="C"))
            fh.write(doc_idx.tobytes(order="C"))
            fh.flush()
            os.fsync(fh.fileno())

    def abort(self) -> None:
        """Close and delete what was written (used on a failed conversion)."""
        self._bin.close()
        remove(self.prefix)


def rename(src_prefix: str | os.PathLike, dst_prefix: str | os.PathLike) -> None:
    """Move a finished pair into place: .bin first, .idx last, so a reader never sees a new .idx with an old .bin."""
    os.replace(data_path(src_prefix), data_path(dst_prefix))
    os.replace(index_path(src_prefix), index_path(dst_prefix))


def remove(prefix: str | os.PathLike) -> None:
    for f in (data_path(prefix), index_path(prefix)):
        f.unlink(missing_ok=True)


def merge(prefixes: list[str | os.PathLike], out_prefix: str | os.PathLike) -> IndexedDataset:
    """Concatenate several datasets (same dtype) into ``out_prefix``."""
    if not prefixes:
        raise ValueError("merge needs at least one input prefix")
    builder = IndexedDatasetBuilder(out_prefix, IndexedDataset(prefixes[0]).dtype)
    for p in prefixes:
        builder.add_index(p)
    builder.finalize()
    return IndexedDataset(out_prefix)


# ---------------------------------------------------------------------------------------------------------------
# dsft datasets: tokens + optional loss mask + meta, written atomically.
def loss_mask_prefix(prefix: str | os.PathLike) -> str:
    """``P_loss_mask``: the prefix of ``P``'s loss mask."""
    return f"{prefix}{LOSS_MASK_SUFFIX}"


def has_loss_mask(prefix: str | os.PathLike) -> bool:
    """``P_loss_mask.bin/.idx`` both exist."""
    return exists(loss_mask_prefix(prefix))


def check_loss_mask_aligned(prefix: str | os.PathLike, tokens: IndexedDataset | None = None) -> IndexedDataset | None:
    """Open ``P``'s loss mask, if it has one, and check it lines up with the tokens sequence by sequence.

    Args:
        prefix: the dataset prefix ``P``.
        tokens: ``IndexedDataset(P)`` when already open.

    Returns:
        The mask dataset, or None when ``P`` has no mask.

    Raises:
        IndexedDatasetError: the mask has other sequence sizes (it belongs to another conversion), or is corrupt.
    """
    mask_prefix = loss_mask_prefix(prefix)
    if not index_path(mask_prefix).exists():
        return None
    tokens = tokens if tokens is not None else IndexedDataset(prefix)
    mask = IndexedDataset(mask_prefix)
    if len(mask) != len(tokens) or not np.array_equal(mask.sizes, tokens.sizes):
        raise IndexedDatasetError(
            f"{mask_prefix}.idx: {len(mask)} loss-mask sequences do not line up with the {len(tokens)} token "
            f"sequences of {prefix}.idx (they belong to different conversions); re-run the conversion"
        )
    return mask


class DatasetWriter:
    """Writes a dsft dataset under temporary names and moves it into place only on :meth:`commit`.

    Order of the commit (a reader never sees a finished-looking mix of two conversions): the old meta is removed,
    ``.bin`` then ``.idx`` renamed, the mask renamed (or a stale one from an earlier SFT conversion removed), and
    ``P.meta.json`` written last. :meth:`abort` deletes the temporary files; the final names are never touched.

    Args:
        prefix: the final ``P``.
        dtype: token dtype (:func:`token_dtype_for_vocab`).
        with_loss_mask: also write ``P_loss_mask`` (uint8, one value per token).
        tag: suffix of the temporary names (unique per process by default).
    """

    def __init__(self, prefix: str | os.PathLike, dtype, with_loss_mask: bool, tag: str | None = None):
        import uuid

        self.prefix = str(prefix)
        self.tmp_prefix = f"{self.prefix}.{tag or f'tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}'}"
        self.with_loss_mask = with_loss_mask
        self._tokens = IndexedDatasetBuilder(self.tmp_prefix, dtype)
        self._mask = IndexedDatasetBuilder(loss_mask_prefix(self.tmp_prefix), np.uint8) if with_loss_mask else None

    def add(self, ids, mask=None) -> None:
        """One sample (one sequence, one document); ``mask`` is required exactly when the writer has a mask."""
        if (mask is None) == self.with_loss_mask:
            raise ValueError(f"{self.prefix}: a loss mask is {'required' if self.with_loss_mask else 'not expected'}")
        if mask is not None and len(mask) != len(ids):
            raise ValueError(f"{self.prefix}: loss mask of {len(mask)} values for {len(ids)} tokens")
        self._tokens.add_document(ids)
        if self._mask is not None:
            self._mask.add_document(mask)

    def add_many(self, ids: list, masks: list | None = None) -> None:
        """Several samples (:meth:`add` for each, written in one go)."""
        if (masks is None) == self.with_loss_mask:
            raise ValueError(f"{self.prefix}: loss masks are {'required' if self.with_loss_mask else 'not expected'}")
        if masks is not None:
            for n, (i, m) in enumerate(zip(ids, masks, strict=True)):
                if len(m) != len(i):
                    raise ValueError(f"{self.prefix}: sample {n}: loss mask of {len(m)} values for {len(i)} tokens")
        self._tokens.add_documents(ids)
        if self._mask is not None:
            self._mask.add_documents(masks)

    def commit(self, meta: dict) -> None:
        """Finalize the temporary files, rename them into place and write the meta last."""
        from data_tools.meta import meta_path, write_meta

        self._tokens.finalize()
        if self._mask is not None:
            self._mask.finalize()
        meta_path(self.prefix).unlink(missing_ok=True)
        rename(self.tmp_prefix, self.prefix)
        if self._mask is not None:
            rename(loss_mask_prefix(self.tmp_prefix), loss_mask_prefix(self.prefix))
        else:
            remove(loss_mask_prefix(self.prefix))  # a stale mask from an earlier SFT conversion
        write_meta(self.prefix, meta)  # last: its presence says the conversion finished

    def abort(self) -> None:
        """Delete the temporary files (after a failure); the final names are left as they were."""
        self._tokens.abort()
        if self._mask is not None:
            self._mask.abort()
        remove(self.tmp_prefix)
        remove(loss_mask_prefix(self.tmp_prefix))


def is_complete(prefix: str | os.PathLike) -> bool:
    """A finished dsft dataset: ``P.meta.json`` (written last) and ``P.bin/.idx``, and the mask its meta promises."""
    from data_tools.meta import meta_path, read_meta

    if not (meta_path(prefix).is_file() and exists(prefix)):
        return False
    return not read_meta(prefix).get("has_loss_mask") or has_loss_mask(prefix)
