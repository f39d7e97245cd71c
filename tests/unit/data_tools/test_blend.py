"""Weighted mixtures (data_tools.loading.blend through build_dataloader): Megatron blending indices, repeats and
epoch counts of a small source, independence from the world size, the shared packing, WebDataset sources, resume
and its refusal of a changed mixture."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from data_tools.indexed import IndexedDatasetBuilder, loss_mask_prefix
from data_tools.loader import LoaderConfig, build_dataloader
from data_tools.loading.blend import BlendedSource, blending_indices, parse_mixture

SEQ = 64


def _write(prefix, lengths, first: int, mask: bool = True) -> str:
    """Sample ``i`` holds ``lengths[i]`` tokens starting at a per-sample id, so every sample can be recognised."""
    tokens = IndexedDatasetBuilder(str(prefix), dtype=np.int32)
    lm = IndexedDatasetBuilder(loss_mask_prefix(prefix), dtype=np.uint8) if mask else None
    for i, n in enumerate(lengths):
        tokens.add_document(np.full(n, first + i, dtype=np.int32))
        if lm is not None:
            lm.add_document(np.ones(n, dtype=np.uint8))
    tokens.finalize()
    if lm is not None:
        lm.finalize()
    return str(prefix)


@pytest.fixture
def two(tmp_path):
    rng = np.random.default_rng(0)
    big = _write(tmp_path / "big", rng.integers(4, 30, 300).tolist(), 1000)
    small = _write(tmp_path / "small", rng.integers(4, 30, 20).tolist(), 5000)
    return big, small


def _mix(big, small, wb=0.75, ws=0.25):
    return [{"path": big, "weight": wb}, {"path": small, "weight": ws}]


def test_blending_indices_keep_every_prefix_within_one_sample_of_its_share():
    weights = [0.5, 0.3, 0.2]
    source, draw = blending_indices(weights, 1000)
    assert Counter(source.tolist()) == {0: 500, 1: 300, 2: 200}
    onehot = np.eye(3)[source]
    prefix = np.cumsum(onehot, axis=0)
    target = np.arange(1, 1001)[:, None] * np.asarray(weights)
    assert np.abs(prefix - target).max() <= 1.0
    # draw numbers count each source's draws in order: 0, 1, 2, ... per source
    for s in range(3):
        assert draw[source == s].tolist() == list(range(int((source == s).sum())))
    # Megatron's tie rule at position 0 (error = weight * max(0, 1)): the heaviest source first
    assert blending_indices([0.2, 0.8], 3)[0].tolist() == [1, 0, 1]


def test_a_small_source_repeats_in_whole_shuffled_epochs_and_continues_across_loader_epochs(two):
    big, small = two
    cfg = LoaderConfig(seq_len=SEQ, micro_batch_size=2, packing="padding", seed=3)
    blend = BlendedSource(parse_mixture(_mix(big, small, 0.5, 0.5)), cfg)
    assert blend.epoch_size == 320 and blend.per_epoch.tolist() == [160, 160]
    e0, e1 = blend.units_of(0), blend.units_of(1)
    small_draws = np.concatenate([e0[blend.source_index == 1], e1[blend.source_index == 1]])
    # 320 draws of a 20-sample source: 16 of its epochs, each a permutation of all 20 samples
    blocks = small_draws.reshape(16, 20)
    assert all(sorted(b) == list(range(20)) for b in blocks)
    assert len({tuple(b) for b in blocks}) > 1, "each source epoch is shuffled with its own seed"
    assert blend.source_epochs([160, 160]) == [160 / 300, 8.0]
    # the big source is seen in part per loader epoch and continues where it stopped: no sample twice in 300 draws
    big_draws = np.concatenate([e0[blend.source_index == 0], e1[blend.source_index == 0]])[:300]
    assert sorted(big_draws) == list(range(300))


def test_the_blend_is_deterministic_and_seeded(two):
    big, small = two
    cfg = LoaderConfig(seq_len=SEQ, micro_batch_size=2, seed=7)
    a = BlendedSource(parse_mixture(_mix(big, small)), cfg).units_of(0)
    b = BlendedSource(parse_mixture(_mix(big, small)), cfg).units_of(0)
    c = BlendedSource(parse_mixture(_mix(big, small)), LoaderConfig(seq_len=SEQ, micro_batch_size=2, seed=8))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c.units_of(0))


def _samples(loader) -> tuple[Counter, np.ndarray]:
    """(multiset of samples that carry targets, by their token, summed source_counts) of one epoch."""
    seen, counts = Counter(), 0
    for batch in loader:
        counts = counts + batch["source_counts"].numpy()
        for ids, labels, pos in zip(batch["input_ids"], batch["labels"], batch["position_ids"], strict=True):
            for s in np.flatnonzero(pos.numpy() == 0).tolist():  # every sample starts at position 0
                if s + 1 < len(ids) and labels[s + 1] != -100:  # a real sample, not a zero-weight repeat or padding
                    seen[int(ids[s])] += 1
    return seen, counts


@pytest.mark.parametrize("packing", ["padding", "packed"])
def test_the_blended_samples_do_not_depend_on_the_world_size(two, packing):
    """The blend is a function of global positions: 1, 2 or 3 ranks together see the same samples, equally often,
    and the shares hold on every rank."""
    big, small = two
    runs = {}
    for world in (1, 2, 3):
        total, counts = Counter(), 0
        for rank in range(world):
            loader = build_dataloader(
                _mix(big, small), seq_len=SEQ, micro_batch_size=2, rank=rank, world_size=world, packing=packing,
                drop_last=False, seed=5,
            )  # fmt: skip
            seen, c = _samples(loader)
            total += seen
            counts = counts + c
            assert abs(c[1] / c.sum() - 0.25) < 0.1, f"rank {rank} of {world}: shares {c / c.sum()}"  # not 0 or 1
        runs[world] = (total, counts)
    assert runs[1][0] == runs[2][0] == runs[3][0]
    assert runs[1][1].tolist() == runs[2][1].tolist() == [240, 80]  # 320 positions, 0.75/0.25, repeats excluded
    assert sum(n for tok, n in runs[1][0].items() if tok >= 5000) == 80


def test_blended_text_chunks_are_packed_exactly_as_a_single_text_source(tmp_path):
    """Text (no loss mask) in packed mode: a mixture's units are Megatron chunks, split into their documents, so
    position ids, labels and the block-diagonal mask are those of the single-source chunk path."""
    text = _write(tmp_path / "text", np.random.default_rng(1).integers(5, 90, 80).tolist(), 10, mask=False)
    kw = dict(seq_len=SEQ, micro_batch_size=2, shuffle=False, packing="packed")
    single = list(build_dataloader(text, **kw))
    mixed = list(build_dataloader([{"path": text, "weight": 1.0}], **kw))
    assert len(single) == len(mixed) > 5
    for a, b in zip(single, mixed, strict=True):
        for key in ("input_ids", "labels", "position_ids", "attention_mask"):
            assert torch.equal(a[key], b[key]), key
        assert b["source_counts"].tolist() == [2]


def test_a_webdataset_source_blends_exactly_like_the_same_samples_in_mmap(tmp_path):
    from data_tools.webdataset_writer import WebDatasetWriter

    lengths = np.random.default_rng(2).integers(4, 30, 60).tolist()
    mmap = _write(tmp_path / "m", lengths, 100)
    other = _write(tmp_path / "o", [10] * 30, 900)
    writer = WebDatasetWriter(tmp_path / "wds", shard_size=16, has_loss_mask=True)
    for i, n in enumerate(lengths):
        writer.write(np.full(n, 100 + i, dtype=np.int32), np.ones(n, dtype=np.uint8))
    writer.close({})
    for packing in ("packed", "padding"):
        kw = dict(seq_len=SEQ, micro_batch_size=2, packing=packing, seed=1)
        via_mmap = list(build_dataloader([{"path": mmap, "weight": 2}, {"path": other, "weight": 1}], **kw))
        via_wds = list(
            build_dataloader(
                [{"path": str(tmp_path / "wds"), "weight": 2, "name": "m"}, {"path": other, "weight": 1}], **kw
            )
        )
        assert len(via_mmap) == len(via_wds)
        for a, b in zip(via_mmap, via_wds, strict=True):
            assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


def test_resume_continues_the_mixture_and_refuses_a_changed_one(two, tmp_path):
    big, small = two
    kw = dict(seq_len=SEQ, micro_batch_size=2, world_size=2, rank=1, seed=4)
    full = list(build_dataloader(_mix(big, small), **kw))
    first = build_dataloader(_mix(big, small), **kw)
    it = iter(first)
    for _ in range(7):
        next(it)
    state = first.state_dict()
    assert state["mixture"] == [
        {"name": "big", "share": 0.75, "units": 300},
        {"name": "small", "share": 0.25, "units": 20},
    ]
    resumed = build_dataloader(_mix(big, small), **kw)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(full) - 7
    for a, b in zip(full[7:], rest, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["source_counts"], b["source_counts"])

    build_dataloader(_mix(big, small, 3, 1), **kw).load_state_dict(state)  # the same shares: the same blend
    with pytest.raises(ValueError, match="mixture source 'big' has share 0.75 in the checkpoint but 0.6 now"):
        build_dataloader(_mix(big, small, 0.75, 0.5), **kw).load_state_dict(state)
    grown = _write(tmp_path / "small2" / "small", list(range(4, 30)), 5000)
    with pytest.raises(ValueError, match="'small' has units 20 in the checkpoint but 26 now"):
        build_dataloader(_mix(big, grown), **kw).load_state_dict(state)
    with pytest.raises(ValueError, match="mixture source 'small' was dropped"):
        build_dataloader([{"path": big, "weight": 1}], **kw).load_state_dict(state)
    with pytest.raises(ValueError, match="the checkpoint trained on a mixture, this run on one source"):
        build_dataloader(big, **kw).load_state_dict(state)


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([{"path": "a", "weight": -1}], r"source\[0\].weight=-1 is negative"),
        ([{"path": "a", "weight": 0}, {"path": "b", "weight": 0.0}], "every weight is 0"),
        (
            [{"path": "a", "weight": 1}, {"path": "b", "weight": "lots"}],
            r"source\[1\].weight='lots': expected a finite",
        ),
        ([{"path": "a", "weight": float("nan")}], r"source\[0\].weight=nan"),
        ([{"path": "a", "weight": True}], r"source\[0\].weight=True"),
        ([{"path": "a", "wieght": 1}], r"source\[0\]: unknown key\(s\) \['wieght'\]"),
        ([{"path": "d/a", "weight": 1}, {"path": "e/a.jsonl", "weight": 1}], r"source\[1\]: the name 'a' is also"),
        ([], "non-empty list"),
    ],
)
def test_bad_mixtures_are_refused_by_item(items, message):
    with pytest.raises(ValueError, match=message):
        parse_mixture(items)
