"""Launch recipes the way users do (the ``deepspeed`` launcher, one node or a 2-node hostfile on this machine) and
cause faults in them: find a rank's process, SIGKILL it, limit its file size, wait for files to appear.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from launch.process import free_port

REPO = Path(__file__).resolve().parents[2]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
RECIPE = "finetune/lora.py"
CONFIG = "finetune/configs/lora.yaml"


def recipe_args(model_dir: Path, data: str, out: Path, *overrides: str) -> list[str]:
    """The recipe and its overrides for a tiny, fast, deterministic LoRA run on CPU."""
    return [
        RECIPE,
        "--config",
        CONFIG,
        f"model.name_or_path={model_dir}",
        f"data.train={data}",
        f"output_dir={out}",
        "data.seq_len=64",
        "train.micro_batch_size=2",
        "train.grad_accum=1",
        "train.warmup=0",
        "precision=fp32",
        "data.num_workers=0",
        "train.log_every=1",  # a loss per step, compared across the fault and the reference
        *overrides,
    ]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


@dataclass
class Launch:
    """One ``deepspeed`` launcher process (its own session, so it can be killed as a group) and its log."""

    proc: subprocess.Popen
    log: Path
    marker: str  # a string in the ranks' command lines (the output dir), to find their processes
    started: float = field(default_factory=time.monotonic)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill_all(self) -> None:
        """SIGKILL the launcher's whole session (launcher and ranks), as a node loss or an OOM killer would."""
        for pid in self.rank_pids().values():
            _kill(pid)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    def rank_pids(self) -> dict[int, int]:
        """Global rank -> pid of the training processes of this launch (found through /proc)."""
        return rank_pids(self.marker)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def rank_pids(marker: str) -> dict[int, int]:
    """Global rank -> pid of every live process whose command line names the recipe and contains ``marker``."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            env = (d / "environ").read_bytes().split(b"\0")
            status = (d / "status").read_text()
        except OSError:
            continue
        if "\nState:\tZ" in status:
            continue
        args = [a.decode(errors="replace") for a in cmd]
        if not any(a.endswith(RECIPE) for a in args) or not any(marker in a for a in args):
            continue
        for kv in env:
            if kv.startswith(b"RANK="):
                out[int(kv[5:])] = int(d.name)
    return out


def launch_single_node(args: list[str], log: Path, nprocs: int = 2, env: dict | None = None) -> Launch:
    """``deepspeed --num_gpus N recipe ...`` (on CPU the launcher starts N ranks on this host)."""
    cmd = [DEEPSPEED, "--num_gpus", str(nprocs), "--master_port", str(free_port()), *args]
    return _start(cmd, log, args, env)


def launch_two_nodes(args: list[str], tmp: Path, tag: str = "job", env: dict | None = None) -> list[Launch]:
    """A 2-node job on this machine: one launcher per node rank with ``--no_ssh``, one rank per node.

    The hostfile names this host twice under different names (``localhost`` and ``127.0.0.1``) so DeepSpeed sees two
    nodes; killing one node's rank leaves the other node's launcher and rank alive, as on a real cluster.
    """
    hostfile = tmp / f"{tag}.hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port = free_port()
    launches = []
    for node in (0, 1):
        cmd = [
            DEEPSPEED,
            "--hostfile",
            str(hostfile),
            "--no_ssh",
            "--node_rank",
            str(node),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
            *args,
        ]
        launches.append(_start(cmd, tmp / f"{tag}.node{node}.log", args, env))
    return launches


def _start(cmd: list[str], log: Path, args: list[str], env: dict | None) -> Launch:
    marker = next(a.split("=", 1)[1] for a in args if a.startswith("output_dir="))
    fh = open(log, "wb")  # noqa: SIM115 - the child writes to it for its whole life
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env={**_env(), **(env or {})}, start_new_session=True
    )
    fh.close()
    return Launch(proc, log, marker)


def wait_for(cond: Callable[[], object], timeout: float, what: str, poll: float = 0.05, launches=()) -> object:
    """Poll ``cond`` until truthy; fail with the launches' log tails if it takes longer than ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        for launch in launches:
            if launch.proc.poll() is not None and launch.proc.returncode != 0:
                raise AssertionError(f"{what}: launcher exited with {launch.proc.returncode}\n{launch.text()[-4000:]}")
        time.sleep(poll)
    tails = "\n".join(launch.text()[-3000:] for launch in launches)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")


def train_losses(out: Path) -> dict[int, float]:
    """step -> training loss from ``out/metrics.jsonl``."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if r.get("split") == "train"}


def last_logged_step(out: Path) -> int:
    losses = train_losses(out)
    return max(losses) if losses else 0
