"""Streaming path: WebDataset tar shards described by a dsft ``index.json``.

Shards are split by rank and by DataLoader worker ("slots") with a deterministic, sample-count-balanced assignment
(no ``torch.distributed`` call: rank and world size are arguments). Each slot streams its own shards once in an
epoch-shuffled order and then keeps *resampling its own shards* (webdataset's ``resampled`` idea, restricted to the
slot so ranks never read each other's samples). The loader cuts every rank's stream at the same epoch length, computed
from the index, so all ranks yield the same number of batches however uneven the shards are.
"""

from __future__ import annotations

import io
import json
import math
import mmap
import os
import random
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from data_tools.loading.packing import FirstFitPacker, PackingStats, collate_packed, collate_padded

INDEX_FORMAT = "dsft-webdataset/1"


class WebDatasetSource:
    """A parsed ``index.json``: shard paths (absolute), samples per shard, whether samples carry a loss mask."""

    def __init__(self, index_path: str | Path):
        self.index_path = Path(index_path)
        try:
            index = json.loads(self.index_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{self.index_path}: cannot read the WebDataset index ({e})") from e
        if index.get("format") != INDEX_FORMAT:
            raise ValueError(f"{self.index_path}: format {index.get('format')!r}, expected {INDEX_FORMAT!r}")
        root = self.index_path.parent.resolve()
        self.shards = [str((root / s["path"]).resolve()) for s in index["shards"]]
        for entry, path in zip(index["shards"], self.shards, strict=True):
            # An index may come from elsewhere: never let it point the reader at files outside its own folder.
            if not Path(path).is_relative_to(root):
                raise ValueError(
                    f"{self.index_path}: shard path {entry['path']!r} resolves outside the index folder {root}; "
                    "shard paths must be relative and stay inside it"
                )
        self.samples = [int(s["samples"]) for s in index["shards"]]
        self.has_loss_mask = bool(index.get("has_loss_mask", False))
        self.total_samples = int(index.get("total_samples", sum(self.samples)))
        if self.total_samples != sum(self.samples):
            raise ValueError(f"{self.index_path}: total_samples {self.total_samples} != sum of shard samples")
        self._lengths: list[np.ndarray] | None = None

    def sample_lengths(self) -> list[np.ndarray]:
        """Token count of every sample, per shard, read from tar and .npy headers only (no token data is read)."""
        if self._lengths is None:
            self._lengths = [_npy_lengths(p) for p in self.shards]
        return self._lengths


def _npy_lengths(path: str) -> np.ndarray:
    """Token count of every sample of one shard, from the .npy headers (the token data is never touched)."""
    return np.asarray(
        [len(load_npy_1d(data)) for name, data in _tar_members(_map_file(path)) if name.endswith(".input_ids.npy")],
        dtype=np.int64,
    )


def _map_file(path: str):
    """The file memory-mapped read-only (b"" when empty); the map closes when nothing views it any more."""
    with open(path, "rb") as fh:
        return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(fh.fileno()).st_size else b""


def assign_slots(samples_per_shard: list[int], n_slots: int) -> list[list[int]]:
    """Shard indices per slot, balancing sample counts (largest shard first onto the least loaded slot)."""
    if len(samples_per_shard) < n_slots:
        raise ValueError(
            f"WebDataset: {len(samples_per_shard)} shards for {n_slots} readers (world_size x max(1, num_workers)); "
            "every reader needs at least one shard. Write more, smaller shards (dsft-convert --shard-size) or use "
            "fewer DataLoader workers"
        )
    load = [0] * n_slots
    slots: list[list[int]] = [[] for _ in range(n_slots)]
    for i in sorted(range(len(samples_per_shard)), key=lambda i: (-samples_per_shard[i], i)):
        k = min(range(n_slots), key=lambda k: (load[k], k))
        slots[k].append(i)
        load[k] += samples_per_shard[i]
    return [sorted(s) for s in slots]


def epoch_batches(source: WebDatasetSource, slots: list[list[int]], cfg) -> int:
    """Batches per rank per epoch: the fullest slot's first pass, times the workers per rank.

    padding/bucket: ``ceil(samples / B)`` exactly. packed: ``ceil(tokens / (B * T))``, a lower bound on its rows since
    packing leaves ~2-3% empty, so the fullest slot may carry its last few rows into the resampled tail.
    """
    b, t = cfg.micro_batch_size, cfg.seq_len
    if cfg.packing == "packed":
        lengths = source.sample_lengths()
        # text documents are cut into pieces (all tokens count), SFT samples truncated to seq_len
        cap = None if not source.has_loss_mask else t
        per_slot = [
            math.ceil(sum(int(np.minimum(lengths[i], cap or lengths[i]).sum()) for i in s) / (b * t)) for s in slots
        ]
    else:
        per_slot = [math.ceil(sum(source.samples[i] for i in s) / b) for s in slots]
    return max(1, cfg.num_workers) * max(per_slot)


_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")  # webdataset's base_plus_ext: key = up to the first dot
_ZERO_BLOCK = bytes(512)


def _tar_members(buf) -> Iterator[tuple[str, memoryview]]:
    """(name, data) of the regular files of an uncompressed tar in ``buf``, without copying the data.

    Why not ``tarfile``: it spends ~240 us per member on the PAX headers ``webdataset.TarWriter`` writes (profiled:
    ~1 ms per 2-member sample, capping the stream at ~0.3M tokens/s); this walk costs a few us per member. It reads
    ustar, PAX (``path``/``size`` records) and GNU long names, and skips everything that is not a regular file.
    """
    view, off, n = memoryview(buf), 0, len(buf)
    long_name = None
    pax: dict[str, str] = {}
    while off + 512 <= n:
        header = view[off : off + 512]
        if header == _ZERO_BLOCK:
            break
        raw_size = bytes(header[124:136])
        size = int.from_bytes(raw_size[1:], "big") if raw_size[0] & 0x80 else int(raw_size.strip(b"\0 ") or b"0", 8)
        size = int(pax.get("size", size))
        typeflag = bytes(header[156:157])
        data = view[off + 512 : off + 512 + size]
        off += 512 + (size + 511) // 512 * 512
        if typeflag == b"x":  # PAX extended header for the next member
            for record in bytes(data).decode("utf-8", "replace").split("\n"):
                if "=" in record:
                    k, v = record.split(" ", 1)[1].split("=", 1)
                    pax[k] = v
            continue
        if typeflag == b"L":  # GNU long name of the next member
            long_name = bytes(data).rstrip(b"\0").decode("utf-8", "replace")
            continue
        if typeflag in (b"0", b"\0", b"7"):
            name = pax.get("path") or long_name
            if name is None:
                name = bytes(header[0:100]).split(b"\0", 1)[0].decode("utf-8", "replace")
                prefix = bytes(header[345:500]).split(b"\0", 1)[0].decode("utf-8", "replace")
                name = f"{prefix}/{name}" if prefix and bytes(header[257:262]) == b"ustar" else name
            yield name, data
        long_name, pax = None, {}


def tar_samples(src: Iterable[dict]) -> Iterator[dict]:
    """Drop-in for ``webdataset.tarfile_to_samples()``: {"url"} dicts in, samples ({"__key__", "__url__", ext:
    bytes-like}) out, grouping consecutive members by key the way webdataset does. Shards are memory-mapped."""
    for item in src:
        url = item["url"]
        sample: dict | None = None
        for name, data in _tar_members(_map_file(url)):
            m = _KEY_EXT.match(name)
            if m is None:
                continue
            key, ext = m.groups()
            if sample is None or sample["__key__"] != key:
                if sample is not None:
                    yield sample
                sample = {"__key__": key, "__url__": url}
            sample[ext] = data
        if sample is not None:
            yield sample


_NPY_HEADER = re.compile(r"\{'descr': '([^']+)', 'fortran_order': False, 'shape': \((\d+),\), \}")
_DTYPES: dict[str, np.dtype] = {}


def load_npy_1d(buf) -> np.ndarray:
    """A 1-D .npy as a zero-copy array; ``np.load`` (with ``allow_pickle=False``) for anything else.

    ``np.load`` costs ~170 us per array here (it ``ast.literal_eval``s the header); the header of a 1-D array is
    matched with one regex instead. Object dtypes are refused either way, so a crafted .npy never unpickles.
    """
    view = memoryview(buf)
    if bytes(view[:6]) == b"\x93NUMPY":
        start = 10 if view[6] == 1 else 12
        hlen = int.from_bytes(view[8:start], "little")
        m = _NPY_HEADER.match(bytes(view[start : start + hlen]).decode("latin1"))
        if m is not None:
            descr, count = m.groups()
            dtype = _DTYPES.get(descr)
            if dtype is None:
                dtype = _DTYPES.setdefault(descr, np.dtype(descr))
            if not dtype.hasobject:
                return np.frombuffer(view, dtype=dtype, count=int(count), offset=start + hlen)
    return np.load(io.BytesIO(bytes(view)), allow_pickle=False)


def _decode(sample: dict) -> tuple[str, np.ndarray, np.ndarray | None]:
    key = sample["__key__"]
    if key.startswith("/") or ".." in key.split("/"):
        # Harmless to us (nothing is extracted to disk) but the sign of a crafted shard: refuse it loudly.
        raise ValueError(f"{sample.get('__url__')}: tar member key {key!r} is absolute or contains '..'; refusing")
    lm = sample.get("loss_mask.npy")
    return key, load_npy_1d(sample["input_ids.npy"]), (load_npy_1d(lm) if lm is not None else None)


_PASS_END = object()  # marks the end of a slot's first pass in its sample stream (packed mode)


class WebDatasetStream(IterableDataset):
    """One rank's endless batch stream for one epoch; each DataLoader worker reads its own slot's shards."""

    def __init__(self, source: WebDatasetSource, slots: list[list[int]], cfg, epoch: int):
        self.source, self.cfg, self.epoch = source, cfg, epoch
        self.stats = PackingStats()  # of the batches made in this process (the main one when num_workers == 0)
        nw = max(1, cfg.num_workers)
        self.my_slots = slots[cfg.rank * nw : (cfg.rank + 1) * nw]

    def _samples(self, shard_ids: list[int], seed: list[int], mark_pass_end: bool = False):
        """The slot's samples: a first pass over its shards in an epoch-shuffled order, then its shards resampled
        forever. The shuffle buffer is drained at the end of the first pass so that every first-pass sample comes
        before any resampled one (the complete-coverage guarantee of padding mode relies on it); with
        ``mark_pass_end`` the first pass is followed by ``_PASS_END`` (the packer flushes its open rows there)."""
        cfg, rng = self.cfg, random.Random(str(seed))
        order = list(shard_ids)
        if cfg.shuffle:
            rng.shuffle(order)

        def resampled():
            while True:
                yield {"url": self.source.shards[rng.choice(shard_ids)]}

        for k, urls in enumerate(([{"url": self.source.shards[i]} for i in order], resampled())):
            stages = [lambda urls=urls: iter(urls), tar_samples]
            if cfg.shuffle:
                stages.append(wds.shuffle(cfg.shuffle_buffer, initial=min(cfg.shuffle_buffer, 100), seed=f"{seed}{k}"))
            stages.append(wds.map(_decode))
            yield from wds.DataPipeline(*stages)
            if k == 0 and mark_pass_end:
                yield _PASS_END

    def _clip(self, ids: np.ndarray, lm: np.ndarray | None):
        t = self.cfg.seq_len
        if len(ids) > t:
            self.stats.truncated_samples += 1
            self.stats.truncated_tokens += len(ids) - t
        return ids[:t], (lm[:t] if lm is not None else None)

    def _count(self, batch: dict) -> dict:
        st = self.stats
        st.rows += batch["input_ids"].shape[0]
        st.real_tokens += batch["num_real_tokens"]
        st.total_tokens += batch["input_ids"].numel()
        if self.cfg.packing != "packed":  # packed rows count their samples as they are added
            st.samples += batch["input_ids"].shape[0]
        return batch

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        cfg = self.cfg
        seed = [cfg.seed, self.epoch, cfg.rank, worker]
        samples = self._samples(self.my_slots[worker], seed, mark_pass_end=cfg.packing == "packed")
        t, b = cfg.seq_len, cfg.micro_batch_size
        if cfg.packing == "packed":
            packer, rows = FirstFitPacker(t, cfg.pack_window), []
            for sample in samples:
                if sample is _PASS_END:
                    # Emit the first pass's open rows before any resampled sample joins them: left open, they wait
                    # behind rows that fill up later and fall past the epoch's cut (measured: 5-10% of an epoch's
                    # samples unseen at 76 rows per reader, up to 30% with fewer rows than pack_window; test_loader).
                    rows.extend(packer.flush())
                    continue
                _key, ids, lm = sample
                if lm is None:  # text: a long document is cut into row-sized pieces, not truncated (nothing lost)
                    pieces = [(ids[i : i + t], None) for i in range(0, len(ids), t)]
                else:  # SFT: a sample is never split; an over-long one is truncated
                    pieces = [self._clip(ids, lm)]
                self.stats.samples += len(pieces)
                for piece in pieces:
                    rows.extend(packer.add(piece, len(piece[0])))
                while len(rows) >= b:
                    yield self._count(collate_packed(rows[:b], t, cfg.pad_id, cfg.attention))
                    rows = rows[b:]
        elif cfg.packing == "bucket":
            rng = np.random.default_rng(seed)
            while True:
                group = [self._clip(*next(samples)[1:]) for _ in range(b * 50)]
                group.sort(key=lambda s: -len(s[0]))
                batches = [group[i : i + b] for i in range(0, len(group), b)]
                for k in rng.permutation(len(batches)):
                    yield self._count(collate_padded(batches[k], cfg.pad_id, cfg.pad_multiple, cfg.seq_len))
        else:
            while True:
                rows = [self._clip(*next(samples)[1:]) for _ in range(b)]
                yield self._count(collate_padded(rows, cfg.pad_id, cfg.pad_multiple, cfg.seq_len))
