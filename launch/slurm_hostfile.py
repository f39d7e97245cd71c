"""Write a DeepSpeed hostfile (``host slots=N`` lines) from the SLURM variables of the current allocation.

Run inside ``sbatch``/``salloc``: ``python -m launch.slurm_hostfile --output hostfile``. ``launch.run --slurm`` calls
:func:`hostfile_from_env` itself, so most users never run this directly.

Slots per node come from, in order: ``--slots``, ``SLURM_GPUS_ON_NODE`` (set when the job asked for GPUs),
``SLURM_GPUS_PER_NODE`` (``4`` or ``gpu:h100:4``), ``SLURM_NTASKS_PER_NODE`` (``4`` or ``4(x2)``).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

# One nodelist element: a prefix, then optionally a bracket group and more text (which may hold further groups).
_BRACKET = re.compile(r"^(?P<head>[^\[]*)\[(?P<ranges>[^\]]+)\](?P<tail>.*)$")


class SlurmEnvError(ValueError):
    """A SLURM variable is missing or malformed; the message names the variable and what to do."""


def _split_top_level(nodelist: str) -> list[str]:
    """Split ``a[1-2],b,c[3,5]`` on commas that are not inside brackets."""
    parts, depth, cur = [], 0, []
    for ch in nodelist:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise SlurmEnvError(f"SLURM_JOB_NODELIST={nodelist!r}: unbalanced ']'")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise SlurmEnvError(f"SLURM_JOB_NODELIST={nodelist!r}: unbalanced '['")
    parts.append("".join(cur))
    return [p for p in parts if p]


def _expand_one(item: str) -> list[str]:
    m = _BRACKET.match(item)
    if m is None:
        return [item]
    values = []
    for r in m["ranges"].split(","):
        if "-" in r:
            lo, hi = r.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(lo) > int(hi):
                raise SlurmEnvError(f"SLURM_JOB_NODELIST element {item!r}: bad range {r!r}")
            # Slurm keeps the zero padding of the lower bound: node[01-10] -> node01 ... node10.
            values += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
        elif r.isdigit():
            values.append(r)
        else:
            raise SlurmEnvError(f"SLURM_JOB_NODELIST element {item!r}: bad range {r!r}")
    return [m["head"] + v + rest for v in values for rest in _expand_one(m["tail"])]


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm hostlist expression, e.g. ``node[01-03,07],gpu7`` -> ``node01 node02 node03 node07 gpu7``.

    Args:
        nodelist: the value of ``SLURM_JOB_NODELIST`` (what ``scontrol show hostnames`` expands).

    Returns:
        Host names in order, duplicates removed.
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip()):
        for h in _expand_one(item):
            if h not in hosts:
                hosts.append(h)
    if not hosts:
        raise SlurmEnvError(f"SLURM_JOB_NODELIST={nodelist!r} names no host")
    return hosts


def _leading_int(value: str, var: str) -> int:
    # SLURM_NTASKS_PER_NODE may read "4(x2)" (4 tasks on each of 2 nodes); SLURM_GPUS_PER_NODE "gpu:h100:4".
    m = re.match(r"^(?:[A-Za-z0-9_]+:)*(\d+)", value.strip())
    if m is None or int(m[1]) < 1:
        raise SlurmEnvError(f"{var}={value!r}: expected a positive count such as '4', '4(x2)' or 'gpu:4'")
    return int(m[1])


def slots_per_node(env: Mapping[str, str]) -> int:
    """Processes (GPUs) per node from the SLURM variables (see the module docstring for the order)."""
    for var in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        if env.get(var):
            return _leading_int(env[var], var)
    raise SlurmEnvError(
        "none of SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE, SLURM_NTASKS_PER_NODE is set: submit with "
        "--gpus-per-node=N (or --ntasks-per-node=N), or pass --slots N"
    )


def hostfile_from_env(env: Mapping[str, str] | None = None, slots: int | None = None) -> tuple[list[str], int, str]:
    """Build the hostfile text of the current SLURM allocation.

    Args:
        env: variables to read (default ``os.environ``).
        slots: processes per node; overrides the SLURM variables.

    Returns:
        ``(hosts, slots, text)`` where ``text`` is the DeepSpeed hostfile, one ``host slots=N`` line per node.
    """
    env = os.environ if env is None else env
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise SlurmEnvError("SLURM_JOB_NODELIST is not set: run this inside an sbatch/salloc allocation")
    hosts = expand_nodelist(nodelist)
    n_nodes = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")
    if n_nodes and n_nodes.isdigit() and int(n_nodes) != len(hosts):
        raise SlurmEnvError(
            f"SLURM_JOB_NODELIST={nodelist!r} expands to {len(hosts)} hosts but SLURM_JOB_NUM_NODES={n_nodes}"
        )
    slots = slots if slots is not None else slots_per_node(env)
    if slots < 1:
        raise SlurmEnvError(f"slots={slots}: expected at least 1 process per node")
    text = "".join(f"{h} slots={slots}\n" for h in hosts)
    return hosts, slots, text


def write_hostfile(path: str | Path, env: Mapping[str, str] | None = None, slots: int | None = None) -> list[str]:
    """Write the hostfile of the current allocation to ``path``; return its host names (the first is the master)."""
    hosts, _, text = hostfile_from_env(env, slots)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return hosts


def main(argv: list[str] | None = None) -> int:
    """CLI: print the hostfile, or write it with ``--output``."""
    p = argparse.ArgumentParser(prog="python -m launch.slurm_hostfile", description=__doc__.splitlines()[0])
    p.add_argument("--output", "-o", type=Path, help="write here instead of printing")
    p.add_argument("--slots", type=int, help="processes per node (default: from the SLURM variables)")
    args = p.parse_args(argv)
    try:
        if args.output:
            hosts = write_hostfile(args.output, slots=args.slots)
            print(f"wrote {args.output}: {len(hosts)} hosts, master {hosts[0]}", file=sys.stderr)
        else:
            print(hostfile_from_env(slots=args.slots)[2], end="")
    except SlurmEnvError as e:
        print(f"launch.slurm_hostfile: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
