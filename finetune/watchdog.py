"""Step watchdog: a rank blocked in a collective whose peer died must not hang forever.

Two layers bound how long a surviving rank waits after a peer is lost:

1. **Collective timeout** (set once at init): ``deepspeed.init_distributed(timeout=timedelta(seconds=T))`` /
   ``torch.distributed.init_process_group(timeout=...)``. With gloo (CPU) a SIGKILLed peer usually closes its TCP
   sockets and the survivor's collective raises at once; with NCCL a collective blocks until ``T`` (and only aborts
   when ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1``, the default since torch 2.2). ``T`` must exceed the slowest legitimate
   collective, e.g. the first ZeRO-3 gather or a checkpoint save's barrier.
2. **This watchdog** (``StepWatchdog``): a daemon thread that expects :meth:`StepWatchdog.beat` after every optimizer
   step. When none comes for ``timeout_s`` it prints one message naming this rank, the last completed step, the ranks
   that look lost, and the checkpoint to resume from, then ends the process with :data:`EXIT_STEP_TIMEOUT` via
   ``os._exit`` (a thread cannot interrupt a C++ collective; ``sys.exit`` would wait for it).

Naming the lost rank: with a ``heartbeat_dir`` on a filesystem every rank sees (the run's output dir), each rank's
watchdog thread rewrites ``heartbeat_dir/rank_XXXXX.json`` every ``heartbeat_s`` seconds *independently of training
progress*. A rank that is alive but blocked keeps its heartbeat fresh; a killed rank's heartbeat goes stale. So on a
timeout the ranks with stale (or missing) heartbeats are the lost ones; if none is stale, a rank is stuck (a hung
data read, a deadlock) rather than dead, and the message says so.

3. **A guard around the loop** (:meth:`StepWatchdog.guard`): when a collective *raises* because a peer is gone
   (gloo's "Connection closed by peer", NCCL's aborted communicator; see :func:`is_peer_loss`) it prints the same
   message and exits with :data:`EXIT_PEER_LOST` instead of a 40-line traceback.

Time from a peer's death to the survivors exiting: gloo, about the time to reach the next collective plus up to
``4 * heartbeat_s`` to confirm which rank is gone (measured in ``tests/reliability``); NCCL or any hang, at most
``min(collective timeout, timeout_s + heartbeat_s)``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from finetune import distributed as dist

#: Exit code of a process ended by the watchdog (distinct from Python's 1 and a signal's 128+N).
EXIT_STEP_TIMEOUT = 86
#: Exit code the engine should use when a collective raised because a peer is gone (see :meth:`report_and_exit`).
EXIT_PEER_LOST = 87


# What torch.distributed raises in a survivor when a peer process dies: gloo closes the TCP pair at once; NCCL
# reports through its own watchdog (TORCH_NCCL_ASYNC_ERROR_HANDLING) after the process-group timeout.
_PEER_LOSS_PATTERNS = (
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "remote worker crashing",
    "nccl communicator was aborted",
    "watchdog caught collective operation timeout",
    "socket timeout",
    "timed out waiting",  # gloo: "Timed out waiting 1800000ms for recv operation to complete"
)


def is_peer_loss(exc: BaseException) -> bool:
    """True when ``exc`` is a collective failure caused by a lost peer (not a bug in this rank's code)."""
    import torch.distributed as tdist

    if isinstance(exc, tdist.DistError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return any(p in text for p in _PEER_LOSS_PATTERNS)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:300]


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    # A zombie (killed, not yet reaped by its launcher) is dead for our purposes.
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except OSError:
        return True


class StepWatchdog:
    """Exit the process when no training step completes within ``timeout_s`` seconds.

    Example::

        wd = StepWatchdog(cfg.train.step_timeout_s, heartbeat_dir=out / "heartbeat", ckpt_root=out / "checkpoints")
        for step in ...:
            train_step()
            wd.beat(step)
            if saved:
                wd.note_checkpoint(path)
        wd.stop()

    Args:
        timeout_s: Seconds without a :meth:`beat` before the process is ended. Must cover the slowest legitimate
            step *including a checkpoint save and an evaluation*; the first step (compilation, ZeRO-3 warm-up) too,
            since the clock starts at construction. ``<= 0`` disables the watchdog (no thread is started).
        on_timeout: Called with the message just before exiting (e.g. to flush metrics). Exceptions from it are
            printed and ignored so that the process still exits.
        heartbeat_dir: Shared directory for liveness files that let the message name lost ranks; None to skip.
        ckpt_root: Where checkpoints are saved, used to name the resume point when none was noted.
        rank: Global rank (default: ``finetune.distributed.rank()``).
        world_size: World size (default: ``finetune.distributed.world_size()``).
        heartbeat_s: Seconds between liveness writes; a heartbeat older than ``3 * heartbeat_s`` counts as lost.
        exit_fn: Replaces ``os._exit`` (tests only).
        report_uncaught: Also report a peer-loss exception that nobody caught (``sys.excepthook``): the usual
            traceback is printed after the report and the process exits with :data:`EXIT_PEER_LOST`. A safety net
            for loops not wrapped in :meth:`guard`; other exceptions are left to the previous hook.
    """

    def __init__(
        self,
        timeout_s: float,
        on_timeout: Callable[[str], None] | None = None,
        *,
        heartbeat_dir: str | os.PathLike | None = None,
        ckpt_root: str | os.PathLike | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        heartbeat_s: float = 1.0,
        exit_fn: Callable[[int], None] = os._exit,
        report_uncaught: bool = True,
    ) -> None:
        self.timeout_s = float(timeout_s)
        self.on_timeout = on_timeout
        self.ckpt_root = Path(ckpt_root) if ckpt_root is not None else None
        if heartbeat_dir is None and self.ckpt_root is not None:
            heartbeat_dir = self.ckpt_root.parent / "heartbeat"  # output_dir/heartbeat next to output_dir/checkpoints
        self.heartbeat_dir = Path(heartbeat_dir) if heartbeat_dir is not None else None
        self.rank = dist.rank() if rank is None else rank
        self.world_size = dist.world_size() if world_size is None else world_size
        self.heartbeat_s = float(heartbeat_s)
        self._exit = exit_fn
        self._lock = threading.Lock()
        self._last_beat = time.monotonic()
        self._last_step: int | None = None
        self._checkpoint: Path | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.fired = False
        if self.heartbeat_dir is not None:
            self.heartbeat_dir.mkdir(parents=True, exist_ok=True)
        if report_uncaught:
            self._install_excepthook()
        if self.timeout_s > 0 or self.heartbeat_dir is not None:
            # The thread also runs with the step timeout disabled: peers need this rank's heartbeat to name it lost.
            self._write_heartbeat()
            self._thread = threading.Thread(target=self._run, name=f"dsft-watchdog-rank{self.rank}", daemon=True)
            self._thread.start()

    # ---------------------------------------------------------------- called by the training loop
    def beat(self, step: int | None = None) -> None:
        """Record that a step completed (``step`` = its number, shown in the timeout message)."""
        with self._lock:
            self._last_beat = time.monotonic()
            if step is not None:
                self._last_step = step

    def note_checkpoint(self, path: str | os.PathLike) -> None:
        """Record the newest complete checkpoint, named in the message as the resume point."""
        with self._lock:
            self._checkpoint = Path(path)

    def stop(self) -> None:
        """Stop the thread (call at the end of training, before the final export, or before a long pause)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(1.0, self.heartbeat_s * 2))
        if self.heartbeat_dir is not None:
            # A finished rank must not look lost to a slower peer: mark it finished instead of deleting the file.
            self._write_heartbeat(finished=True)

    # ---------------------------------------------------------------- fault reporting
    def lost_ranks(self, grace_s: float = 0.0) -> list[int]:
        """Ranks that are gone, this rank excluded.

        A rank is gone when its heartbeat file is missing, its process no longer exists (same host: checked
        directly), or its heartbeat is older than ``3 * heartbeat_s``. Right after a peer died its heartbeat is still
        fresh, so with ``grace_s`` > 0 the check is repeated until a rank is found or ``grace_s`` has passed.

        Args:
            grace_s: How long to keep looking when no rank is found gone yet.
        """
        if self.heartbeat_dir is None:
            return []
        deadline = time.monotonic() + grace_s
        host = socket.gethostname()
        while True:
            now, lost = time.time(), []
            for r in range(self.world_size):
                if r == self.rank:
                    continue
                try:
                    hb = json.loads((self.heartbeat_dir / f"rank_{r:05d}.json").read_text())
                except (OSError, json.JSONDecodeError):
                    lost.append(r)
                    continue
                if hb.get("finished"):
                    continue
                if hb.get("host") == host and not _pid_alive(int(hb.get("pid", 0))):
                    lost.append(r)
                elif now - float(hb.get("alive_unix", 0)) > 3 * self.heartbeat_s:
                    lost.append(r)
            if lost or time.monotonic() >= deadline:
                return lost
            time.sleep(min(0.2, self.heartbeat_s))

    def resume_hint(self) -> str:
        """The checkpoint to resume from, as text for the message."""
        with self._lock:
            ckpt = self._checkpoint
        if self.ckpt_root is not None:
            from finetune.checkpoint import find_latest_checkpoint

            # The disk, not the noted path, is the truth: a save can complete on disk while this rank's call of it
            # fails in its closing barrier because the peer died right then. Sizes only: the process is about to
            # exit and must not spend minutes hashing.
            ckpt = find_latest_checkpoint(self.ckpt_root, verify_hashes=False) or ckpt
        if ckpt is None:
            return "no complete checkpoint yet: a restart starts from step 0"
        return f"resume from {ckpt} (restart the same command; train.resume=auto picks it up)"

    def message(self, reason: str, grace_s: float = 0.0) -> str:
        """The one-paragraph report printed before exiting (``grace_s``: see :meth:`lost_ranks`)."""
        with self._lock:
            step = self._last_step
        lost = self.lost_ranks(grace_s)
        if lost:
            who = f"lost rank(s) {', '.join(map(str, lost))} (heartbeat stopped)"
        elif self.heartbeat_dir is not None:
            who = "every rank's heartbeat is fresh: a rank is stuck (hung I/O or deadlock), none died"
        else:
            who = "lost rank unknown (no heartbeat_dir)"
        return (
            f"[dsft watchdog] rank {self.rank}/{self.world_size} on {socket.gethostname()}: {reason}; "
            f"last completed step {step if step is not None else 'none'}; {who}; {self.resume_hint()}"
        )

    def report_and_exit(self, reason: str, code: int = EXIT_PEER_LOST) -> None:
        """Print :meth:`message` for ``reason`` and end the process with ``code`` (no cleanup that could block).

        The engine calls this when a collective raises because a peer disappeared (gloo: "Connection closed by
        peer"), so that the message has the same shape as a watchdog timeout.
        """
        self.fired = True
        self._stop.set()
        # A collective fails the moment a peer's socket closes, before its heartbeat can go stale: allow for that.
        msg = self.message(reason, grace_s=4 * self.heartbeat_s if code == EXIT_PEER_LOST else 0.0)
        print(f"\n{msg}", file=sys.stderr, flush=True)  # own line: a progress bar may have left the cursor mid-line
        if self.on_timeout is not None:
            try:
                self.on_timeout(msg)
            except Exception as e:  # noqa: BLE001 - the exit below must happen whatever the callback does
                print(f"[dsft watchdog] on_timeout callback failed: {e!r}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        self._exit(code)

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Turn a collective that failed because a peer is gone into the same report and a distinct exit code.

        Wrap the training loop (and the final save) in it::

            with watchdog.guard():
                while step < total_steps: ...

        Any other exception propagates unchanged.
        """
        try:
            yield
        except Exception as e:
            if not is_peer_loss(e):
                raise
            self.report_and_exit(f"a collective failed because a peer is gone ({_first_line(e)})", EXIT_PEER_LOST)

    def _install_excepthook(self) -> None:
        previous = sys.excepthook

        def hook(tp, value, tb):
            if value is None or not is_peer_loss(value):
                previous(tp, value, tb)
                return
            previous(tp, value, tb)  # the traceback first, so the report is the last thing in the log
            self.report_and_exit(f"a collective failed because a peer is gone ({_first_line(value)})", EXIT_PEER_LOST)

        sys.excepthook = hook

    # ---------------------------------------------------------------- thread
    def _write_heartbeat(self, finished: bool = False) -> None:
        if self.heartbeat_dir is None:
            return
        with self._lock:
            step = self._last_step
        hb = {
            "rank": self.rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "alive_unix": time.time(),
            "step": step,
            "finished": finished,
        }
        path = self.heartbeat_dir / f"rank_{self.rank:05d}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(json.dumps(hb))
            os.replace(tmp, path)  # readers never see a torn file
        except OSError as e:
            # Liveness files are diagnostics; a full disk must not kill training from the watchdog thread.
            print(f"[dsft watchdog] rank {self.rank}: cannot write heartbeat {path}: {e}", file=sys.stderr)

    def _run(self) -> None:
        tick = min(self.heartbeat_s, max(0.05, self.timeout_s / 10))
        next_hb = 0.0
        while not self._stop.wait(tick):
            now = time.monotonic()
            if now >= next_hb:
                self._write_heartbeat()
                next_hb = now + self.heartbeat_s
            with self._lock:
                idle = now - self._last_beat
            if self.timeout_s > 0 and idle > self.timeout_s:
                self.report_and_exit(
                    f"no training step finished for {idle:.0f}s (train.step_timeout_s={self.timeout_s:g})",
                    EXIT_STEP_TIMEOUT,
                )
                return
