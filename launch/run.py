"""Build and run the exact ``deepspeed`` launcher command for one node, many nodes (hostfile) or a SLURM job.

    python -m launch.run [launcher options] [--dry-run] SCRIPT [SCRIPT ARGS...]

Examples (``--dry-run`` prints the command, shell-quoted, instead of running it)::

    python -m launch.run --num_gpus 8 finetune/lora.py --config finetune/configs/lora.yaml
    python -m launch.run --hostfile launch/hostfile.example --master_addr 10.0.0.1 finetune/full.py --config ...
    python -m launch.run --hostfile hosts --no_ssh --node_rank 1 --master_addr 10.0.0.1 finetune/full.py ...
    srun --ntasks-per-node=1 python -m launch.run --slurm finetune/full.py --config ...   # in an allocation

Only launcher flags live here: hyper-parameters belong to the recipe's YAML config and its ``key=value`` overrides,
which are passed through untouched after SCRIPT.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from launch.slurm_hostfile import SlurmEnvError, write_hostfile

LAUNCHERS = ("pdsh", "openmpi", "slurm", "mvapich", "mpich", "impi")
DEFAULT_MASTER_PORT = 29500


class LaunchError(ValueError):
    """Launcher flags that cannot work together; the message says which flag to change."""


def add_launcher_arguments(p: argparse.ArgumentParser) -> None:
    """The launcher flags, shared by ``python -m launch.run`` and ``dsft train``: DeepSpeed's names
    (``--num_gpus``), each also spelled with dashes (``--num-gpus``), plus ``--slurm``, ``--slots`` and ``--dry-run``."""

    def both(name: str) -> list[str]:
        return [f"--{name}", f"--{name.replace('_', '-')}"] if "_" in name else [f"--{name}"]

    g = p.add_argument_group("one node")
    g.add_argument(
        *both("num_gpus"), dest="num_gpus", type=int, help="processes (GPUs, or CPU ranks on a CPU box) per node"
    )
    g = p.add_argument_group("many nodes")
    g.add_argument("--hostfile", help="MPI-style hostfile, one 'host slots=N' line per node (launch/hostfile.example)")
    g.add_argument(*both("num_nodes"), dest="num_nodes", type=int, help="use only the first N hosts of the hostfile")
    g.add_argument("--include", help="deepspeed resource filter, e.g. 'worker-0@worker-1:0,2'")
    g.add_argument("--exclude", help="deepspeed resource filter, e.g. 'worker-1:0'")
    g.add_argument(*both("master_addr"), dest="master_addr", help="address of rank 0's node, reachable from every node")
    g.add_argument(
        *both("master_port"),
        dest="master_port",
        type=int,
        help=f"rendezvous port (deepspeed default {DEFAULT_MASTER_PORT})",
    )
    g.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        help="how deepspeed starts remote ranks (default pdsh, over ssh). The MPI ones and slurm start ranks with "
        "mpirun/srun; finetune.distributed maps their rank variables (needs MASTER_ADDR exported to every rank)",
    )
    g.add_argument(
        *both("launcher_args"), dest="launcher_args", help="extra arguments for the launcher backend, one quoted string"
    )
    g.add_argument(
        *both("no_ssh"),
        dest="no_ssh",
        action="store_true",
        help="start this node's ranks only (run the same command on every node with its --node_rank)",
    )
    g.add_argument(
        *both("node_rank"), dest="node_rank", type=int, help="this node's index in the hostfile; only with --no_ssh"
    )
    g = p.add_argument_group("SLURM")
    g.add_argument(
        "--slurm",
        action="store_true",
        help="under `srun --ntasks-per-node=1` in an allocation: hostfile from SLURM_JOB_NODELIST, master = first "
        "node, --no_ssh --node_rank SLURM_NODEID",
    )
    g.add_argument("--slots", type=int, help="with --slurm: processes per node (default: from the SLURM variables)")
    p.add_argument(
        *both("dry_run"), dest="dry_run", action="store_true", help="print the exact command (shell-quoted) and exit"
    )
    p.add_argument("--deepspeed", help="the deepspeed executable (default: next to this Python, else on PATH)")


def build_parser() -> argparse.ArgumentParser:
    """The ``launch.run`` argument parser: the launcher flags, then SCRIPT and its arguments."""
    p = argparse.ArgumentParser(
        prog="python -m launch.run",
        description="Run a dsft recipe under the deepspeed launcher (one node, a hostfile, or SLURM).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    add_launcher_arguments(p)
    p.add_argument("script", help="the recipe, e.g. finetune/lora.py")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="the recipe's arguments, passed through untouched")
    return p


def find_deepspeed(explicit: str | None = None) -> str:
    """The ``deepspeed`` launcher to run: ``explicit``, else the one installed beside this interpreter, else PATH.

    The one beside ``sys.executable`` comes first so a venv's launcher (which starts ranks with the venv's Python) is
    used even when the venv is not activated, as in ``make demo``.
    """
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "deepspeed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("deepspeed")
    if found is None:
        raise LaunchError("deepspeed launcher not found beside this Python or on PATH: run `make install`")
    return found


def build_command(
    args: argparse.Namespace,
    env: Mapping[str, str] | None = None,
    slurm_hostfile_dir: str | Path | None = None,
) -> list[str]:
    """Turn parsed ``launch.run`` arguments into the ``deepspeed`` argv (after checking the flags fit together).

    Args:
        args: from :func:`build_parser`.
        env: variables to read with ``--slurm`` (default ``os.environ``).
        slurm_hostfile_dir: where ``--slurm`` writes its hostfile when ``--hostfile`` is not given
            (default: the temp dir; the file is named after ``SLURM_JOB_ID``). Each node writes its own copy.

    Returns:
        The full command, starting with the deepspeed executable.
    """
    env = os.environ if env is None else env
    hostfile, master_addr, launcher = args.hostfile, args.master_addr, args.launcher
    node_rank, no_ssh = args.node_rank, args.no_ssh
    if args.slurm:
        # One launcher per node (srun --ntasks-per-node=1), each starting its own ranks with --no_ssh. Not
        # `--launcher slurm`: that starts ranks with a bare srun which sets no RANK/WORLD_SIZE/MASTER_ADDR, so the
        # recipe would have to discover its rank from SLURM variables itself.
        if args.no_ssh or args.node_rank is not None or launcher is not None:
            raise LaunchError("--slurm sets --no_ssh, --node_rank (SLURM_NODEID) and the launcher itself; drop them")
        if not env.get("SLURM_NODEID", "").isdigit():
            raise LaunchError(
                "--slurm: SLURM_NODEID is not set; run it under `srun --ntasks-per-node=1` (see launch/slurm.sbatch)"
            )
        if hostfile is None:
            folder = Path(slurm_hostfile_dir or tempfile.gettempdir())
            hostfile = str(folder / f"dsft-hostfile-{env.get('SLURM_JOB_ID', 'local')}")
        try:
            hosts = write_hostfile(hostfile, env=env, slots=args.slots)
        except SlurmEnvError as e:
            raise LaunchError(f"--slurm: {e}") from e
        master_addr = master_addr or hosts[0]
        node_rank, no_ssh = int(env["SLURM_NODEID"]), True
    elif args.slots is not None:
        raise LaunchError("--slots only applies with --slurm; for a hostfile write 'host slots=N' lines")

    if node_rank is not None and not no_ssh:
        raise LaunchError("--node_rank only applies with --no_ssh (with ssh, deepspeed numbers the nodes itself)")
    if no_ssh:
        if node_rank is None or node_rank < 0:
            raise LaunchError("--no_ssh needs --node_rank N (this node's line index in the hostfile, from 0)")
        if not hostfile or not master_addr:
            raise LaunchError("--no_ssh needs --hostfile and --master_addr, the same on every node")
    multi_node_flags = [
        f"--{name}"
        for name in ("num_nodes", "include", "exclude", "launcher", "launcher_args")
        if getattr(args, name) is not None
    ]
    if hostfile is None and multi_node_flags:
        raise LaunchError(f"{', '.join(multi_node_flags)} need(s) --hostfile (or --slurm inside an allocation)")
    if hostfile is not None and not Path(hostfile).is_file():
        # deepspeed only warns and silently falls back to local devices; a typo should not train on one node.
        raise LaunchError(f"--hostfile {hostfile}: no such file (see launch/hostfile.example)")
    if args.num_gpus is not None and args.num_gpus < 1:
        raise LaunchError(f"--num_gpus {args.num_gpus}: expected at least 1")

    cmd = [find_deepspeed(args.deepspeed)]
    if hostfile is not None:
        cmd += ["--hostfile", str(hostfile)]
    for name in ("num_nodes", "num_gpus", "include", "exclude"):
        value = getattr(args, name)
        if value is not None:
            cmd += [f"--{name}", str(value)]
    if master_addr is not None:
        cmd += ["--master_addr", master_addr]
    if args.master_port is not None:
        cmd += ["--master_port", str(args.master_port)]
    if launcher is not None:
        cmd += ["--launcher", launcher]
    if args.launcher_args is not None:
        cmd += ["--launcher_args", args.launcher_args]
    if no_ssh:
        cmd += ["--no_ssh", "--node_rank", str(node_rank)]
    return cmd + [args.script, *args.script_args]


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: print the command with ``--dry-run``, else run it and return its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cmd = build_command(args)
    except LaunchError as e:
        parser.error(str(e))
    return run_or_show(cmd, args.dry_run, "launch.run")


def run_or_show(cmd: Sequence[str], dry_run: bool, who: str) -> int:
    """``--dry-run``: print ``cmd`` shell-quoted (stdout), exit 0; else say it on stderr and return its exit status."""
    if dry_run:
        print(shlex.join(cmd))
        return 0
    print(f"{who}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    return subprocess.call(list(cmd))


if __name__ == "__main__":
    sys.exit(main())
