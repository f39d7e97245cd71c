"""Run by test_loader.py under a real launcher (``deepspeed --num_gpus 2`` on CPU, gloo): each rank reads its share
through ``build_dataloader`` and writes the sample ids it saw. One all_reduce per batch stands in for a training step:
if the ranks yielded different batch counts the run would hang there (the test has a timeout)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from data_tools.loader import build_dataloader

ID_OFFSET = 10  # test_loader.py: sample i starts with token i + 10


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))  # the launcher's
    parser.add_argument("--source", action="append", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    report = {"rank": rank, "world_size": world, "sources": {}}
    for source in args.source:
        loader = build_dataloader(
            source, seq_len=128, micro_batch_size=4, rank=rank, world_size=world, seed=1, drop_last=False
        )
        ids, batches, n = [], 0, len(loader)  # len before iterating: the epoch advances at its end
        for batch in loader:
            starts = batch["input_ids"][batch["position_ids"] == 0]
            ids.extend(int(t) - ID_OFFSET for t in starts if t >= ID_OFFSET)
            step = torch.tensor([batch["num_real_tokens"]], dtype=torch.float64)
            dist.all_reduce(step)
            batches += 1
        report["sources"][source] = {"ids": ids, "batches": batches, "len": n}
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
