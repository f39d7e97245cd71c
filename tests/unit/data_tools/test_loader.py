"""The shared loader: rank splitting, packing, labels/positions, resume, on the mmap and WebDataset paths."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from data_tools.indexed import IndexedDatasetBuilder
from data_tools.loader import build_dataloader
from data_tools.loading.packing import FirstFitPacker, block_causal_mask, collate_packed, pack_lengths
from data_tools.loading.webdataset_source import load_npy_1d, tar_samples

ID_OFFSET = 10  # sample i starts with token i + 10, so ids survive packing and pad_id 0 is never a sample start
# WebDataset samples an epoch may leave to a later one. packed: the fullest reader may carry its last ~1% of rows into
# the resampled tail (README, WebDataset). bucket: the 50-batch group that straddles the end of a reader's first pass
# is shuffled, so a few of its batches fall past the cut. On `shards`, seeds 0-7: packed 0.5-1% (5-10% before the
# packer flushed at the end of the first pass), bucket 1-1.25%.
WDS_MAX_UNSEEN = 0.0125


def _lengths(n, seed=0, median=40, max_len=120):
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(median), 0.6, n).astype(int), 2, max_len)


def _samples(n, seed=0, **kw):
    rng = np.random.default_rng(seed + 1)
    out = []
    for i, n_tok in enumerate(_lengths(n, seed, **kw)):
        ids = rng.integers(ID_OFFSET, 500, n_tok).astype(np.int32)
        ids[0] = i + ID_OFFSET
        mask = (rng.random(n_tok) < 0.6).astype(np.uint8)
        out.append((ids, mask))
    return out


def write_mmap(prefix, samples, loss_mask=True):
    b = IndexedDatasetBuilder(prefix, np.uint16)
    m = IndexedDatasetBuilder(f"{prefix}_loss_mask", np.uint8) if loss_mask else None
    for ids, mask in samples:
        b.add_document(ids)
        if m is not None:
            m.add_document(mask)
    b.finalize()
    if m is not None:
        m.finalize()
    return str(prefix)


def write_wds(root, samples, shard_sizes, loss_mask=True):
    """Shards of the given (uneven) sizes plus the dsft index.json; returns the index path."""
    assert sum(shard_sizes) == len(samples)
    root.mkdir(parents=True, exist_ok=True)
    entries, k = [], 0
    for s, size in enumerate(shard_sizes):
        name = f"shard-{s:06d}.tar"
        with wds.TarWriter(str(root / name)) as w:
            for ids, mask in samples[k : k + size]:
                sample = {"__key__": f"{k:09d}", "input_ids.npy": _npy(ids)}
                if loss_mask:
                    sample["loss_mask.npy"] = _npy(mask)
                w.write(sample)
                k += 1
        entries.append({"path": name, "samples": size})
    index = {"format": "dsft-webdataset/1", "shards": entries, "total_samples": k, "has_loss_mask": loss_mask}
    index["meta"] = {}
    (root / "index.json").write_text(json.dumps(index))
    return str(root / "index.json")


def _npy(a):
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def sample_ids(batch):
    """Ids of the samples in a batch: the first token of every run that starts at position 0 (pad runs skipped)."""
    ids, pos = batch["input_ids"], batch["position_ids"]
    starts = ids[pos == 0]
    return [int(t) - ID_OFFSET for t in starts if t >= ID_OFFSET]


def seen(loader):
    out = []
    for batch in loader:
        out.extend(sample_ids(batch))
    return out


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    samples = _samples(600)
    return write_mmap(tmp_path_factory.mktemp("sft") / "train", samples), samples


# ---------------------------------------------------------------- packing and collation


def test_first_fit_packs_every_sample_once_without_split():
    lengths = _lengths(2000, seed=3, median=256, max_len=1024)
    rows = pack_lengths(lengths, 1024, window=64)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 1024 for row in rows)
    efficiency = lengths.sum() / (len(rows) * 1024)
    assert efficiency > 0.95, efficiency
    with pytest.raises(ValueError, match="exceeds the row capacity"):
        FirstFitPacker(8).add("x", 9)


def test_collate_packed_labels_positions_and_mask():
    a = (np.array([11, 12, 13]), np.array([0, 1, 1], np.uint8))
    b = (np.array([21, 22]), None)  # no loss mask: every token is a target except the packed sample's first
    batch = collate_packed([[a, b]], seq_len=7, pad_id=0, attention="mask")
    assert batch["input_ids"].tolist() == [[11, 12, 13, 21, 22, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 12, 13, -100, 22, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    assert batch["num_real_tokens"] == 5
    m = batch["attention_mask"][0, 0]
    assert m.shape == (7, 7) and m.dtype == torch.bool
    assert m[4].tolist() == [False, False, False, True, True, False, False]  # sample b never sees sample a
    assert m[2].tolist() == [True, True, True, False, False, False, False]
    assert bool(m.any(-1).all())  # no fully masked query row (SDPA would return NaN)
    no_mask = collate_packed([[a, b]], seq_len=7, pad_id=0, attention="position_ids")
    assert "attention_mask" not in no_mask
    assert torch.equal(torch.from_numpy(block_causal_mask(no_mask["position_ids"].numpy())), batch["attention_mask"])


# ---------------------------------------------------------------- mmap path, two simulated ranks


@pytest.mark.parametrize("packing", ["packed", "padding", "bucket"])
def test_mmap_two_ranks_disjoint_complete_equal_counts(sft, packing):
    prefix, samples = sft
    per_rank, counts = [], []
    for rank in range(2):
        loader = build_dataloader(
            prefix, seq_len=128, micro_batch_size=4, rank=rank, world_size=2, seed=5, packing=packing, drop_last=False
        )
        ids = seen(loader)
        counts.append((len(loader), sum(1 for _ in loader)))
        per_rank.append(ids)
    assert counts[0][0] == counts[1][0] and counts[0][1] == counts[1][1] == counts[0][0]
    a, b = set(per_rank[0]), set(per_rank[1])
    assert not a & b, "ranks share samples"
    assert a | b == set(range(len(samples))), "some samples were never seen"


def _targets(prefix, world_size, **kw):
    """Target tokens over all ranks' batches for one epoch, and each rank's batch count."""
    total, counts = 0, []
    for rank in range(world_size):
        loader = build_dataloader(prefix, rank=rank, world_size=world_size, drop_last=False, shuffle=True, **kw)
        counts.append(len(loader))
        total += sum(int((batch["labels"] != -100).sum()) for batch in loader)
    return total, counts


@pytest.mark.parametrize("packing", ["packed", "padding", "bucket", "text"])
def test_eval_with_drop_last_false_counts_every_target_exactly_once(sft, tmp_path, packing):
    """drop_last=False pads ranks to equal batch counts by repeating samples (DistributedSampler) or rows (packing);
    the repeats run through the model but carry no targets, so a 3-rank eval loss sums exactly what 1 rank sums."""
    prefix, samples = sft
    if packing == "text":
        prefix, packing = write_mmap(tmp_path / "text", samples[:301], loss_mask=False), "packed"
    kw = dict(seq_len=128, micro_batch_size=4, packing=packing)
    reference, _ = _targets(prefix, 1, **kw)
    for world_size in (2, 3, 7):
        total, counts = _targets(prefix, world_size, **kw)
        assert len(set(counts)) == 1, counts  # equal forward passes on every rank (ZeRO-3 needs them)
        assert total == reference, f"world_size={world_size}"


def test_mmap_drop_last_equal_counts_and_batches_change_with_epoch(sft):
    prefix, _ = sft
    loaders = [build_dataloader(prefix, seq_len=128, micro_batch_size=3, rank=r, world_size=2) for r in range(2)]
    assert len(loaders[0]) == len(loaders[1]) > 0
    e0 = [seen(lo) for lo in loaders]
    assert all(lo.epoch == 1 for lo in loaders)  # the epoch advances by itself at its end
    e1 = seen(loaders[0])
    assert not set(e0[0]) & set(e0[1])
    assert e1 != e0[0]
    assert len(e0[0]) == len(set(e0[0]))


def test_mmap_labels_follow_loss_mask_and_truncation_is_counted(sft):
    prefix, samples = sft
    loader = build_dataloader(prefix, seq_len=64, micro_batch_size=2, packing="padding", shuffle=False)
    batch = next(iter(loader))
    for r in range(2):
        ids, mask = samples[r]
        n = min(len(ids), 64)
        expect = np.where(mask[:n] == 1, ids[:n], -100)
        expect[0] = -100
        assert batch["labels"][r, :n].tolist() == expect.tolist()
        assert batch["attention_mask"][r].sum() == n
    over = sum(len(s[0]) > 64 for s in samples)
    assert loader.stats.truncated_samples == over > 0


def test_text_chunks_cover_the_stream_with_resets_at_documents(tmp_path):
    samples = _samples(300, seed=7)
    prefix = write_mmap(tmp_path / "text", samples, loss_mask=False)
    stream = np.concatenate([s[0] for s in samples])
    starts = set(np.cumsum([0] + [len(s[0]) for s in samples[:-1]]).tolist())
    t, got = 64, {}
    for rank in range(2):
        loader = build_dataloader(prefix, seq_len=t, micro_batch_size=2, rank=rank, world_size=2, attention="mask")
        for batch in loader:
            assert batch["num_real_tokens"] == batch["input_ids"].numel()  # chunks are 100% real tokens
            for row_ids, row_pos, row_lab in zip(
                batch["input_ids"], batch["position_ids"], batch["labels"], strict=True
            ):
                k = int(
                    np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(stream, t) == row_ids.numpy(), 1))[0]
                )
                assert k % t == 0 and k not in got
                got[k] = rank
                resets = {k + j for j in np.flatnonzero(row_pos.numpy() == 0)}
                assert resets == ({s for s in starts if k <= s < k + t} | {k})
                assert (row_lab[row_pos == 0] == -100).all() and (row_lab[row_pos > 0] == row_ids[row_pos > 0]).all()
    assert len(got) == 2 * (len(stream) // t // 2 // 2 * 2)


# ---------------------------------------------------------------- WebDataset path


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    samples = _samples(400, seed=11)
    return write_wds(tmp_path_factory.mktemp("wds"), samples, [150, 20, 90, 35, 70, 35]), samples


@pytest.mark.parametrize("packing,num_workers", [("padding", 0), ("padding", 2), ("packed", 0), ("bucket", 0)])
def test_webdataset_uneven_shards_equal_counts_disjoint(shards, packing, num_workers):
    index, samples = shards
    per_rank, counts = [], []
    for rank in range(2):
        loader = build_dataloader(
            index, seq_len=128, micro_batch_size=4, rank=rank, world_size=2, packing=packing, num_workers=num_workers
        )
        batches = list(loader)
        counts.append((len(loader), len(batches)))
        if num_workers == 0:  # stats are counted in the process that makes the batches
            assert loader.stats.real_tokens == sum(bt["num_real_tokens"] for bt in batches)
            assert loader.stats.rows == 4 * len(batches)
            assert loader.stats.efficiency > (0.9 if packing != "padding" else 0.3)
        per_rank.append([i for bt in batches for i in sample_ids(bt)])
    assert counts[0] == counts[1] and counts[0][0] == counts[0][1] > 0
    a, b = set(per_rank[0]), set(per_rank[1])
    assert not a & b, "ranks read the same shard"
    if packing == "padding":  # exact epoch length: every sample is seen in the epoch
        assert a | b == set(range(len(samples)))
    else:
        unseen = set(range(len(samples))) - (a | b)
        assert len(unseen) <= WDS_MAX_UNSEEN * len(samples), f"{len(unseen)} of {len(samples)} samples unseen"


def test_tar_reader_matches_webdataset_and_npy_matches_numpy(shards, tmp_path):
    """Our fast tar walk and .npy header parse (see webdataset_source) against the libraries they replace."""
    index, _ = shards
    urls = [{"url": u} for u in build_dataloader(index, seq_len=64, micro_batch_size=1).source.shards]
    ours = list(tar_samples(urls))
    theirs = list(wds.tarfile_to_samples()(iter(urls)))
    assert len(ours) == len(theirs) == 400
    for a, b in zip(ours, theirs, strict=True):
        assert a["__key__"] == b["__key__"] and a["__url__"] == b["__url__"]
        assert {k: bytes(v) for k, v in a.items() if k.endswith(".npy")} == {
            k: v for k, v in b.items() if k.endswith(".npy")
        }
    for arr in (np.arange(7, dtype=np.int32), np.ones(3, np.uint8), np.zeros((2, 3), np.int64), np.arange(0)):
        got = load_npy_1d(_npy(arr))
        assert got.dtype == arr.dtype and np.array_equal(got, arr)
    with pytest.raises(ValueError, match="allow_pickle"):
        load_npy_1d(_npy(np.array([{"x": 1}], dtype=object)))


def test_webdataset_needs_a_shard_per_reader(shards):
    index, _ = shards
    assert len(build_dataloader(Path(index).parent, seq_len=64, micro_batch_size=2, world_size=3)) > 0  # the folder
    with pytest.raises(ValueError, match="6 shards for 8 readers"):
        build_dataloader(index, seq_len=64, micro_batch_size=2, world_size=4, num_workers=2)


def test_webdataset_text_documents_are_cut_into_pieces_not_truncated(tmp_path):
    docs = [(np.arange(1000, 1000 + n, dtype=np.int32), None) for n in (300, 50, 200)]
    index = write_wds(tmp_path / "text", docs, [3], loss_mask=False)
    loader = build_dataloader(index, seq_len=128, micro_batch_size=1, shuffle=False, attention="position_ids")
    it = iter(loader)
    rows = [next(it)["input_ids"][0] for _ in range(3)]
    assert rows[0].tolist() == list(range(1000, 1128))  # doc 0, piece 1: a full row, emitted at once
    assert rows[1].tolist() == list(range(1128, 1256))  # doc 0, piece 2
    assert rows[2].tolist() == list(range(1000, 1128))  # doc 2, piece 1 (doc 0's 44-token tail waits with doc 1)


# ---------------------------------------------------------------- resume


def _same(b1, b2):
    assert b1.keys() == b2.keys()
    for k in b1:
        assert (b1[k] == b2[k]) if isinstance(b1[k], int) else torch.equal(b1[k], b2[k]), k


@pytest.mark.parametrize("which", ["mmap", "wds"])
def test_resume_sees_exactly_the_next_batches(sft, shards, which):
    source = sft[0] if which == "mmap" else shards[0]
    kw = dict(seq_len=128, micro_batch_size=2, rank=1, world_size=2, seed=3, attention="position_ids")
    ref = build_dataloader(source, **kw)
    n = len(ref)
    expected = list(ref) + list(ref)[:3]  # rest of epoch 0, then the start of epoch 1
    k = n - 2  # stop two batches before the epoch ends so the resumed run crosses the boundary
    run = build_dataloader(source, **kw)
    it = iter(run)
    for _ in range(k):
        next(it)
    state = run.state_dict()
    assert state["epoch"] == 0 and run.batches_consumed == k
    if which == "mmap":
        assert state["rows_consumed"] == k * 2 * 2  # all ranks' rows: the position is world-size-free
    else:
        assert state["stream"]["batches_consumed"] == k
    resumed = build_dataloader(source, **kw)
    resumed.load_state_dict(state)
    resumed.set_epoch(state["epoch"])  # what a training loop does every epoch: must not rewind
    got = list(resumed) + list(resumed)[:3]
    assert len(got) == 2 + 3
    for b1, b2 in zip(got, expected[k:], strict=True):
        _same(b1, b2)


def test_checkpoint_right_after_the_last_batch_resumes_into_the_next_epoch(sft):
    prefix, _ = sft
    kw = dict(seq_len=128, micro_batch_size=4, seed=9)
    run = build_dataloader(prefix, **kw)
    it = iter(run)
    for _ in range(len(run)):  # the trainer took the last batch but has not asked for one more yet
        next(it)
    state = run.state_dict()
    assert (state["epoch"], state["rows_consumed"]) == (1, 0)
    resumed = build_dataloader(prefix, **kw)
    resumed.load_state_dict(state)
    ref = build_dataloader(prefix, **kw)
    ref.set_epoch(1)
    for b1, b2 in zip(resumed, ref, strict=True):
        _same(b1, b2)


RESUME_BASE = dict(
    seq_len=128, micro_batch_size=2, seed=0, world_size=1, packing="packed", shuffle=True, num_workers=0, global_batch=4
)


@pytest.mark.parametrize(
    ("key", "saved", "now"),
    [
        ("seed", 0, 1),
        ("global_batch", 4, 8),
        ("seq_len", 128, 64),
        ("packing", "packed", "padding"),
        ("shuffle", True, False),
    ],
)
def test_resume_refuses_each_setting_that_orders_the_batches(sft, key, saved, now):
    source = sft[0]
    state = build_dataloader(source, **{**RESUME_BASE, key: saved}).state_dict()
    build_dataloader(source, **{**RESUME_BASE, key: saved}).load_state_dict(state)  # the same settings resume
    message = (
        f"loader state: {key}={saved!r} in the checkpoint but {now!r} now; the resumed run would see other batches. "
        f"Restore {key}={saved!r} or start a fresh run"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        build_dataloader(source, **{**RESUME_BASE, key: now}).load_state_dict(state)


@pytest.mark.parametrize(
    ("key", "saved", "now"), [("world_size", 2, 1), ("micro_batch_size", 2, 1), ("num_workers", 0, 2)]
)
def test_a_webdataset_stream_resumes_on_its_own_slots_only_and_says_what_to_do(shards, key, saved, now):
    """A stream is dealt to world_size x workers slots (no global order to cut), so its state names them."""
    base = RESUME_BASE  # global batch 4 in every case: only the slots differ
    state = build_dataloader(shards[0], **{**base, key: saved}).state_dict()
    with pytest.raises(ValueError, match=re.escape(f"{key}={saved!r} in the checkpoint but {now!r} now. Resume with")):
        build_dataloader(shards[0], **{**base, key: now}).load_state_dict(state)
    with pytest.raises(ValueError, match="mixture"):  # the way out: a one-source mixture is read map-style
        build_dataloader(shards[0], **{**base, key: now}).load_state_dict(state)


def test_resume_refuses_changed_data_a_position_inside_a_micro_step_and_another_state_version(sft):
    prefix, _ = sft
    state = build_dataloader(prefix, **RESUME_BASE).state_dict()
    build_dataloader(prefix, **{**RESUME_BASE, "num_workers": 2}).load_state_dict(state)  # the same mmap batches
    grown = {**state, "epoch_rows": state["epoch_rows"] + 4}
    with pytest.raises(ValueError, match=rf"{grown['epoch_rows']} rows in epoch 0 in the checkpoint but "):
        build_dataloader(prefix, **RESUME_BASE).load_state_dict(grown)
    inside = {**state, "rows_consumed": 6}  # 6 rows: not a whole micro step of 4 x 1 rows
    with pytest.raises(ValueError, match=r"6 rows into epoch 0, not a whole number of micro steps of .* = 4 rows"):
        build_dataloader(prefix, **{**RESUME_BASE, "micro_batch_size": 4}).load_state_dict(inside)
    with pytest.raises(ValueError, match=r"loader state version 1 \(an older dsft's per-rank order\), expected 2"):
        build_dataloader(prefix, **RESUME_BASE).load_state_dict({**state, "version": 1})


# ---------------------------------------------------------------- world-size-free order


def _row(ids) -> tuple:
    """A row as its tokens without padding (pad_id 0 is never a sample token), comparable across batch shapes."""
    return tuple(int(t) for t in ids if t != 0)


def global_steps(source, *, world_size, micro_batch_size, global_batch, steps=None, **kw):
    """Each optimizer step's rows over all ranks (a sorted list of rows), as a trainer with accumulation sees them."""
    accum = global_batch // (world_size * micro_batch_size)
    per_rank = []
    for rank in range(world_size):
        loader = build_dataloader(
            source,
            rank=rank,
            world_size=world_size,
            micro_batch_size=micro_batch_size,
            global_batch=global_batch,
            **kw,
        )
        per_rank.append([[_row(r) for r in b["input_ids"]] for b in loader])
    n = len(per_rank[0])
    assert all(len(p) == n for p in per_rank) and n % accum == 0  # equal counts, whole optimizer steps per epoch
    return [
        sorted(row for p in per_rank for b in p[s * accum : (s + 1) * accum] for row in b)
        for s in range(n // accum if steps is None else steps)
    ]


@pytest.mark.parametrize("packing", ["packed", "padding", "bucket", "text", "mixture"])
def test_the_same_global_batches_on_any_world_size(sft, tmp_path, packing):
    """1 rank x 4 accumulation, 2 x 2, 4 x 1 and 2 ranks x micro 4 train on the same rows in every optimizer step."""
    prefix, samples = sft
    if packing == "text":
        prefix, packing = write_mmap(tmp_path / "text", samples[:301], loss_mask=False), "packed"
    if packing == "mixture":
        other = write_mmap(tmp_path / "other", samples[300:], loss_mask=True)
        prefix, packing = [{"path": prefix, "weight": 0.7}, {"path": other, "weight": 0.3}], "packed"
    kw = dict(seq_len=128, global_batch=8, seed=11, packing=packing)
    reference = global_steps(prefix, world_size=1, micro_batch_size=2, **kw)
    assert len(reference) >= 5
    for world_size, micro in ((2, 2), (4, 2), (2, 4), (8, 1)):
        assert global_steps(prefix, world_size=world_size, micro_batch_size=micro, **kw) == reference, (
            world_size,
            micro,
        )


def test_resume_on_another_world_size_continues_with_the_next_global_batch(sft):
    """2 ranks stop after 3 optimizer steps; 1 rank (micro 2, accumulation 4) and 4 ranks (accumulation 1) resume
    from the state one rank saved and train on exactly the steps the uninterrupted 2-rank run trains on."""
    prefix, _ = sft
    kw = dict(seq_len=128, global_batch=8, seed=4, micro_batch_size=2)
    reference = global_steps(prefix, world_size=2, **kw)
    saved = build_dataloader(prefix, rank=1, world_size=2, **kw)
    it = iter(saved)
    for _ in range(3 * 2):  # 3 steps x accumulation 2
        next(it)
    state = saved.state_dict()
    assert state["rows_consumed"] == 3 * 8
    for world_size in (1, 4):
        accum = 8 // (world_size * 2)
        per_rank = []
        for rank in range(world_size):
            loader = build_dataloader(prefix, rank=rank, world_size=world_size, **kw)
            loader.load_state_dict(state)
            per_rank.append([[_row(r) for r in b["input_ids"]] for b in loader])
        got = [
            sorted(row for p in per_rank for b in p[s * accum : (s + 1) * accum] for row in b)
            for s in range(len(per_rank[0]) // accum)
        ]
        assert got == reference[3:], world_size


def test_workers_build_the_same_batches(sft):
    prefix, _ = sft
    kw = dict(seq_len=128, micro_batch_size=4, rank=0, world_size=2, attention="mask")
    for b1, b2 in zip(build_dataloader(prefix, **kw), build_dataloader(prefix, num_workers=2, **kw), strict=True):
        _same(b1, b2)


# ---------------------------------------------------------------- a real launcher, two processes


def test_two_real_ranks_under_the_deepspeed_launcher(sft, shards, tmp_path):
    """``deepspeed --num_gpus 2`` on CPU (gloo): disjoint, complete coverage and equal batch counts on both paths."""
    (prefix, samples), (index, wds_samples) = sft, shards
    script = Path(__file__).with_name("loader_ranks_script.py")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3]), "OMP_NUM_THREADS": "1"}
    with socket.socket() as sock:  # a free port: other launcher tests may run at the same time
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "2",
        "--master_port",
        str(port),
        str(script),
    ]
    cmd += ["--source", prefix, "--source", index, "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in reports] == [2, 2]
    for source, n in ((prefix, len(samples)), (index, len(wds_samples))):
        a, b = (r["sources"][source] for r in reports)
        assert a["batches"] == b["batches"] == a["len"] == b["len"] > 0
        assert not set(a["ids"]) & set(b["ids"])
        if source == prefix:  # mmap, drop_last=False: every sample seen
            assert set(a["ids"]) | set(b["ids"]) == set(range(n))
        else:  # WebDataset packed: nominal epoch, the fullest slot may carry its last rows over
            unseen = set(range(n)) - set(a["ids"]) - set(b["ids"])
            assert len(unseen) <= WDS_MAX_UNSEEN * n, f"{len(unseen)} of {n} samples unseen"
