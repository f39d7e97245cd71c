"""Weighted mixtures: several sources blended into one map-style source, with Megatron ``BlendedDataset`` semantics.

A mixture ``[{"path": A, "weight": 0.75}, {"path": B, "weight": 0.25}]`` becomes one :class:`BlendedSource` that
looks to ``mmap_source.make_plan`` like one more mmap source (``sizes`` + ``sample``/``pieces``), so packing,
padding, bucketing, the equal batch counts per rank, exact resume and the batch layout are the single-source code,
not a copy of it.

The order is a function of ``(seed, shuffle, the sources' unit counts, the weights)`` over *global* positions only,
never of the rank or the world size (the loader then packs and deals them to ranks as it does for one source):

- **Which source** fills global position ``g = epoch * N + p`` (``N`` = the units of all sources together, one loader
  epoch): Megatron's ``build_blending_indices`` (``megatron/core/datasets/helpers.cpp``) over ``p`` in ``[0, N)``:
  each position goes to the source whose drawn share is furthest below its weight, so every prefix of the sequence
  holds each source within about one sample of ``weight x length``. With shuffling on, positions are then shuffled
  within windows of 128 (the interleave is periodic, and each rank takes a fixed slice of every step's rows).
- **Which unit** of that source: its ``k``-th draw overall (epochs before this one included) is unit ``k % n`` of
  its epoch ``k // n`` in a permutation seeded by ``(seed, source, that epoch)``. A source drawn more than its size
  repeats, its epochs counted (:meth:`BlendedSource.source_epochs`); a large source with a small weight is seen in
  part per loader epoch and continues where it stopped in the next.

A *unit* is what one draw takes: a sample (SFT data, or any data in padding/bucket mode; truncated to ``seq_len`` by
the packer) or, for plain text in packed mode, one ``seq_len``-token chunk (mmap: Megatron-style contiguous chunks
across documents; WebDataset: each document cut into ``seq_len`` pieces, as the streaming path does). A chunk is
returned as its document pieces, so position ids restart and attention is blocked at every document start, exactly
as in a single text source.

WebDataset sources in a mixture are read map-style (random access into the memory-mapped tar shards, member offsets
found from the tar headers once per shard and process), not streamed: the blend is then exact for them too (every
draw is the planned sample; resume and epoch counts are exact, with no shuffle buffer or per-worker slots). The cost
is random reads across shards, so shards must be on a local or network file system (they already are: the loader
memory-maps them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_tools.loading import mmap_source, webdataset_source

SHUFFLE_WINDOW = 128  # positions shuffled together (see BlendedSource.window_order)


@dataclass(frozen=True)
class MixtureItem:
    """One source of a mixture as ``build_dataloader`` takes it: ``{"path", "weight", "name"}``."""

    path: str
    weight: float
    name: str


def default_name(path: str | Path) -> str:
    """The name a source gets in ``source_counts`` and per-source eval keys: its file or folder name without data
    suffixes (``data/chat.jsonl`` -> ``chat``; ``wds/index.json`` -> ``wds``)."""
    p = Path(str(path).rstrip("/"))
    if p.name == "index.json":
        p = p.parent
    name = p.name
    for suffix in (".gz", ".jsonl", ".json", ".parquet", ".arrow", ".csv"):
        name = name.removesuffix(suffix)
    return name or str(path)


def parse_mixture(items: Sequence, where: str = "source") -> list[MixtureItem]:
    """Validate a mixture list (dicts with ``path``, ``weight`` and an optional ``name``).

    Args:
        items: ``[{"path": A, "weight": 0.7}, {"path": B, "weight": 0.3}]``.
        where: how errors name the list (``data.train`` in the training config).

    Raises:
        ValueError: ``{where}[i].weight ...`` for a weight that is not a finite number >= 0, all weights zero, an
            unknown key, a missing path, or two sources with the same name.
    """
    if not isinstance(items, list | tuple) or not items:
        raise ValueError(f"{where}: expected a non-empty list of {{'path', 'weight'}} items, got {items!r}")
    out = []
    for i, item in enumerate(items):
        key = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise ValueError(f"{key}={item!r}: expected a mapping {{path: ..., weight: ...}}")
        unknown = set(item) - {"path", "weight", "name"}
        if unknown:
            raise ValueError(f"{key}: unknown key(s) {sorted(unknown)}; an item has path, weight and optional name")
        path = item.get("path")
        if not isinstance(path, str | Path) or not str(path):
            raise ValueError(f"{key}.path is missing: give the source's path")
        w = item.get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
            raise ValueError(f"{key}.weight={w!r}: expected a finite number >= 0")
        if w < 0:
            raise ValueError(f"{key}.weight={w!r} is negative; weights are shares, use a number >= 0")
        out.append(MixtureItem(str(path), float(w), str(item.get("name") or default_name(path))))
    if sum(m.weight for m in out) <= 0:
        raise ValueError(f"{where}: every weight is 0; give at least one source a weight > 0")
    names = [m.name for m in out]
    for i, n in enumerate(names):
        if names.index(n) != i:
            raise ValueError(
                f"{where}[{i}]: the name {n!r} is also {where}[{names.index(n)}]'s; set {where}[{i}].name to tell "
                "them apart (names key source_counts and the per-source eval losses)"
            )
    return out


def blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Megatron's ``build_blending_indices``: which source fills each of ``size`` positions, and its draw number.

    Position ``p`` goes to the source with the largest error ``weight * max(p, 1) - drawn so far`` (ties: the lower
    index), which keeps every prefix within one sample per source of its target share.

    Returns:
        ``(source_index int16, draw_index int64)``, each of length ``size``.
    """
    w = np.asarray(weights, dtype=np.float64)
    w = (w / w.sum()).tolist()
    drawn = [0] * len(w)
    source = np.empty(size, dtype=np.int16)
    draw = np.empty(size, dtype=np.int64)
    order = range(len(w))
    for p in range(size):  # sequential by nature; ~0.5 us per position and source, cached per loader
        x = float(max(p, 1))
        best = max(order, key=lambda i: (w[i] * x - drawn[i], -i))
        source[p] = best
        draw[p] = drawn[best]
        drawn[best] += 1
    return source, draw


class _MmapUnits:
    """The units of an mmap prefix: its sequences, or its contiguous ``seq_len`` chunks (text in packed mode)."""

    def __init__(self, src: mmap_source.MmapSource, cfg):
        self.src, self.seq_len = src, cfg.seq_len
        self.chunks = mmap_source.text_chunks(src, cfg)
        if self.chunks:
            if not src.contiguous:
                raise ValueError(f"{src.prefix}.idx: sequences are not stored back to back; re-run the conversion")
            self.sizes = np.full(src.num_tokens // cfg.seq_len, cfg.seq_len, dtype=np.int64)
        else:
            self.sizes = src.sizes

    def pieces(self, j: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
        if not self.chunks:
            return [self.src.sample(j, self.seq_len)]
        ids, pos = self.src.chunk(j, self.seq_len)
        starts = np.flatnonzero(pos == 0).tolist() + [len(ids)]
        return [(ids[a:b], None) for a, b in zip(starts[:-1], starts[1:], strict=True)]


class _WebDatasetUnits:
    """The units of a WebDataset index, read map-style: samples (truncated by the packer), or for text in packed
    mode each document's ``seq_len`` pieces (what the streaming path makes of it)."""

    def __init__(self, src: webdataset_source.WebDatasetSource, cfg):
        self.src, self.seq_len = src, cfg.seq_len
        lengths = src.sample_lengths()
        self.shard_start = np.cumsum([0] + [len(x) for x in lengths])[:-1]
        flat = np.concatenate([np.zeros(0, np.int64), *lengths])
        self.pieces_mode = cfg.packing == "packed" and not src.has_loss_mask
        if self.pieces_mode:
            counts = np.maximum(1, -(-flat // cfg.seq_len))
            self.unit_sample = np.repeat(np.arange(len(flat)), counts)
            self.unit_offset = (np.arange(len(self.unit_sample)) - np.repeat(np.cumsum(counts) - counts, counts)) * (
                cfg.seq_len
            )
            self.sizes = np.minimum(flat[self.unit_sample] - self.unit_offset, cfg.seq_len)
        else:
            self.unit_sample = np.arange(len(flat))
            self.unit_offset = np.zeros(len(flat), dtype=np.int64)
            self.sizes = flat
        self._shards: dict[int, list] = {}

    def __getstate__(self):
        return {**self.__dict__, "_shards": {}}  # memory maps are reopened in each DataLoader worker

    def _sample(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        shard = int(np.searchsorted(self.shard_start, i, side="right") - 1)
        if shard not in self._shards:
            url = self.src.shards[shard]
            self._shards[shard] = [
                webdataset_source._decode(s)[1:] for s in webdataset_source.tar_samples([{"url": url}])
            ]
        return self._shards[shard][i - int(self.shard_start[shard])]

    def pieces(self, j: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
        ids, lm = self._sample(int(self.unit_sample[j]))
        a = int(self.unit_offset[j])
        t = self.seq_len
        return [(ids[a : a + t], lm[a : a + t] if lm is not None else None)]


def open_units(path: str | Path, cfg):
    """The units of one resolved source (mmap prefix, or WebDataset ``index.json`` or its folder)."""
    p = Path(path)
    if p.is_dir() and (p / "index.json").is_file():
        p = p / "index.json"
    if p.suffix == ".json":
        return _WebDatasetUnits(webdataset_source.WebDatasetSource(p), cfg)
    return _MmapUnits(mmap_source.MmapSource(p), cfg)


class BlendedSource:
    """Several sources as one: an epoch's blended positions look to ``make_plan`` like an mmap source's samples.

    Attributes:
        items: the mixture (path, weight, name per source).
        units: per source, its unit reader (``sizes`` and ``pieces(j)``).
        epoch_size: ``N``, positions per loader epoch (the units of all sources together).
        per_epoch: draws per source in one epoch (``blending_indices``' counts over ``N``).
    """

    def __init__(self, items: list[MixtureItem], cfg):
        self.items = items
        self.units = [open_units(m.path, cfg) for m in items]
        self.seed, self.shuffle = cfg.seed, cfg.shuffle
        for m, u in zip(items, self.units, strict=True):
            if len(u.sizes) == 0 and m.weight > 0:
                raise ValueError(f"mixture source {m.name!r} ({m.path}) holds no sample; remove it or give it weight 0")
        self.epoch_size = int(sum(len(u.sizes) for u in self.units))
        self.source_index, self.draw_index = blending_indices([m.weight for m in items], self.epoch_size)
        self.per_epoch = np.bincount(self.source_index, minlength=len(items)).astype(np.int64)
        self.prefix = "mixture(" + ", ".join(f"{m.name}={m.weight:g}" for m in items) + ")"  # for error messages
        self.has_loss_mask = True  # every unit is a sample to the planner (text chunks arrive as whole rows)
        self.contiguous = True

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.items]

    def unit_counts(self) -> list[int]:
        """Units of each source (samples, or text chunks in packed mode)."""
        return [len(u.sizes) for u in self.units]

    def fingerprint(self) -> list[dict]:
        """What fixes the blended order besides seed and shuffle: each source's name, share (its weight normalised:
        weights 3 and 1 blend as 0.75 and 0.25 do) and unit count."""
        total = sum(m.weight for m in self.items)
        return [
            {"name": m.name, "share": round(m.weight / total, 12), "units": n}
            for m, n in zip(self.items, self.unit_counts(), strict=True)
        ]

    def source_epochs(self, drawn: Sequence[int]) -> list[float]:
        """Passes over each source that ``drawn`` draws per source amount to (a small source's repeats)."""
        return [d / n if n else 0.0 for d, n in zip(drawn, self.unit_counts(), strict=True)]

    def units_of(self, epoch: int) -> np.ndarray:
        """Unit index (within its source) of every position of loader epoch ``epoch``: its draw number over the
        whole run, mapped through the per-source-epoch permutation it falls in."""
        out = np.empty(self.epoch_size, dtype=np.int64)
        for s, u in enumerate(self.units):
            mine = self.source_index == s
            if not mine.any():
                continue
            n = len(u.sizes)
            k = epoch * int(self.per_epoch[s]) + self.draw_index[mine]  # the k-th draw of source s since the start
            src_epoch, r = k // n, k % n
            if self.shuffle:
                units = np.empty_like(r)
                for e in np.unique(src_epoch):
                    at = src_epoch == e
                    units[at] = np.random.default_rng([self.seed, s, int(e)]).permutation(n)[r[at]]
            else:
                units = r
            out[mine] = units
        return out

    def window_order(self, epoch: int) -> np.ndarray:
        """Positions of epoch ``epoch`` shuffled within consecutive windows of :data:`SHUFFLE_WINDOW` (identity
        without shuffle). Why: the interleave is periodic (0.75/0.25 is A A A B ...), and each rank takes a fixed slice
        of every micro step's rows, so without it one rank could see mostly A. Inside a window the shares are
        already exact, so every prefix of the epoch stays within one window's rounding of the weights."""
        n = self.epoch_size
        if not self.shuffle:
            return np.arange(n)
        keys = np.random.default_rng([self.seed, epoch, 0xB1E4D]).random(n)
        return np.lexsort((keys, np.arange(n) // SHUFFLE_WINDOW))

    def epoch_view(self, epoch: int) -> BlendedEpoch:
        return BlendedEpoch(self, epoch)


class BlendedEpoch:
    """Loader epoch ``epoch`` of a :class:`BlendedSource`, in the shape ``mmap_source.make_plan`` reads: position
    ``p`` is a sample of ``sizes[p]`` tokens whose tokens come from ``pieces(p)``; ``source_of[p]`` is its source."""

    def __init__(self, blend: BlendedSource, epoch: int):
        self.blend, self.epoch = blend, epoch
        order = blend.window_order(epoch)
        self.source_of = blend.source_index[order]
        self.unit = blend.units_of(epoch)[order]
        self.sizes = np.empty(blend.epoch_size, dtype=np.int64)
        for s, u in enumerate(blend.units):
            mine = self.source_of == s
            self.sizes[mine] = u.sizes[self.unit[mine]]
        self.prefix, self.has_loss_mask, self.contiguous = blend.prefix, True, True
        self.num_sources = len(blend.items)

    def __len__(self) -> int:
        return len(self.sizes)

    def pieces(self, p: int, seq_len: int) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """The tokens of position ``p`` (one sample, or a text chunk's document pieces), within ``seq_len``."""
        pieces = self.blend.units[int(self.source_of[p])].pieces(int(self.unit[p]))
        out, room = [], seq_len
        for ids, lm in pieces:  # truncation as the single-source path does it
            if room <= 0:
                break
            out.append((ids[:room], lm[:room] if lm is not None else None))
            room -= len(out[-1][0])
        return out

    def sample(self, p: int, seq_len: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Position ``p`` as one sample (padding/bucket modes, where a unit is always one piece)."""
        return self.pieces(p, seq_len)[0]
