"""A weighted mixture through the real launcher: drawn shares match the weights, and a SIGKILL + resume continues it.

Two launches on 2 CPU ranks (~1 min each). Launch 1 trains a 0.75/0.25 mixture of two SFT sources (the small one
repeats) with a checkpoint every 6 steps and is SIGKILLed once step 30's checkpoint exists; by then ``metrics.jsonl``
holds steps 1-30 of the uninterrupted run (rows are flushed at every checkpoint). The checkpoints after step 12 are
then deleted, so that launch 2 (``train.resume=auto``) resumes from step 12 of a killed job and must recompute steps
13-30 exactly as the uninterrupted run did: the same losses and the same cumulative ``source_counts``. The counts of
every step (also 31-36, after the uninterrupted part) are checked against the loader rebuilt in this process.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from tests.recipes.conftest import SEQ_LEN, kill_job, launch, metrics, recipe_cmd, run_recipe, wait_for

MICRO, ACCUM, RANKS, STEPS = 2, 2, 2, 36
BATCH = [f"train.micro_batch_size={MICRO}", f"train.grad_accum={ACCUM}"]
STEPS_ARGS = [f"train.max_steps={STEPS}", "train.save_every=6", "train.keep_last=10", "train.lr=1e-3"]


def _sft_counting(prefix, n: int, seed: int, first: int) -> str:
    """``n`` counting samples (tokens ``first``.. upward, 16-47 long) with a loss mask on all but the first 4 tokens."""
    from data_tools.indexed import IndexedDatasetBuilder, loss_mask_prefix

    rng = np.random.default_rng(seed)
    tokens = IndexedDatasetBuilder(str(prefix), dtype=np.uint16)
    mask = IndexedDatasetBuilder(loss_mask_prefix(prefix), dtype=np.uint8)
    for _ in range(n):
        length, start = int(rng.integers(16, 48)), int(rng.integers(0, 32))
        tokens.add_document((np.arange(start, start + length) % 32 + first).astype(np.uint16))
        mask.add_document((np.arange(length) >= 4).astype(np.uint8))
    tokens.finalize()
    mask.finalize()
    return str(prefix)


def _reference_counts(mixture: list[dict]) -> np.ndarray:
    """Samples per source of each optimizer step, summed over both ranks, from the loader built here."""
    from data_tools.loader import build_dataloader

    per_rank = []
    for rank in range(RANKS):
        loader = build_dataloader(
            mixture, seq_len=SEQ_LEN, micro_batch_size=MICRO, rank=rank, world_size=RANKS, seed=42, pad_id=0
        )
        counts = [b["source_counts"].numpy() for _, b in zip(range(STEPS * ACCUM), loader, strict=False)]
        per_rank.append(np.stack(counts).reshape(STEPS, ACCUM, -1).sum(axis=1))
    return np.cumsum(sum(per_rank), axis=0)


def test_mixture_shares_and_sigkill_resume(tmp_path, tiny_llama_dir):
    big = _sft_counting(tmp_path / "big", 1200, 0, 10)
    small = _sft_counting(tmp_path / "small", 150, 1, 50)
    mixture = [{"path": big, "weight": 0.75}, {"path": small, "weight": 0.25, "name": "small"}]
    data = {"train": f"[{{path: {big}, weight: 0.75}}, {{path: {small}, weight: 0.25, name: small}}]"}
    out = tmp_path / "run"
    proc = launch(recipe_cmd("full", RANKS, tiny_llama_dir, data, out, *BATCH, *STEPS_ARGS), out)
    wait_for(out / "checkpoints" / "step_00000030", proc, timeout=400)
    kill_job(proc)
    before = {r["step"]: r for r in metrics(out)}
    assert max(before) < STEPS, "the job finished before it was killed; the test proves nothing"
    assert set(range(1, 31)) <= set(before), "rows up to the step-30 checkpoint should have been flushed"
    for ckpt in (out / "checkpoints").glob("step_*"):
        if int(ckpt.name.split("_")[1]) > 12:
            shutil.rmtree(ckpt)

    run_recipe("full", tiny_llama_dir, data, out, *BATCH, *STEPS_ARGS)
    assert "resumed from" in (tmp_path / "run.log").read_text() and "at step 12" in (tmp_path / "run.log").read_text()
    after = {r["step"]: r for r in metrics(out)}
    assert sorted(after) == list(range(1, STEPS + 1)), "each step once after the resume"
    resumed = range(13, 31)
    assert [after[s]["loss"] for s in resumed] == pytest.approx([before[s]["loss"] for s in resumed], rel=1e-6)
    assert [after[s]["source_counts"] for s in resumed] == [before[s]["source_counts"] for s in resumed]

    reference = _reference_counts(mixture)
    got = np.array([[after[s]["source_counts"]["big"], after[s]["source_counts"]["small"]] for s in sorted(after)])
    np.testing.assert_array_equal(got, reference)  # every step, both runs: the loader's own sequence
    drawn = got[-1]
    assert drawn.sum() >= 1000
    shares = drawn / drawn.sum()
    assert abs(shares[0] - 0.75) <= 0.02 and abs(shares[1] - 0.25) <= 0.02, shares
    assert after[STEPS]["source_epochs"]["small"] > 1.0, "the small source should have repeated"
    print(f"[mixture] drawn {drawn.tolist()} of {drawn.sum()} samples, shares {shares.round(4).tolist()}")
