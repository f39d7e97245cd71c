"""SFT masking, rank-count invariance and crash/resume, each through the real launcher on CPU."""

from __future__ import annotations

import json

import pytest

from tests.recipes.conftest import kill_job, launch, losses, metrics, recipe_cmd, run_recipe, wait_for


def _chat_jsonl(path, trailing_digit: str, n: int = 48) -> str:
    """Conversations user -> assistant -> user. The trailing user turn comes after every assistant token, so no
    assistant token attends to it: if the loss counts only assistant tokens, its content cannot change the loss."""
    with open(path, "w") as f:
        for i in range(n):
            a, b = i % 10, (i * 7) % 10
            msgs = [
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"The answer is {a + b}."},
                {"role": "user", "content": f"And {trailing_digit} more?"},
            ]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return str(path)


def test_sft_loss_counts_only_assistant_tokens(tmp_path, tiny_llama_dir):
    from data_tools.indexed import IndexedDataset

    runs = {}
    for digit in ("3", "8"):
        out = tmp_path / f"run_{digit}"
        data = {"train": _chat_jsonl(tmp_path / f"chat_{digit}.jsonl", digit)}
        overrides = ["train.max_steps=4", "train.micro_batch_size=2", "train.grad_accum=1", "data.format=messages"]
        run_recipe("sft", tiny_llama_dir, data, out, *overrides, "train.lr=1e-3", "zero.stage=2")
        (cache,) = [p for p in (out / "data_cache").glob("*.idx") if not p.name.endswith("_loss_mask.idx")]
        runs[digit] = (losses(out), IndexedDataset(str(cache.with_suffix(""))).sizes.tolist())
    (loss3, sizes3), (loss8, sizes8) = runs["3"], runs["8"]
    assert sizes3 == sizes8, "the edited digit must not change tokenized lengths, or the batches would differ"
    assert len(loss3) == 4 and all(v > 0 for v in loss3.values())
    assert loss3 == pytest.approx(loss8, rel=1e-6, abs=1e-7)


def test_sft_refuses_data_without_loss_mask(tmp_path, tiny_llama_dir, counting_data):
    """Plain token data (no _loss_mask) would train on prompts: sft.py stops with a message naming data.train."""
    out = tmp_path / "run"
    proc = launch(recipe_cmd("sft", 1, tiny_llama_dir, counting_data, out, "train.max_steps=2"), out)
    assert proc.wait(timeout=300) == 2
    assert "data.train" in (out.parent / "run.log").read_text() and "loss mask" in (out.parent / "run.log").read_text()


GLOBAL_BATCH = [
    "train.global_batch=4",
    "train.micro_batch_size=2",
    "train.grad_accum=null",
    "train.lr=3e-3",
    "zero.stage=2",
]


def test_one_rank_vs_two_ranks_and_sigkill_resume(tmp_path, tiny_llama_dir, counting_data):
    """(a) 2 ranks x 1 accumulation (deepspeed launcher) and 1 rank x 2 accumulations (plain python) (same global batch of 4 rows) give the same loss
    curve; (b) a 2-rank run SIGKILLed after a checkpoint and resumed with train.resume=auto continues with exactly
    the losses of the uninterrupted run (resumed under torchrun)."""
    steps = ["train.max_steps=30", "train.save_every=5", "train.keep_last=2"]
    data = {"train": counting_data["train"]}
    two = run_recipe("full", tiny_llama_dir, data, tmp_path / "two", *GLOBAL_BATCH, *steps)
    one = run_recipe("full", tiny_llama_dir, data, tmp_path / "one", *GLOBAL_BATCH, *steps, nproc=1, launcher="python")
    l2, l1 = losses(two), losses(one)
    assert sorted(l2) == list(range(1, 31)) and sorted(l1) == sorted(l2)
    # the same rows in every optimizer step (the loader's order does not depend on the world size): the same curve
    assert [l1[s] for s in sorted(l1)] == pytest.approx([l2[s] for s in sorted(l2)], rel=1e-5)
    # The gradient itself, not only the loss: a wrong 1/world or 1/accum factor in the loss scale moves the grad norm
    # by that factor from step 1 on (AdamW would hide it from the losses for many steps).
    g2 = {r["step"]: r["grad_norm"] for r in metrics(two)}
    g1 = {r["step"]: r["grad_norm"] for r in metrics(one)}
    assert g1[1] == pytest.approx(g2[1], rel=1e-4)
    assert [g1[s] for s in sorted(g1)] == pytest.approx([g2[s] for s in sorted(g2)], rel=1e-5)
    assert l2[30] < l2[1] - 1.0

    killed = tmp_path / "killed"
    proc = launch(recipe_cmd("full", 2, tiny_llama_dir, data, killed, *GLOBAL_BATCH, *steps), killed)
    wait_for(killed / "checkpoints" / "step_00000005", proc)
    kill_job(proc)
    survived = losses(killed) if (killed / "metrics.jsonl").exists() else {}
    assert max(survived, default=0) < 30, "the job finished before it was killed; the test proves nothing"

    # the same settings (resume=auto), this time under torchrun: the checkpoint does not care which launcher wrote it
    run_recipe("full", tiny_llama_dir, data, killed, *GLOBAL_BATCH, *steps, launcher="torchrun")
    log = (tmp_path / "killed.log").read_text()
    assert "resumed from" in log
    resumed_at = int(log.split("at step ")[-1].split()[0])
    after = losses(killed)
    assert sorted(after) == list(range(1, 31)), "metrics.jsonl should hold each step once after the resume"
    tail = [s for s in range(resumed_at + 1, 31)]
    assert tail, "nothing left to compare after the resume point"
    assert [after[s] for s in tail] == pytest.approx([l2[s] for s in tail], rel=1e-6, abs=1e-7)
