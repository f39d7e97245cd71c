"""Run a training script under torch.profiler and write a table of its top ops (for when a speed target is missed).

    deepspeed --num_gpus 1 benchmarks/profile_step.py --out prof/ -- finetune/full.py model.name_or_path=... ...
    deepspeed --num_gpus 1 benchmarks/profile_step.py --out prof/ -- benchmarks/peer_hf_trainer.py --model ... ...

The wrapped script is not changed: the profiler advances on a global optimizer post-step hook
(``torch.optim.optimizer.register_optimizer_step_post_hook``), which fires for every ``torch.optim.Optimizer`` —
also the one DeepSpeed's ZeRO optimizer wraps — so the same wrapper serves dsft and the HF Trainer. ZeRO-1/2 call
the inner optimizer once per parameter group (weight decay / no decay: twice a step), so only the first call after
a forward pass counts as a step (a global module forward hook notes the forward). It skips
``--wait`` steps (warm-up, allocator growth), records ``--active`` steps, and rank 0 writes ``top_ops.txt`` (sorted
by self device time on a GPU, self CPU time otherwise), a Chrome trace, and ``syncs.txt``: per step, the host syncs
(``aten::_local_scalar_dense``: every ``.item()``/``float(tensor)``/``.tolist()`` of a device value waits for the GPU)
and the all-reduces, the overheads a step loop must keep off its critical path.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.modules.module import register_module_forward_hook
from torch.optim.optimizer import register_optimizer_step_post_hook


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for top_ops.txt and trace.json (rank 0)")
    p.add_argument("--wait", type=int, default=3, help="optimizer steps skipped before recording")
    p.add_argument("--active", type=int, default=3, help="optimizer steps recorded")
    p.add_argument("--rows", type=int, default=30, help="ops in the table")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the deepspeed launcher")
    p.add_argument("script", help="the training script, then its own arguments after --")
    p.add_argument("script_args", nargs=argparse.REMAINDER)
    return p


def install_step_hooks(on_step: Callable[[], None]) -> list:
    """Call ``on_step`` once per training step: at the first optimizer step after a module forward.

    Returns:
        The hook handles (``handle.remove()`` uninstalls them).
    """
    forward_seen = [False]

    def on_forward(*_):
        forward_seen[0] = True

    def on_optimizer_step(*_):
        if forward_seen[0]:  # the first optimizer call of this training step
            forward_seen[0] = False
            on_step()

    return [register_module_forward_hook(on_forward), register_optimizer_step_post_hook(on_optimizer_step)]


# Ops that make the host wait (on a GPU) or that are collectives, counted per step in syncs.txt.
SYNC_OPS = {
    "aten::_local_scalar_dense": "host syncs (.item() / float() / .tolist())",
    "c10d::allreduce_": "all-reduces",
}


def sync_counts(events, steps: int) -> dict[str, tuple[float, float]]:
    """``{label: (calls per step, ms per step)}`` of :data:`SYNC_OPS` in ``prof.key_averages()``-style events."""
    out = {}
    for name, label in SYNC_OPS.items():
        calls = sum(e.count for e in events if e.key == name)
        ms = sum(e.cpu_time_total for e in events if e.key == name) / 1000
        out[label] = (calls / steps, ms / steps)
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    script_args = [a for a in args.script_args if a != "--"] if args.script_args[:1] == ["--"] else args.script_args
    if args.local_rank >= 0:
        script_args = [f"--local_rank={args.local_rank}", *script_args]  # what the launcher would have passed
    out = Path(args.out)
    rank = int(os.environ.get("RANK", "0"))
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    sort_key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"

    def on_ready(prof: torch.profiler.profile) -> None:
        if rank != 0:
            return
        out.mkdir(parents=True, exist_ok=True)
        table = prof.key_averages().table(sort_by=sort_key, row_limit=args.rows)
        (out / "top_ops.txt").write_text(f"{args.active} optimizer steps of {args.script}, rank 0\n\n{table}\n")
        prof.export_chrome_trace(str(out / "trace.json"))
        rows = [
            f"| {label} | {n:.1f} | {ms:.2f} |"
            for label, (n, ms) in sync_counts(prof.key_averages(), args.active).items()
        ]
        header = (
            f"{args.active} optimizer steps of {args.script}, rank 0\n\n| per step | calls | CPU ms |\n|---|---|---|\n"
        )
        (out / "syncs.txt").write_text(header + "\n".join(rows) + "\n")

    prof = torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(wait=args.wait, warmup=1, active=args.active, repeat=1),
        on_trace_ready=on_ready,
        record_shapes=False,
    )
    install_step_hooks(prof.step)
    sys.argv = [args.script, *script_args]
    prof.start()
    try:
        runpy.run_path(args.script, run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    finally:
        prof.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
