"""finetune.watchdog decisions without a GPU: the NCCL environment dsft sets, the automatic step timeout, heartbeat
liveness judged on the reader's clock (skewed writers), heartbeats off with the watchdog, and allow().

The process-level behaviour (real exits, a real lost rank) is tested in tests/reliability/.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from finetune.watchdog import (
    EXIT_STEP_TIMEOUT,
    StepWatchdog,
    apply_nccl_env_defaults,
    default_step_timeout,
    heartbeat_interval,
    nccl_env_defaults,
    nccl_report_warning,
)


# ---------------------------------------------------------------------------------------------------- NCCL environment
def test_nccl_env_defaults_let_errors_reach_python_and_keep_the_users_value():
    assert nccl_env_defaults({}) == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}  # CleanUpOnly: no C++ teardown
    assert nccl_env_defaults({"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}) == {}  # e.g. torchrun's own default
    assert nccl_env_defaults({"NCCL_ASYNC_ERROR_HANDLING": "0"}) == {}  # the legacy name torch also reads

    env = {"PATH": "/bin"}
    assert apply_nccl_env_defaults(env) == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}
    assert env == {"PATH": "/bin", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}
    mine = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"}
    assert apply_nccl_env_defaults(mine) == {} and mine == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"}


# ---------------------------------------------------------------------------------------------------- step timeout
def test_step_timeout_is_automatic_on_nccl_off_on_gloo_and_the_users_value_wins():
    assert default_step_timeout("nccl", None, 1800) == 1740  # just under the collective timeout
    assert default_step_timeout("nccl", None, 120) == 108
    assert default_step_timeout("gloo", None, 1800) == 0  # gloo raises at once: the guard reports
    assert default_step_timeout("nccl", 0, 1800) == 0  # explicitly off
    assert default_step_timeout("nccl", 300, 1800) == 300
    assert default_step_timeout("gloo", 300, 1800) == 300
    for collective in (60, 120, 600, 1800, 7200):
        step = default_step_timeout("nccl", None, collective)
        # The report (fire detection <= 1 heartbeat, then <= 4 heartbeats judging peers) ends before torch's teardown.
        assert step + 5 * heartbeat_interval(step) <= collective, collective


def test_warns_when_torch_would_abort_before_the_watchdog_reports():
    assert nccl_report_warning({"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}, "nccl", 0, 1800) is None
    assert nccl_report_warning({"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}, "nccl", 1740, 1800) is None
    warning = nccl_report_warning({"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}, "nccl", 3600, 1800)
    assert warning and "SIGABRT" in warning and "TORCH_NCCL_ASYNC_ERROR_HANDLING=2" in warning
    assert nccl_report_warning({}, "nccl", 0, 1800)  # torch's default 3 with the watchdog off
    assert nccl_report_warning({}, "gloo", 0, 1800) is None


# ---------------------------------------------------------------------------------------------------- heartbeats
class _RemoteWriter:
    """Rank 1 on another host whose wall clock is ``skew_s`` off: rewrites its heartbeat every ``every`` seconds."""

    def __init__(self, hb_dir, skew_s: float, every: float = 0.1):
        self.path, self.skew_s, self.every = hb_dir / "rank_00001.json", skew_s, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        seq = 0
        while not self._stop.is_set():
            seq += 1
            stamp = time.time() + self.skew_s
            hb = {"rank": 1, "host": "node-b", "pid": 4242, "seq": seq, "step": seq, "finished": False}
            hb.update(heartbeat_s=self.every, written_unix=stamp, alive_unix=stamp)  # alive_unix: the old format
            tmp = self.path.with_name(".tmp")
            tmp.write_text(json.dumps(hb))
            tmp.replace(self.path)
            self._stop.wait(self.every)

    def stop(self):
        self._stop.set()
        self._thread.join()


@pytest.mark.parametrize("skew_s", [-3600, 3600])
def test_liveness_uses_the_readers_clock_not_the_writers(tmp_path, skew_s):
    writer = _RemoteWriter(tmp_path, skew_s)
    reader = StepWatchdog(0, heartbeat_dir=tmp_path, rank=0, world_size=2, heartbeat_s=0.1, report_uncaught=False)
    try:
        time.sleep(0.3)
        assert reader.lost_ranks(grace_s=2.0) == [], "a writer whose file keeps changing is alive, whatever its clock"
        time.sleep(0.5)  # the verdict holds on later looks
        assert reader.lost_ranks(grace_s=2.0) == []
    finally:
        writer.stop()
    t0 = time.monotonic()
    assert reader.lost_ranks(grace_s=3.0) == [1], "a writer that stopped changing its file is lost"
    assert time.monotonic() - t0 < 1.0, "judged after ~3 of its heartbeats (0.3 s), not at the end of the grace"


def test_a_file_never_seen_changing_is_judged_after_three_heartbeats(tmp_path):
    (tmp_path / "rank_00001.json").write_text(
        json.dumps({"rank": 1, "host": "node-b", "pid": 1, "seq": 7, "heartbeat_s": 0.2, "alive_unix": time.time()})
    )
    reader = StepWatchdog(0, heartbeat_dir=tmp_path, rank=0, world_size=2, heartbeat_s=0.2, report_uncaught=False)
    t0 = time.monotonic()
    assert reader.lost_ranks(grace_s=0.3) == [], "too short a look to judge: not called lost"
    assert reader.lost_ranks(grace_s=2.0) == [1]
    assert 0.6 <= time.monotonic() - t0 < 1.5


def test_watchdog_off_writes_its_heartbeat_once_and_peers_elsewhere_are_not_judged(tmp_path):
    wd = StepWatchdog(0, heartbeat_dir=tmp_path, rank=0, world_size=3, heartbeat_s=0.05, report_uncaught=False)
    first = (tmp_path / "rank_00000.json").read_text()
    time.sleep(0.3)
    assert wd._thread is None and (tmp_path / "rank_00000.json").read_text() == first, "no rewrites when off"
    assert json.loads(first)["heartbeat_s"] == 0
    # Rank 1 on another host with its watchdog off: cannot be judged. Rank 2 on this host, process gone: lost.
    (tmp_path / "rank_00001.json").write_text(json.dumps({"rank": 1, "host": "node-b", "pid": 1, "heartbeat_s": 0}))
    host = socket.gethostname()
    (tmp_path / "rank_00002.json").write_text(json.dumps({"rank": 2, "host": host, "pid": 0, "heartbeat_s": 0}))
    assert wd.peer_census(grace_s=1.0) == ([2], [1])
    (tmp_path / "rank_00002.json").unlink()
    (tmp_path / "rank_00002.json").write_text(json.dumps({"rank": 2, "finished": True}))
    msg = wd.message("test")
    assert "rank(s) 1 on other hosts not checked" in msg and "train.step_timeout_s" in msg
    wd.stop()
    assert json.loads((tmp_path / "rank_00000.json").read_text())["finished"] is True


def test_watchdog_on_rewrites_its_heartbeat(tmp_path):
    wd = StepWatchdog(30, heartbeat_dir=tmp_path, rank=0, world_size=1, heartbeat_s=0.05, report_uncaught=False)
    try:
        seqs = set()
        for _ in range(6):
            seqs.add(json.loads((tmp_path / "rank_00000.json").read_text())["seq"])
            time.sleep(0.06)
        assert len(seqs) >= 3
    finally:
        wd.stop()


# ---------------------------------------------------------------------------------------------------- allow()
def test_allow_holds_the_watchdog_for_a_known_long_wait_and_bounds_it(tmp_path):
    codes, messages = [], []
    wd = StepWatchdog(0.3, messages.append, rank=0, world_size=1, heartbeat_s=0.05, exit_fn=codes.append)
    with wd.allow(1.5, "rank 0 hashing checkpoint step_00000004"):
        time.sleep(0.8)  # longer than the step timeout, within the allowance
    assert codes == []
    time.sleep(0.1)  # leaving the block counted as progress
    assert codes == []
    with wd.allow(0.5, "rank 0 hashing checkpoint step_00000008"):
        deadline = time.monotonic() + 5
        while not codes and time.monotonic() < deadline:
            time.sleep(0.05)
    wd.stop()
    assert codes == [EXIT_STEP_TIMEOUT]
    assert "rank 0 hashing checkpoint step_00000008 took longer than the 0.5s allowed for it" in messages[0]
