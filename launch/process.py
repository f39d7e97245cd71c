"""Process helpers for everything that starts a child job (the demo, benchmarks, tests): the one home of
``free_port`` and ``run_logged``. No torch import: the demo and ``dsft`` start without it."""

from __future__ import annotations

import shlex
import socket
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path


class ChildFailed(RuntimeError):
    """A child process exited non-zero or ran out of time; the message has its command and the log's last lines."""


def free_port() -> int:
    """A TCP port free on this host right now (the OS picks it): for rendezvous of runs and tests that may start at the
    same time as others, which must never share 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(log: str | Path, lines: int = 25) -> str:
    """The last ``lines`` lines of a log file (what a failure message shows)."""
    return "\n".join(Path(log).read_text(errors="replace").splitlines()[-lines:])


def run_logged(
    cmd: Sequence[str],
    log: str | Path,
    what: str,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float | None = None,
) -> None:
    """Run ``cmd`` with stdout and stderr in ``log`` (which starts with the command line).

    Raises:
        ChildFailed: ``what`` failed (exit status or time-out), with the command and the log's tail.
    """
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        try:
            rc = subprocess.run(
                list(cmd), stdout=f, stderr=subprocess.STDOUT, env=dict(env) if env else None, cwd=cwd, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired as e:
            raise ChildFailed(f"{what} did not finish in {timeout:g} s: {shlex.join(cmd)}; see {log}") from e
    if rc != 0:
        raise ChildFailed(f"{what} failed (exit {rc}): {shlex.join(cmd)}\n--- last lines of {log} ---\n{log_tail(log)}")
