"""Map-style path: a Megatron ``.bin/.idx`` prefix (+ optional ``_loss_mask``) split across ranks by DistributedSampler.

Every epoch's plan (which samples go in which row of which batch on this rank) is a pure function of
``(seed, epoch, rank, world_size)`` and the sequence lengths in the ``.idx``, so a resumed run rebuilds it exactly
and just starts at batch ``k``. No token is read to make a plan.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from data_tools import indexed
from data_tools.indexed import LOSS_MASK_SUFFIX  # the on-disk format lives in data_tools.indexed
from data_tools.loading.packing import (
    IGNORE_INDEX,
    PackingStats,
    bucket_order,
    collate_chunks,
    collate_packed,
    collate_padded,
    pack_lengths,
)


class MmapSource:
    """The token (and loss-mask) memmaps of one prefix, reopened lazily so DataLoader workers never pickle them."""

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        ds = indexed.IndexedDataset(self.prefix)
        self.sizes = np.array(ds.sizes, dtype=np.int64)
        self.dtype = ds.dtype
        # Token offset of each sequence; contiguous in every file our builder or Megatron's writes.
        self.offsets = np.array(ds.pointers, dtype=np.int64) // ds.dtype.itemsize
        self.num_tokens = int(self.sizes.sum())
        self.loss_mask_prefix = self.prefix + LOSS_MASK_SUFFIX
        self.has_loss_mask = indexed.exists(self.loss_mask_prefix)
        if self.has_loss_mask:
            lm = indexed.IndexedDataset(self.loss_mask_prefix)
            if len(lm) != len(ds) or not np.array_equal(lm.sizes, ds.sizes):
                raise indexed.IndexedDatasetError(
                    f"{self.loss_mask_prefix}.idx: sequence sizes differ from {self.prefix}.idx; the two belong to "
                    "different conversions, re-run the conversion"
                )
        # Text chunks slice the .bin as one token stream: true for every file our builder or Megatron's writes.
        self.contiguous = bool(np.array_equal(self.offsets, np.cumsum(self.sizes) - self.sizes))
        self._ds = self._lm = self._tokens = None

    def __len__(self) -> int:
        return len(self.sizes)

    def __getstate__(self):
        return {**self.__dict__, "_ds": None, "_lm": None, "_tokens": None}

    def _open(self):
        if self._ds is None:
            self._ds = indexed.IndexedDataset(self.prefix)
            self._lm = indexed.IndexedDataset(self.loss_mask_prefix) if self.has_loss_mask else None
            path = indexed.data_path(self.prefix)
            self._tokens = np.memmap(path, mode="r", dtype=self.dtype) if self.num_tokens else np.empty(0, self.dtype)

    def sample(self, i: int, seq_len: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Sequence ``i`` truncated to ``seq_len`` tokens, with its loss mask (None = every token is a target)."""
        self._open()
        ids = self._ds[i][:seq_len]
        return ids, (self._lm[i][:seq_len] if self._lm is not None else None)

    def chunk(self, j: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Text chunk ``j``: tokens ``[j*T, (j+1)*T)`` of the concatenated sequences and their per-document
        position ids (reset to 0 where a sequence starts, and at the chunk start)."""
        self._open()
        a = j * seq_len
        ids = self._tokens[a : a + seq_len]
        t = np.arange(a, a + seq_len, dtype=np.int64)
        starts = self.offsets[np.searchsorted(self.offsets, t, side="right") - 1]
        return ids, t - np.maximum(starts, a)


def rank_order(n: int, *, rank: int, world_size: int, seed: int, epoch: int, shuffle: bool, drop_last: bool):
    """This rank's sample indices for ``epoch``: what ``DistributedSampler`` yields, with its repeats marked.

    drop_last=True drops the tail so every rank gets ``n // world_size`` samples; drop_last=False pads by repeating
    the first samples so every rank gets ``ceil(n / world_size)``. A repeat is returned as ``~i`` (see ``repeat``):
    it still runs through the model, so every rank does the same number of forward passes (ZeRO-3 needs that), but
    it carries no targets, so an evaluation counts every sample exactly once.
    """
    sampler = DistributedSampler(
        range(n), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
    )
    sampler.set_epoch(epoch)
    order = np.fromiter(iter(sampler), dtype=np.int64, count=len(sampler))
    padded = rank + np.arange(len(order)) * world_size >= n  # DistributedSampler takes positions rank::world_size
    return np.where(padded, ~order, order)


def repeat(i: int) -> int:
    """Mark plan entry ``i`` (a sample or chunk index) as a zero-weight repeat: ``~i``, always negative."""
    return ~i if i >= 0 else i


def entry(i: int) -> tuple[int, bool]:
    """(index, is_repeat) of a plan entry."""
    return (i, False) if i >= 0 else (~i, True)


def _index(entries: np.ndarray) -> np.ndarray:
    """Plan entries -> sample indices (repeats decoded)."""
    return np.where(entries < 0, ~entries, entries)


def make_plan(source: MmapSource, *, epoch: int, cfg) -> tuple[list, PackingStats]:
    """The list of this rank's batches for ``epoch`` (same length on every rank) and the packing stats of this rank.

    ``cfg`` carries seq_len, micro_batch_size, rank, world_size, seed, packing, shuffle, drop_last, pack_window.
    A batch is a list of rows (each a list of sample indices) when packed, a list of sample indices otherwise, or
    a list of chunk indices for text data in packed mode (see ``text_chunks``).
    """
    t, b, w = cfg.seq_len, cfg.micro_batch_size, cfg.world_size
    kw = dict(world_size=w, seed=cfg.seed, epoch=epoch, shuffle=cfg.shuffle, drop_last=cfg.drop_last)
    stats = PackingStats()
    if text_chunks(source, cfg):
        if not source.contiguous:
            raise ValueError(f"{source.prefix}.idx: sequences are not stored back to back; re-run the conversion")
        n = source.num_tokens // t
        order = rank_order(n, rank=cfg.rank, **kw)
        nb = len(order) // b if cfg.drop_last else math.ceil(len(order) / b)
        _check_nonempty(nb, f"{n} chunks of {t} tokens", cfg)
        stats = PackingStats(
            samples=len(order), rows=len(order), real_tokens=len(order) * t, total_tokens=len(order) * t
        )
        return [order[i * b : (i + 1) * b].tolist() for i in range(nb)], stats
    lengths = np.minimum(source.sizes, t)
    if cfg.packing == "packed":
        # Every rank packs every rank's share (lengths only, no token read) so all agree on the batch count:
        # the smallest (drop_last) or largest (wrap around) row count decides, else collectives would hang.
        counts = []
        for r in range(w):
            order = rank_order(len(source), rank=r, **kw)
            packed = pack_lengths(lengths[_index(order)], t, cfg.pack_window)
            counts.append(len(packed))
            if r == cfg.rank:  # only this rank's rows are kept; the others only count
                mine, rows = _index(order), [[int(order[p]) for p in row] for row in packed]
        nb = min(counts) // b if cfg.drop_last else max(math.ceil(c / b) for c in counts)
        _check_nonempty(nb, f"{len(source)} samples", cfg)
        # Rows past this rank's own (to match the rank with the most) wrap around as zero-weight repeats.
        used = [rows[i] if i < len(rows) else [repeat(s) for s in rows[i % len(rows)]] for i in range(nb * b)]
        plan = [used[i * b : (i + 1) * b] for i in range(nb)]
        real = int(sum(lengths[entry(s)[0]] for row in used for s in row))
        trunc = source.sizes[mine] > t
        stats = PackingStats(
            samples=sum(len(r) for r in used),
            rows=len(used),
            real_tokens=real,
            total_tokens=len(used) * t,
            truncated_samples=int(trunc.sum()),
            truncated_tokens=int((source.sizes[mine][trunc] - t).sum()),
        )
        return plan, stats
    order = rank_order(len(source), rank=cfg.rank, **kw)
    if cfg.packing == "bucket":
        rng = np.random.default_rng([cfg.seed, epoch, 1])  # same batch shuffle on all ranks
        batches = [[int(order[p]) for p in bt] for bt in bucket_order(lengths[_index(order)], b, rng)]
    else:
        batches = [order[i : i + b].tolist() for i in range(0, len(order), b)]
    if cfg.drop_last:
        batches = [bt for bt in batches if len(bt) == b]
    _check_nonempty(len(batches), f"{len(source)} samples", cfg)
    real = int(sum(lengths[entry(s)[0]] for bt in batches for s in bt))
    total = int(sum(len(bt) * lengths[_index(np.array(bt))].max() for bt in batches))
    order = _index(order)
    trunc = source.sizes[order] > t
    stats = PackingStats(
        samples=sum(len(bt) for bt in batches),
        rows=sum(len(bt) for bt in batches),
        real_tokens=real,
        total_tokens=total,
        truncated_samples=int(trunc.sum()),
        truncated_tokens=int((source.sizes[order][trunc] - t).sum()),
    )
    return batches, stats


def text_chunks(source: MmapSource, cfg) -> bool:
    """Plain text (no loss mask) in packed mode is cut into Megatron-style contiguous chunks of seq_len tokens."""
    return cfg.packing == "packed" and not source.has_loss_mask


def _check_nonempty(nb: int, what: str, cfg) -> None:
    if nb == 0:
        raise ValueError(
            f"loader: {what} give no full batch per rank with world_size={cfg.world_size}, "
            f"micro_batch_size={cfg.micro_batch_size}, seq_len={cfg.seq_len}; use more data, a smaller micro "
            "batch, or drop_last=False"
        )


class PlanBatches(Dataset):
    """Map-style dataset whose item ``j`` is the collated batch ``j`` of a plan (lets DataLoader workers build them)."""

    def __init__(self, source: MmapSource, plan: list, cfg):
        self.source, self.plan, self.cfg = source, plan, cfg
        self.chunks = text_chunks(source, cfg)

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, j: int) -> dict:
        cfg, src, batch = self.cfg, self.source, self.plan[j]
        t = cfg.seq_len
        if self.chunks:
            parts = [src.chunk(entry(c)[0], t) for c in batch]
            out = collate_chunks(np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts]), cfg.attention)
            out["labels"][[entry(c)[1] for c in batch]] = IGNORE_INDEX  # repeated chunks carry no targets
            return out
        if cfg.packing == "packed":
            rows = [[piece for i in row for piece in self._pieces(i)] for row in batch]
            out = collate_packed(rows, t, cfg.pad_id, cfg.attention)
            entries = [i for row in batch for i in row]
        else:
            out = collate_padded([self._sample(i) for i in batch], cfg.pad_id, cfg.pad_multiple, cfg.seq_len)
            entries = batch
        source_of = getattr(src, "source_of", None)
        if source_of is not None:  # a mixture (loading.blend): real samples per source; repeats carry no targets
            real = np.asarray([i for i in entries if i >= 0], dtype=np.int64)
            counts = np.bincount(source_of[real], minlength=src.num_sources)
            out["source_counts"] = torch.from_numpy(counts.astype(np.int64))
        return out

    def _sample(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Sample of plan entry ``i``; a repeat gets an all-zero loss mask (no targets)."""
        index, repeated = entry(i)
        ids, loss_mask = self.source.sample(index, self.cfg.seq_len)
        return (ids, np.zeros(len(ids), np.uint8)) if repeated else (ids, loss_mask)

    def _pieces(self, i: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """The packed pieces of plan entry ``i``: one sample, or a blended text chunk's document pieces."""
        if not hasattr(self.source, "pieces"):
            return [self._sample(i)]
        index, repeated = entry(i)
        pieces = self.source.pieces(index, self.cfg.seq_len)
        return [(ids, np.zeros(len(ids), np.uint8)) for ids, _ in pieces] if repeated else pieces
