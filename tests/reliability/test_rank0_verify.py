"""Rank 0 alone reads a checkpoint back, once, and the other ranks wait for its verdict as long as that takes.

Two real ranks over gloo (``_rank0_verify_worker.py``) save, scan and load checkpoints with the hash functions
counted per rank: rank 1 must hash nothing, rank 0 every file exactly once per save, resume or explicit load. Rank
0's first hash sleeps longer than the default collective timeout, so the save passes only if the wait is sized for
the checkpoint rather than the collective default, and a 2-second step watchdog on both ranks must stay quiet.
"""

from __future__ import annotations

import json
import subprocess
import sys

from finetune.checkpoint import MIN_RANK0_IO_WAIT_S, SLOW_STORAGE_BYTES_PER_S, rank0_io_timeout_s
from tests.reliability import _harness as h
from tests.reliability._rank0_verify_worker import COLLECTIVE_TIMEOUT_S, SLOW_HASH_S

FILES_PER_CHECKPOINT = 5  # shard_rank0.pt, shard_rank1.pt, client.pt, rng_rank_00000.pt, rng_rank_00001.pt


def test_rank0_hashes_once_and_the_others_wait_past_the_collective_timeout(tmp_path):
    port = str(h.free_port())
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.reliability._rank0_verify_worker",
                str(r),
                "2",
                port,
                str(tmp_path / "ckpt"),
                str(tmp_path / f"rank{r}.json"),
            ],
            cwd=h.REPO,
            env=h._env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    logs = [p.communicate(timeout=180)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))

    # Rank 1 reads nothing back, in any phase; rank 0 reads every file once per save, resume and explicit load.
    for name, phase in rank1.items():
        if name != "watchdog_fired":
            assert phase["counts"] == {"hash_and_sync": 0, "sha256": 0}, (name, phase)
    assert rank0["save"]["counts"] == {"hash_and_sync": 2 * FILES_PER_CHECKPOINT, "sha256": 0}
    assert rank0["resume"]["counts"] == {"hash_and_sync": 0, "sha256": FILES_PER_CHECKPOINT}
    assert rank0["explicit"]["counts"] == {"hash_and_sync": 0, "sha256": FILES_PER_CHECKPOINT}

    # Rank 1 waited out rank 0's slow hashing (longer than the collective timeout) and got the same answers.
    assert rank0["save"]["seconds"] > SLOW_HASH_S > COLLECTIVE_TIMEOUT_S
    assert rank1["save"]["seconds"] > SLOW_HASH_S
    assert rank0["watchdog_fired"] == rank1["watchdog_fired"] == []
    for name in ("save", "resume", "explicit", "corrupt_scan", "corrupt_load"):
        assert rank0[name]["result"] == rank1[name]["result"], name
    assert rank1["resume"]["result"] == [str(tmp_path / "ckpt" / "step_00000002"), {"step": 2}]
    # A flipped byte: rank 0's verdict reaches rank 1, which never read the file.
    assert rank1["corrupt_scan"]["result"] == str(tmp_path / "ckpt" / "step_00000001")
    assert (
        rank1["corrupt_load"]["result"].startswith("CheckpointError")
        and "sha256 mismatch" in rank1["corrupt_load"]["result"]
    )


def test_rank0_wait_is_sized_for_the_bytes_read():
    assert rank0_io_timeout_s(0) == MIN_RANK0_IO_WAIT_S
    hundred_gb = 100e9  # a full 7B ZeRO-2 checkpoint
    assert rank0_io_timeout_s(int(hundred_gb)) == hundred_gb / SLOW_STORAGE_BYTES_PER_S > 1800  # past NCCL's default
