"""Step watchdog: a rank blocked in a collective whose peer died must not hang forever, nor die without a word.

Three layers bound how long a surviving rank waits after a peer is lost, and make it say why it stopped:

1. **Collective timeout** (``train.collective_timeout_s``, set once at init as the process-group ``timeout``). With
   gloo (CPU) a SIGKILLed peer closes its TCP sockets and the survivor's collective raises at once. With NCCL a
   collective with a dead peer spins on the GPU until torch's NCCL watchdog thread notices the timeout (or an error
   NCCL reports, e.g. a closed network connection), and ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` decides what happens then.
   torch 2.13's default is 3 (SkipCleanUp: see the comment above ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` in the installed
   ``torch/include/torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp``): like 1 (TearDown) it rethrows in that C++
   thread and the process ends with SIGABRT, so no Python exception ever reaches the report below. dsft therefore
   sets 2 (CleanUpOnly: abort the communicators, keep the process) unless the variable is already set
   (:func:`apply_nccl_env_defaults`): the blocked GPU work is released and the next collective raises
   ``DistBackendError`` in Python, which the guard (3.) reports. Note that ``torchrun`` sets 1 for its workers and
   ``launch/nccl_env.sh`` may set it too; a value set by anyone is kept.
2. **This watchdog** (``StepWatchdog``): a daemon thread that expects :meth:`StepWatchdog.beat` after every optimizer
   step. When none comes for ``timeout_s`` it prints one message naming this rank, the last completed step, the ranks
   that look lost, and the checkpoint to resume from, then ends the process with :data:`EXIT_STEP_TIMEOUT` via
   ``os._exit`` (a thread cannot interrupt a C++ collective; ``sys.exit`` would wait for it). On NCCL it is on by
   default, just under the collective timeout (:func:`default_step_timeout`), so it reports before torch's own
   teardown whatever ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` is, and it also catches what no collective timeout does (a
   rank hung in I/O, an NCCL abort that itself hangs). A known long wait (the other ranks waiting while rank 0 hashes
   a checkpoint) runs inside :meth:`StepWatchdog.allow` with its own bound.
3. **A guard around the loop** (:meth:`StepWatchdog.guard`): when a collective *raises* because a peer is gone
   (gloo's "Connection closed by peer", NCCL's aborted communicator; see :func:`is_peer_loss`) it prints the same
   message and exits with :data:`EXIT_PEER_LOST` instead of a 40-line traceback.

Naming the lost rank: with a ``heartbeat_dir`` on a filesystem every rank sees (the run's output dir), each rank's
watchdog thread rewrites ``heartbeat_dir/rank_XXXXX.json`` every ``heartbeat_s`` seconds *independently of training
progress*, with a counter that changes at every write. Nobody reads them while training runs. When a report is due,
the reporting rank reads its peers' files for a few heartbeats and judges them on *its own* monotonic clock: a rank
whose file changed while it watched is alive, one whose file did not change for 3 of the writer's heartbeats is
lost. No timestamp written by another host is compared with this host's clock, so clock skew between nodes does not
matter. A peer on the same host is judged at once by its pid. If no rank is lost, a rank is stuck (a hung data read,
a deadlock) rather than dead, and the message says so. With the watchdog off (``timeout_s <= 0``) each rank writes
its file once (host and pid, no refreshes): the guard can still name a dead rank on its own host, and says that
ranks on other hosts were not checked.

Time from a peer's death to the survivors exiting: gloo, about the time to reach the next collective plus up to
3 heartbeats to confirm which rank is gone (measured in ``tests/reliability``); NCCL, the time NCCL takes to report
the error (a network transport notices a closed connection), else at most the step timeout plus the same 3-4
heartbeats.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from pathlib import Path

from finetune import distributed as dist
from finetune.distributed import is_peer_loss  # re-exported: callers and tests import it from here

#: Exit code of a process ended by the watchdog (distinct from Python's 1 and a signal's 128+N).
EXIT_STEP_TIMEOUT = 86
#: Exit code the engine should use when a collective raised because a peer is gone (see :meth:`report_and_exit`).
EXIT_PEER_LOST = 87

#: What dsft sets for NCCL when the user has not (see the module docstring, layer 1). 2 = CleanUpOnly: abort the
#: communicators on an error or timeout but keep the process, so the failure reaches Python (exit 87 with the report)
#: instead of torch's default 3 ending the process with SIGABRT from its C++ watchdog thread.
NCCL_ENV_DEFAULTS = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}
# torch reads either name (ProcessGroupNCCL.hpp); a value under the legacy one is the user's choice too.
_NCCL_ENV_ALIASES = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ASYNC_ERROR_HANDLING")
}
# Modes in which torch's C++ watchdog ends the process itself at the collective timeout (1 TearDown, 3 SkipCleanUp).
_NCCL_TEARDOWN_MODES = ("1", "3")


def nccl_env_defaults(env: Mapping[str, str]) -> dict[str, str]:
    """The NCCL variables dsft would set given the environment ``env``: :data:`NCCL_ENV_DEFAULTS` minus those the
    user (or a launcher) already set, under either of torch's names."""
    return {
        key: value
        for key, value in NCCL_ENV_DEFAULTS.items()
        if not any(name in env for name in _NCCL_ENV_ALIASES.get(key, (key,)))
    }


def apply_nccl_env_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set :func:`nccl_env_defaults` in ``environ`` (default ``os.environ``) and return what was set.

    Must run before the NCCL process group is created: ``ProcessGroupNCCL`` reads the variables in its constructor.
    Harmless on gloo (nothing else reads them).
    """
    environ = os.environ if environ is None else environ
    added = nccl_env_defaults(environ)
    for key, value in added.items():
        environ.setdefault(key, value)
    return added


def default_step_timeout(backend: str, configured: float | None, collective_timeout_s: float) -> float:
    """The step timeout a run uses: ``configured`` when given (``0`` = off), otherwise automatic.

    Automatic: off on gloo, whose collectives raise at once when a peer dies (the guard reports it). On NCCL a dead
    peer blocks a collective instead, so the watchdog is on, and set just under ``collective_timeout_s`` (by 10 %, at
    most 60 s): it then fires, and prints its report, before torch's NCCL watchdog can end the process at the
    collective timeout, whatever ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` is; the margin leaves room for its 3-4
    heartbeats of confirming the lost rank (heartbeats are at most 5 s, :func:`heartbeat_interval`). The
    collective timeout already bounds the slowest legitimate wait of a step, a checkpoint's DeepSpeed write included
    (DeepSpeed ends it with a barrier on the NCCL group); rank 0's hashing of the checkpoint, the one wait that can be
    longer, runs under :meth:`StepWatchdog.allow` with a bound sized for the checkpoint. A step that is slower still
    (a huge evaluation between two steps) needs a larger ``train.collective_timeout_s`` or an explicit
    ``train.step_timeout_s``.

    Args:
        backend: The process group's backend, ``"nccl"`` or ``"gloo"``.
        configured: ``train.step_timeout_s``: None = automatic, 0 = off, > 0 = that many seconds.
        collective_timeout_s: ``train.collective_timeout_s``.
    """
    if configured is not None:
        return max(0.0, float(configured))
    if backend != "nccl":
        return 0.0
    return collective_timeout_s - min(60.0, 0.1 * collective_timeout_s)


def nccl_report_warning(
    env: Mapping[str, str], backend: str, step_timeout_s: float, collective_timeout_s: float
) -> str | None:
    """A warning when torch will end this NCCL run at the collective timeout before the watchdog can report, or None.

    That happens when ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` is 1 or 3 (set by the user, ``torchrun`` or a launch
    script; dsft itself sets 2) and the step watchdog is off or not shorter than the collective timeout.
    """
    if backend != "nccl":
        return None
    name = next((n for n in _NCCL_ENV_ALIASES["TORCH_NCCL_ASYNC_ERROR_HANDLING"] if n in env), None)
    mode = env[name].strip() if name else "3"  # unset: torch's default
    if mode not in _NCCL_TEARDOWN_MODES or 0 < step_timeout_s < collective_timeout_s:
        return None
    return (
        f"{name or 'TORCH_NCCL_ASYNC_ERROR_HANDLING'}={mode}: torch ends the process with SIGABRT when a collective "
        f"times out ({collective_timeout_s:g}s), before dsft's watchdog (train.step_timeout_s={step_timeout_s:g}) can "
        f"name the lost rank and the checkpoint to resume from. Set TORCH_NCCL_ASYNC_ERROR_HANDLING=2, or "
        f"train.step_timeout_s below train.collective_timeout_s."
    )


def heartbeat_interval(timeout_s: float) -> float:
    """Seconds between heartbeat writes for a step timeout: 1 % of it, within [1, 5] s.

    Each write is a create and a rename on the shared filesystem: 1 s keeps short test timeouts quick to report, 5 s
    keeps a 1000-rank job's default (~29 min timeout) at 200 metadata operations a second. The report waits up to
    4 heartbeats to tell lost ranks from live ones, 20 s at most.
    """
    return min(5.0, max(1.0, timeout_s / 100))


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

        wd = StepWatchdog(step_timeout_s, heartbeat_dir=out / "heartbeat", ckpt_root=out / "checkpoints")
        for step in ...:
            train_step()
            wd.beat(step)
            if saved:
                wd.note_checkpoint(path)
        wd.stop()

    Args:
        timeout_s: Seconds without a :meth:`beat` before the process is ended (:func:`default_step_timeout` picks
            it). Must cover the slowest legitimate step *including a checkpoint's write and an evaluation*; the
            first step (compilation, ZeRO-3 warm-up) too, since the clock starts at construction. ``<= 0`` disables
            the watchdog: no thread, and the heartbeat file is written once instead of every ``heartbeat_s``.
        on_timeout: Called with the message just before exiting (e.g. to flush metrics). Exceptions from it are
            printed and ignored so that the process still exits.
        heartbeat_dir: Shared directory for liveness files that let the message name lost ranks; None to skip.
        ckpt_root: Where checkpoints are saved, used to name the resume point when none was noted.
        rank: Global rank (default: ``finetune.distributed.rank()``).
        world_size: World size (default: ``finetune.distributed.world_size()``).
        heartbeat_s: Seconds between liveness writes (default :func:`heartbeat_interval`); a peer whose file does
            not change for 3 of its heartbeats, as seen by the reader, counts as lost.
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
        heartbeat_s: float | None = None,
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
        self.heartbeat_s = float(heartbeat_s) if heartbeat_s is not None else heartbeat_interval(self.timeout_s)
        self._exit = exit_fn
        self._lock = threading.Lock()
        self._last_beat = time.monotonic()
        self._last_step: int | None = None
        self._checkpoint: Path | None = None
        self._allowed: tuple[float, float, str] = (0.0, 0.0, "")  # allow() block: (monotonic deadline, seconds, what)
        self._seq = 0  # heartbeat writes so far: makes every write's content differ
        # rank -> [its file's text when last read, when this reader first read it, when it last saw it change]
        self._seen: dict[int, list] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.fired = False
        if self.heartbeat_dir is not None:
            self.heartbeat_dir.mkdir(parents=True, exist_ok=True)
            self._write_heartbeat()
        if report_uncaught:
            self._install_excepthook()
        if self.timeout_s > 0:
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

    @contextlib.contextmanager
    def allow(self, seconds: float, what: str) -> Iterator[None]:
        """A known long wait: inside the block the watchdog fires only after ``seconds`` (or the step timeout, if
        later); leaving the block counts as progress, like :meth:`beat` without a step number.

        Used around the wait for rank 0 hashing a checkpoint (``finetune.checkpoint``), which can outlast a step
        timeout set just under the collective timeout.
        """
        with self._lock:
            previous = self._allowed
            self._allowed = (time.monotonic() + seconds, seconds, what)
        try:
            yield
        finally:
            with self._lock:
                self._allowed = previous
                self._last_beat = time.monotonic()

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
        """Ranks that are gone, this rank excluded (see :meth:`peer_census`)."""
        return self.peer_census(grace_s)[0]

    def peer_census(self, grace_s: float = 0.0) -> tuple[list[int], list[int]]:
        """``(lost, unknown)`` ranks, this rank excluded, judged on this rank's own clock.

        A rank is lost when its heartbeat file is missing, its process is gone (same host: checked directly), or its
        file did not change for 3 of its heartbeats while this rank watched (earlier calls' looks count); it is alive
        when it is finished, its process exists (same host), or its file changes during this call. Ranks on other
        hosts that do not refresh their file (watchdog off) are unknown. Until a rank is judged its file is read
        again, for at most ``grace_s`` seconds.

        Args:
            grace_s: How long to keep watching ranks not judged yet. 3-4 heartbeats judge every rank.
        """
        if self.heartbeat_dir is None:
            return [], []
        deadline = time.monotonic() + grace_s
        host = socket.gethostname()
        pending = [r for r in range(self.world_size) if r != self.rank]
        lost: list[int] = []
        unknown: list[int] = []
        first_look = True
        while True:
            now, undecided = time.monotonic(), []
            for r in pending:
                verdict = self._judge(r, host, now, first_look)
                if verdict == "lost":
                    lost.append(r)
                elif verdict == "unknown":
                    unknown.append(r)
                elif verdict is None:
                    undecided.append(r)
            pending, first_look = undecided, False
            if not pending or time.monotonic() >= deadline:
                return sorted(lost), sorted(unknown)
            time.sleep(max(0.05, self.heartbeat_s / 4))

    def _judge(self, r: int, host: str, now: float, first_look: bool) -> str | None:
        """``"lost"``, ``"alive"``, ``"unknown"``, or None when rank ``r``'s file has not been watched long enough
        (``now``: this reader's monotonic clock; ``first_look``: the census's first read of the file)."""
        try:
            text = (self.heartbeat_dir / f"rank_{r:05d}.json").read_text()
            hb = json.loads(text)
        except (OSError, json.JSONDecodeError):
            return "lost"  # never written (died before its watchdog started) or removed
        if hb.get("finished"):
            return "alive"
        if hb.get("host") == host:
            return "alive" if _pid_alive(int(hb.get("pid", 0))) else "lost"
        every = float(hb.get("heartbeat_s", self.heartbeat_s))
        if every <= 0:
            return "unknown"  # written once, never refreshed: its watchdog is off
        seen = self._seen.get(r)
        if seen is None:
            self._seen[r] = [text, now, None]
            return None
        if text != seen[0]:
            seen[0], seen[2] = text, now
            # Alive only when it changed between two reads of this census: a change since an earlier call may be old.
            return None if first_look else "alive"
        unchanged_since = seen[2] if seen[2] is not None else seen[1]
        return "lost" if now - unchanged_since > 3 * every else None

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
        """The one-paragraph report printed before exiting (``grace_s``: see :meth:`peer_census`)."""
        with self._lock:
            step = self._last_step
        lost, unknown = self.peer_census(grace_s)
        if lost:
            who = f"lost rank(s) {', '.join(map(str, lost))} (heartbeat stopped)"
        elif unknown:
            who = (
                f"no rank on this host died; rank(s) {', '.join(map(str, unknown))} on other hosts not checked "
                "(their heartbeats are off with the step watchdog: set train.step_timeout_s to name a lost rank)"
            )
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
        # Peers are judged by watching their files change: 3 heartbeats judge a lost one, 4 leave room for a late write.
        msg = self.message(reason, grace_s=4 * self.heartbeat_s)
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
            self._seq += 1
            seq = self._seq
        hb = {
            "rank": self.rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "seq": seq,  # readers judge liveness by the file changing, on their own clock
            "step": step,
            "finished": finished,
            "heartbeat_s": self.heartbeat_s if self.timeout_s > 0 else 0,  # 0: written once, never refreshed
            "written_unix": time.time(),  # for people reading the file; never compared with another host's clock
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
        next_hb = time.monotonic() + self.heartbeat_s  # the constructor wrote the first one
        while not self._stop.wait(tick):
            now = time.monotonic()
            if now >= next_hb:
                self._write_heartbeat()
                next_hb = now + self.heartbeat_s
            with self._lock:
                idle = now - self._last_beat
                allowed_until, allowed_s, what = self._allowed
            if idle > self.timeout_s and now > allowed_until:
                if allowed_until:
                    reason = f"{what} took longer than the {allowed_s:g}s allowed for it"
                else:
                    reason = f"no training step finished for {idle:.0f}s (train.step_timeout_s={self.timeout_s:g})"
                self.report_and_exit(reason, EXIT_STEP_TIMEOUT)
                return
