"""One rank of ``test_rank0_verify.py``: save, scan and load checkpoints through ``finetune.checkpoint`` with a
stand-in engine on a real 2-rank gloo group, counting the files this rank hashes.

    python -m tests.reliability._rank0_verify_worker RANK WORLD PORT CKPT_ROOT OUT_JSON

The default process group times out after :data:`COLLECTIVE_TIMEOUT_S`; rank 0's first hash sleeps longer than
that, so the save only succeeds if the other rank waits on the checkpoint's own, sized timeout. Writes
``OUT_JSON`` with per-phase hash counts, answers and timings.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

COLLECTIVE_TIMEOUT_S = 4.0
SLOW_HASH_S = 5.0


class FakeEngine:
    """What ``finetune.checkpoint`` uses of a DeepSpeed engine: each rank writes a shard, rank 0 the client state,
    then DeepSpeed's closing barrier."""

    def __init__(self, rank: int):
        self.rank = rank

    def zero_optimization_stage(self) -> int:  # recorded in the manifest (a resume on another stage converts)
        return 2

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        import torch
        import torch.distributed as tdist

        d = Path(save_dir) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"w": torch.full((1000,), float(self.rank))}, d / f"shard_rank{self.rank}.pt")
        if self.rank == 0:
            torch.save({"client_state": client_state}, d / "client.pt")
        tdist.barrier()

    def load_checkpoint(self, load_dir, tag):
        import torch

        d = Path(load_dir) / tag
        return str(d), torch.load(d / "client.pt", weights_only=True)["client_state"]


def main(rank: str, world: str, port: str, root: str, out: str) -> None:
    os.environ.update(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    import torch.distributed as tdist

    from finetune import distributed

    # As the engine does: the timeout bounds the default group and the gloo group that carries rank 0's answers.
    distributed.init(timeout_s=COLLECTIVE_TIMEOUT_S)
    from finetune import checkpoint as ck
    from finetune.watchdog import StepWatchdog

    r, root_path = int(rank), Path(root)
    counts = {"hash_and_sync": 0, "sha256": 0}
    real_hash_and_sync, real_sha256 = ck._hash_and_sync, ck._sha256

    def hash_and_sync(path):
        counts["hash_and_sync"] += 1
        if counts["hash_and_sync"] == 1:
            time.sleep(SLOW_HASH_S)  # a big checkpoint on slow storage
        return real_hash_and_sync(path)

    def sha256(path):
        counts["sha256"] += 1
        return real_sha256(path)

    ck._hash_and_sync, ck._sha256 = hash_and_sync, sha256
    report: dict = {}

    def phase(name: str, fn):
        counts.update(hash_and_sync=0, sha256=0)
        t0 = time.monotonic()
        try:
            result = fn()
        except ck.CheckpointError as e:
            result = f"CheckpointError: {e}"
        report[name] = {"counts": dict(counts), "result": result, "seconds": time.monotonic() - t0}

    engine = FakeEngine(r)
    # A step watchdog far shorter than rank 0's hashing: the save's allowance must keep it quiet on every rank.
    fired: list[int] = []
    wd = StepWatchdog(2.0, rank=r, world_size=int(world), heartbeat_s=0.5, exit_fn=fired.append, report_uncaught=False)
    phase("save", lambda: [str(ck.save_checkpoint(engine, root_path, s, {"step": s}, watchdog=wd)) for s in (1, 2)])
    wd.stop()
    report["watchdog_fired"] = fired

    def resume():
        found = ck.find_resume_checkpoint(root_path)
        return [str(found), ck.load_checkpoint(engine, found, verify_hashes=False)]

    phase("resume", resume)
    phase("explicit", lambda: ck.load_checkpoint(engine, root_path / ck.step_dir_name(1)))
    if r == 0:  # a bit flips in the newest checkpoint after it was saved
        shard = root_path / ck.step_dir_name(2) / "shard_rank1.pt"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    tdist.barrier()
    phase("corrupt_scan", lambda: str(ck.find_resume_checkpoint(root_path)))
    phase("corrupt_load", lambda: ck.load_checkpoint(engine, root_path / ck.step_dir_name(2)))
    Path(out).write_text(json.dumps(report))
    tdist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:6])
