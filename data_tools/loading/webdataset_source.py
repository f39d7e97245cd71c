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
import random
import tarfile
from pathlib import Path

import numpy as np
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from data_tools.loading.packing import FirstFitPacker, collate_packed, collate_padded

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
    out = []
    with tarfile.open(path) as tar:
        for m in tar:
            if m.name.endswith(".input_ids.npy"):
                fh = tar.extractfile(m)
                major, _ = np.lib.format.read_magic(fh)
                read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                shape, _, _ = read_header(fh)
                out.append(shape[0])
    return np.asarray(out, dtype=np.int64)


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


def _decode(sample: dict) -> tuple[str, np.ndarray, np.ndarray | None]:
    key = sample["__key__"]
    if key.startswith("/") or ".." in key.split("/"):
        # Harmless to us (nothing is extracted to disk) but the sign of a crafted shard: refuse it loudly.
        raise ValueError(f"{sample.get('__url__')}: tar member key {key!r} is absolute or contains '..'; refusing")
    # allow_pickle=False (np.load's default) keeps a crafted .npy from running code.
    ids = np.load(io.BytesIO(sample["input_ids.npy"]), allow_pickle=False)
    lm = sample.get("loss_mask.npy")
    return key, ids, (np.load(io.BytesIO(lm), allow_pickle=False) if lm is not None else None)


class WebDatasetStream(IterableDataset):
    """One rank's endless batch stream for one epoch; each DataLoader worker reads its own slot's shards."""

    def __init__(self, source: WebDatasetSource, slots: list[list[int]], cfg, epoch: int):
        self.source, self.cfg, self.epoch = source, cfg, epoch
        nw = max(1, cfg.num_workers)
        self.my_slots = slots[cfg.rank * nw : (cfg.rank + 1) * nw]

    def _samples(self, shard_ids: list[int], seed: list[int]):
        """The slot's samples: a first pass over its shards in an epoch-shuffled order, then its shards resampled
        forever. The shuffle buffer is drained at the end of the first pass so that every first-pass sample comes
        before any resampled one (the complete-coverage guarantee of padding mode relies on it)."""
        cfg, rng = self.cfg, random.Random(str(seed))
        order = list(shard_ids)
        if cfg.shuffle:
            rng.shuffle(order)

        def resampled():
            while True:
                yield {"url": self.source.shards[rng.choice(shard_ids)]}

        for k, urls in enumerate(([{"url": self.source.shards[i]} for i in order], resampled())):
            stages = [lambda urls=urls: iter(urls), wds.tarfile_to_samples()]
            if cfg.shuffle:
                stages.append(wds.shuffle(cfg.shuffle_buffer, initial=min(cfg.shuffle_buffer, 100), seed=f"{seed}{k}"))
            stages.append(wds.map(_decode))
            yield from wds.DataPipeline(*stages)

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        cfg = self.cfg
        seed = [cfg.seed, self.epoch, cfg.rank, worker]
        samples = self._samples(self.my_slots[worker], seed)
        t, b = cfg.seq_len, cfg.micro_batch_size
        if cfg.packing == "packed":
            packer, rows = FirstFitPacker(t, cfg.pack_window), []
            for _key, ids, lm in samples:
                if lm is None:  # text: a long document is cut into row-sized pieces, not truncated (nothing lost)
                    pieces = [(ids[i : i + t], None) for i in range(0, len(ids), t)]
                else:  # SFT: a sample is never split; an over-long one is truncated
                    pieces = [(ids[:t], lm[:t])]
                for piece in pieces:
                    rows.extend(packer.add(piece, len(piece[0])))
                while len(rows) >= b:
                    yield collate_packed(rows[:b], t, cfg.pad_id, cfg.attention)
                    rows = rows[b:]
        elif cfg.packing == "bucket":
            rng = np.random.default_rng(seed)
            while True:
                group = [next(samples)[1:] for _ in range(b * 50)]
                group = [(ids[:t], lm[:t] if lm is not None else None) for ids, lm in group]
                group.sort(key=lambda s: -len(s[0]))
                batches = [group[i : i + b] for i in range(0, len(group), b)]
                for k in rng.permutation(len(batches)):
                    yield collate_padded(batches[k], cfg.pad_id)
        else:
            while True:
                group = [next(samples)[1:] for _ in range(b)]
                yield collate_padded([(ids[:t], lm[:t] if lm is not None else None) for ids, lm in group], cfg.pad_id)
