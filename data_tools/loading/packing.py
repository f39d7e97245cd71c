"""Packing samples into rows and turning rows into model-ready batches (pure numpy, then one torch.from_numpy).

A *row* is a list of ``(input_ids, loss_mask)`` pairs that fit in ``seq_len`` tokens. Rows become batches dicts:
``input_ids``, ``labels`` (-100 where the loss mask is 0, on padding and on the first token of every packed sample),
``position_ids`` (reset to 0 at every sample) and the attention information of the chosen mode:

- ``mask``: ``attention_mask``, a dense (B, 1, T, T) bool block-diagonal causal mask (``block_causal_mask``).
- ``position_ids``: no mask. The resets in ``position_ids`` are the boundaries (transformers builds sdpa/eager/flex
  masks from them), and ``varlen_kwargs`` adds them ready for variable-length kernels: ``cu_seq_lens_q/k`` (int32
  offsets into the flattened B*T tokens) and ``max_length_q/k`` (Python ints). transformers' flash-attn path uses
  them for any batch size; without them it detects packing only at batch size 1 (``_is_packed_sequence`` in
  transformers 5.23) and runs plain causal attention over rows of micro batches > 1, mixing their samples.
  ``dsft_varlen`` reads them too, so no layer has to sync the device to find the boundaries.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import asdict, dataclass

import numpy as np
import torch

IGNORE_INDEX = -100
PACKING_MODES = ("packed", "padding", "bucket")
ATTENTION_MODES = ("mask", "position_ids")


@dataclass
class PackingStats:
    """Counters of what the packer did; ``real_tokens / total_tokens`` is the padding efficiency."""

    samples: int = 0
    rows: int = 0
    real_tokens: int = 0
    total_tokens: int = 0
    truncated_samples: int = 0
    truncated_tokens: int = 0

    @property
    def efficiency(self) -> float:
        return self.real_tokens / self.total_tokens if self.total_tokens else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "efficiency": self.efficiency}


class FirstFitPacker:
    """Streaming first-fit bin packer: each sample goes into the first open row with room, never split.

    Only the ``window`` most recent rows stay open; opening one more emits the oldest. A bounded window keeps the
    cost per sample O(window) and makes it work on streams (WebDataset) as well as on a known list (mmap), while
    first-fit over 64 open rows already fills >= 97% of tokens on SFT-like lengths (see benchmarks/loader_throughput).
    Rows are emitted in the order they were opened, except rows that fill up exactly, which go out at once; either
    way the output is a deterministic function of the input order.
    """

    def __init__(self, capacity: int, window: int = 64):
        if capacity < 1 or window < 1:
            raise ValueError(f"FirstFitPacker: capacity={capacity} and window={window} must be >= 1")
        self.capacity = capacity
        self.window = window
        self._rows: list[list[Hashable]] = []
        self._room: list[int] = []

    def add(self, item, length: int) -> list[list]:
        """Place ``item`` of ``length`` tokens (already <= capacity); return the rows this closed (possibly none)."""
        if length > self.capacity:
            raise ValueError(f"sample of {length} tokens exceeds the row capacity {self.capacity}; truncate it first")
        for i, room in enumerate(self._room):
            if room >= length:
                self._rows[i].append(item)
                self._room[i] = room - length
                if self._room[i] == 0:  # a full row can take nothing more: emit it at once
                    self._room.pop(i)
                    return [self._rows.pop(i)]
                return []
        if length == self.capacity:  # a sample that fills a row alone: emit it now, keep the open rows
            return [[item]]
        self._rows.append([item])
        self._room.append(self.capacity - length)
        if len(self._rows) > self.window:
            self._room.pop(0)
            return [self._rows.pop(0)]
        return []

    def flush(self) -> list[list]:
        """Emit every open row (end of the input)."""
        rows, self._rows, self._room = self._rows, [], []
        return rows


def pack_lengths(lengths: Iterable[int], capacity: int, window: int = 64) -> list[list[int]]:
    """Pack positions ``0..n-1`` with the given lengths (each <= capacity) into rows, first-fit; see FirstFitPacker."""
    packer = FirstFitPacker(capacity, window)
    rows: list[list[int]] = []
    for i, length in enumerate(lengths):
        rows.extend(packer.add(i, int(length)))
    rows.extend(packer.flush())
    return rows


_TRIL_CACHE: dict[int, np.ndarray] = {}


def _tril(n: int) -> np.ndarray:
    if n not in _TRIL_CACHE:
        _TRIL_CACHE[n] = np.tril(np.ones((n, n), dtype=bool))
    return _TRIL_CACHE[n]


def block_causal_mask(position_ids: np.ndarray) -> np.ndarray:
    """(B, T) position ids -> (B, 1, T, T) bool mask, True = attend: causal within each run that starts at 0.

    Only the diagonal blocks are written (sum of L^2 per row, not T^2), on a zero-filled (calloc) array. Padding at the
    end of a row is its own block so no query row is fully masked (that would make SDPA return NaN).
    """
    b, t = position_ids.shape
    mask = np.zeros((b, 1, t, t), dtype=bool)
    tril = _tril(t)
    for r in range(b):
        starts = np.flatnonzero(position_ids[r] == 0).tolist() + [t]
        if starts[0] != 0:
            raise ValueError("position_ids must start at 0 in every row")
        for s, e in zip(starts[:-1], starts[1:], strict=True):
            mask[r, 0, s:e, s:e] = tril[: e - s, : e - s]
    return mask


def varlen_boundaries(position_ids: np.ndarray) -> tuple[np.ndarray, int]:
    """(B, T) position ids -> (int32 offsets ``[0, s1, ..., B*T]`` of the samples in the flattened B*T tokens, the
    longest sample's length). A sample starts wherever the position id is 0; rows never merge because every row
    starts at 0 (checked), and a padding tail is its own sample (it restarts at 0 too).

    Raises:
        ValueError: a row that does not start at position 0 (its first tokens would join the previous row's last
            sample in the flattened layout).
    """
    pos = np.asarray(position_ids)
    if pos.ndim != 2 or pos.shape[1] == 0:
        raise ValueError(f"position_ids must be (batch, seq_len) with seq_len >= 1, got shape {pos.shape}")
    if (pos[:, 0] != 0).any():
        raise ValueError("position_ids must start at 0 in every row")
    cu = np.append(np.flatnonzero(pos.reshape(-1) == 0), pos.size).astype(np.int32)
    return cu, int(np.diff(cu).max())


def varlen_kwargs(position_ids: np.ndarray) -> dict:
    """The keyword arguments transformers' flash-attn path (``_flash_attention_forward``) and ``dsft_varlen`` take
    for packed rows: ``cu_seq_lens_q/k`` (int32 tensors, see ``varlen_boundaries``) and ``max_length_q/k`` (ints:
    a tensor would need a device->host sync in every layer). Self-attention, so q and k share them."""
    cu, max_len = varlen_boundaries(position_ids)
    cu_t = torch.from_numpy(cu)
    return {"cu_seq_lens_q": cu_t, "cu_seq_lens_k": cu_t, "max_length_q": max_len, "max_length_k": max_len}


def collate_packed(rows: list[list[tuple[np.ndarray, np.ndarray | None]]], seq_len: int, pad_id: int, attention: str):
    """Rows of ``(input_ids, loss_mask or None)`` samples (each <= seq_len) -> a packed batch of shape (B, seq_len)."""
    b = len(rows)
    input_ids = np.full((b, seq_len), pad_id, dtype=np.int64)
    labels = np.full((b, seq_len), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.empty((b, seq_len), dtype=np.int64)
    arange = np.arange(seq_len, dtype=np.int64)
    real = 0
    for r, row in enumerate(rows):
        off = 0
        for ids, loss_mask in row:
            n = len(ids)
            input_ids[r, off : off + n] = ids
            lab = labels[r, off : off + n]
            if loss_mask is None:
                lab[:] = ids
            else:
                np.copyto(lab, input_ids[r, off : off + n], where=loss_mask.astype(bool))
            # The first token of a packed sample is never a target: otherwise the last token of the previous
            # sample would learn to predict it (HF shifts labels left by one inside the model).
            lab[0] = IGNORE_INDEX
            position_ids[r, off : off + n] = arange[:n]
            off += n
        real += off
        position_ids[r, off:] = arange[: seq_len - off]  # padding tail: its own run, never a target
    return _finish(input_ids, labels, position_ids, real, attention)


def collate_chunks(input_ids: np.ndarray, position_ids: np.ndarray, attention: str) -> dict:
    """Megatron-style text chunks (B, T) with position ids already reset at document starts -> a batch; every
    token is a target except a document's (or chunk's) first, which nothing before it may predict."""
    input_ids = input_ids.astype(np.int64, copy=False)
    labels = input_ids.copy()
    labels[position_ids == 0] = IGNORE_INDEX
    return _finish(input_ids, labels, position_ids, int(input_ids.size), attention)


def _finish(input_ids, labels, position_ids, real: int, attention: str) -> dict:
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(position_ids),
        "num_real_tokens": int(real),
    }
    if attention == "mask":
        batch["attention_mask"] = torch.from_numpy(block_causal_mask(position_ids))
    elif attention == "position_ids":
        # flash-attn and dsft_varlen use these; sdpa, eager and flex get them in **kwargs and ignore them
        batch.update(varlen_kwargs(position_ids))
    else:
        raise ValueError(f"attention={attention!r}: expected one of {ATTENTION_MODES}")
    return batch


def collate_padded(
    samples: list[tuple[np.ndarray, np.ndarray | None]], pad_id: int, multiple: int = 1, cap: int | None = None
) -> dict:
    """Samples (each already <= seq_len) -> a batch padded to the longest one, rounded up to ``multiple`` (at most
    ``cap``), with a 2D 0/1 attention mask.

    Rounding bounds the distinct batch shapes: a compiled kernel (FlexAttention, torch.compile) recompiles for every
    new length, and on a GPU multiples of 64 also keep the matmuls on full tensor-core tiles.
    """
    b, t = len(samples), max(len(s[0]) for s in samples)
    t = max(t, min(-(-t // multiple) * multiple, cap if cap is not None else t + multiple))
    input_ids = np.full((b, t), pad_id, dtype=np.int64)
    labels = np.full((b, t), IGNORE_INDEX, dtype=np.int64)
    attention_mask = np.zeros((b, t), dtype=np.int64)
    position_ids = np.broadcast_to(np.arange(t, dtype=np.int64), (b, t)).copy()
    real = 0
    for r, (ids, loss_mask) in enumerate(samples):
        n = len(ids)
        input_ids[r, :n] = ids
        if loss_mask is None:
            labels[r, :n] = ids
        else:
            np.copyto(labels[r, :n], input_ids[r, :n], where=loss_mask.astype(bool))
        labels[r, 0] = IGNORE_INDEX  # the same rule as packed rows (HF ignores it anyway after the shift)
        attention_mask[r, :n] = 1
        real += n
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(position_ids),
        "attention_mask": torch.from_numpy(attention_mask),
        "num_real_tokens": int(real),
    }


def bucket_order(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, megabatch_mult: int = 50) -> list:
    """Length-grouped batches of positions: sort within megabatches of ``50 * batch_size`` (as HF's
    LengthGroupedSampler does), cut into batches, shuffle the batch order. Returns a list of position lists."""
    n = len(lengths)
    mega = batch_size * megabatch_mult
    batches = []
    for s in range(0, n, mega):
        idx = np.arange(s, min(s + mega, n))
        idx = idx[np.argsort(-lengths[idx], kind="stable")]
        batches.extend(idx[i : i + batch_size].tolist() for i in range(0, len(idx), batch_size))
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]
