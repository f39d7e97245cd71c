"""Map-style path: a Megatron ``.bin/.idx`` prefix (+ optional ``_loss_mask``) dealt to ranks by optimizer step.

Every epoch's rows (which samples are packed into which row, in which order) are a pure function of
``(seed, epoch, seq_len, packing)`` and the sequence lengths in the ``.idx``, never of the rank or the world size;
each rank then takes its slice of every optimizer step (``make_plan``). So a resumed run, on any number of ranks
whose micro batches tile the same global batch, rebuilds the rows exactly and starts at the next row. No token is
read to make a plan.
"""

from __future__ import annotations

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


def sample_order(n: int, *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The epoch's order of ``n`` samples (or chunks): ``DistributedSampler``'s permutation for one replica, i.e.
    ``randperm(n)`` seeded by ``seed + epoch``, or ``0..n-1`` unshuffled. It is global: no rank or world size in it."""
    sampler = DistributedSampler(range(n), num_replicas=1, rank=0, shuffle=shuffle, seed=seed, drop_last=False)
    sampler.set_epoch(epoch)
    return np.fromiter(iter(sampler), dtype=np.int64, count=len(sampler))


def repeat(i: int) -> int:
    """Mark plan entry ``i`` (a sample or chunk index) as a zero-weight repeat: ``~i``, always negative."""
    return ~i if i >= 0 else i


def entry(i: int) -> tuple[int, bool]:
    """(index, is_repeat) of a plan entry."""
    return (i, False) if i >= 0 else (~i, True)


def _index(entries: np.ndarray) -> np.ndarray:
    """Plan entries -> sample indices (repeats decoded)."""
    return np.where(entries < 0, ~entries, entries)


def global_rows(source: MmapSource, *, epoch: int, cfg) -> list:
    """Every row of ``epoch`` for all ranks together, in training order: a function of (seed, epoch, seq_len, packing,
    shuffle, the source's lengths) only. A row is a list of sample indices (packed), one sample index (padding,
    bucket) or one chunk index (text in packed mode, see ``text_chunks``)."""
    t = cfg.seq_len
    if text_chunks(source, cfg):
        if not source.contiguous:
            raise ValueError(f"{source.prefix}.idx: sequences are not stored back to back; re-run the conversion")
        return sample_order(source.num_tokens // t, seed=cfg.seed, epoch=epoch, shuffle=cfg.shuffle).tolist()
    order = sample_order(len(source), seed=cfg.seed, epoch=epoch, shuffle=cfg.shuffle)
    lengths = np.minimum(source.sizes, t)[order]
    if cfg.packing == "packed":  # lengths only, no token read
        return [[int(order[p]) for p in row] for row in pack_lengths(lengths, t, cfg.pack_window)]
    if cfg.packing == "bucket":
        # Length-grouped global batches (same rng on every rank). Full ones first in shuffled order, then the partial
        # tails of the megabatches, so every global batch but the last holds samples of similar length.
        rng = np.random.default_rng([cfg.seed, epoch, 1])
        batches = bucket_order(lengths, cfg.global_batch, rng)
        batches = [bt for bt in batches if len(bt) == cfg.global_batch] + [
            bt for bt in batches if len(bt) < cfg.global_batch
        ]
        return [int(order[p]) for bt in batches for p in bt]
    return order.tolist()


def make_plan(source: MmapSource, *, epoch: int, cfg) -> tuple[list, PackingStats]:
    """This rank's batches for ``epoch`` (the same count on every rank) and the packing stats of its rows.

    ``cfg`` carries seq_len, micro_batch_size, rank, world_size, global_batch, seed, packing, shuffle, drop_last,
    pack_window. The epoch's rows (``global_rows``) are cut into optimizer steps of ``global_batch`` rows; micro step
    ``k`` of the run takes the next ``micro_batch_size x world_size`` rows and rank ``r`` the ``r``-th
    ``micro_batch_size`` of them. So after any number of micro steps the ranks together have consumed a prefix of
    the rows, and 1 rank x 4 accumulation, 2 x 2 and 4 x 1 train on the same global batches.

    drop_last=True drops the epoch's last partial optimizer step (a few samples per epoch are skipped, none repeats).
    drop_last=False pads the rows to whole micro steps by repeating the first rows as zero-weight repeats (``~i``):
    they run through the model, so every rank does the same number of forward passes (ZeRO-3 needs that), but carry
    no targets, so an evaluation counts every sample exactly once.

    A batch is a list of rows (each a list of sample indices) when packed, a list of sample indices otherwise, or a
    list of chunk indices for text data in packed mode.
    """
    b, w = cfg.micro_batch_size, cfg.world_size
    rows, unit = global_rows(source, epoch=epoch, cfg=cfg), b * w
    chunks, packed = text_chunks(source, cfg), cfg.packing == "packed"
    what = f"{source.num_tokens // cfg.seq_len} chunks of {cfg.seq_len} tokens" if chunks else f"{len(source)} samples"
    if cfg.drop_last:
        rows = rows[: len(rows) // cfg.global_batch * cfg.global_batch]
    else:  # whole micro steps: wrap around with zero-weight repeats
        extra = [rows[i % len(rows)] for i in range(-len(rows) % unit)] if rows else []
        rows = rows + [[repeat(s) for s in r] if packed and not chunks else repeat(r) for r in extra]
    nb = len(rows) // unit
    _check_nonempty(nb, what, cfg)
    plan = [rows[j * unit + cfg.rank * b : j * unit + (cfg.rank + 1) * b] for j in range(nb)]
    mine = [s for bt in plan for r in bt for s in (r if packed and not chunks else [r])]
    if chunks:
        n = len(mine)
        return plan, PackingStats(samples=n, rows=n, real_tokens=n * cfg.seq_len, total_tokens=n * cfg.seq_len)
    lengths = np.minimum(source.sizes, cfg.seq_len)
    idx = np.asarray(mine, dtype=np.int64)
    real = int(lengths[_index(idx)].sum())
    if packed:
        total = nb * b * cfg.seq_len
    else:
        total = int(sum(len(bt) * lengths[_index(np.asarray(bt))].max() for bt in plan))
    own = idx[idx >= 0]  # this rank's real samples (repeats are another step's samples)
    trunc = source.sizes[own] > cfg.seq_len
    stats = PackingStats(
        samples=len(mine),
        rows=nb * b,
        real_tokens=real,
        total_tokens=total,
        truncated_samples=int(trunc.sum()),
        truncated_tokens=int((source.sizes[own][trunc] - cfg.seq_len).sum()),
    )
    return plan, stats


def text_chunks(source: MmapSource, cfg) -> bool:
    """Plain text (no loss mask) in packed mode is cut into Megatron-style contiguous chunks of seq_len tokens."""
    return cfg.packing == "packed" and not source.has_loss_mask


def _check_nonempty(nb: int, what: str, cfg) -> None:
    if nb == 0:
        step = cfg.global_batch if cfg.drop_last else cfg.micro_batch_size * cfg.world_size
        raise ValueError(
            f"loader: {what} give no full step of {step} rows (world_size={cfg.world_size} x "
            f"micro_batch_size={cfg.micro_batch_size}, global batch {cfg.global_batch}) at seq_len={cfg.seq_len}; "
            "use more data, a smaller global batch, or drop_last=False"
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
