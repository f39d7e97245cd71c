"""Unit tests for finetune.checkpoint and finetune.watchdog with a real DeepSpeed engine (world size 1, gloo, CPU).

Faults are caused for real: files are truncated or have a byte flipped on disk, a save is cut off by a real
file-size limit (RLIMIT_FSIZE -> EFBIG, the same code path as ENOSPC) or a real full tmpfs when running as root.
"""

from __future__ import annotations

import json
import logging
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.checkpoint import (
    LATEST_NAME,
    MANIFEST_NAME,
    CheckpointError,
    find_latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from finetune.watchdog import EXIT_STEP_TIMEOUT, StepWatchdog

REPO_ROOT = Path(__file__).resolve().parents[2]


def _make_engine(model_dir: Path, seed: int = 0):
    import deepspeed
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 1},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def _train_steps(engine, n: int, seed: int) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    vocab = engine.module.config.vocab_size
    losses = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (2, 16), generator=g)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def engine(dist_env, tiny_llama_dir):
    return _make_engine(tiny_llama_dir)


def _flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _largest_file(step_dir: Path) -> Path:
    return max(
        (p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST_NAME), key=lambda p: p.stat().st_size
    )


def test_round_trip_restores_weights_optimizer_rng_and_client_state(engine, tiny_llama_dir, tmp_path):
    _train_steps(engine, 2, seed=1)
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    path = save_checkpoint(engine, tmp_path, step=2, client_state={"data_pos": 123, "note": "x"})
    assert path == tmp_path / "step_00000002"
    assert (tmp_path / LATEST_NAME).read_text() == "step_00000002"
    manifest = verify_checkpoint(path)
    assert manifest["step"] == 2 and manifest["world_size"] == 1
    assert "rng_rank_00000.pt" in manifest["files"]
    expected_rng = (random.random(), float(np.random.rand()), torch.rand(1).item())
    after = _train_steps(engine, 2, seed=2)

    fresh = _make_engine(tiny_llama_dir, seed=99)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    client = load_checkpoint(fresh, find_latest_checkpoint(tmp_path))
    assert client["data_pos"] == 123 and client["note"] == "x"
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == expected_rng
    # Same weights and optimizer state => the same next losses.
    assert _train_steps(fresh, 2, seed=2) == pytest.approx(after, rel=1e-6)


def test_corrupt_byte_and_truncation_fall_back_to_previous(engine, tmp_path, caplog):
    first = save_checkpoint(engine, tmp_path, step=10, client_state={}, keep_last=3)
    second = save_checkpoint(engine, tmp_path, step=20, client_state={}, keep_last=3)
    third = save_checkpoint(engine, tmp_path, step=30, client_state={}, keep_last=3)
    assert find_latest_checkpoint(tmp_path) == third

    _flip_byte(_largest_file(third))
    # Size-only verification cannot see a flipped byte; sha256 can.
    assert find_latest_checkpoint(tmp_path, verify_hashes=False) == third
    with caplog.at_level(logging.WARNING, logger="finetune.checkpoint"):
        assert find_latest_checkpoint(tmp_path) == second
    assert "step_00000030" in caplog.text and "sha256 mismatch" in caplog.text

    shard = _largest_file(second)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="finetune.checkpoint"):
        assert find_latest_checkpoint(tmp_path) == first
    assert "step_00000020" in caplog.text and "truncated" in caplog.text
    with pytest.raises(CheckpointError, match="truncated"):
        verify_checkpoint(second, verify_hashes=False)  # sizes alone catch truncation

    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        load_checkpoint(engine, third)


def test_partial_and_manifestless_dirs_are_ignored(engine, tmp_path, caplog):
    good = save_checkpoint(engine, tmp_path, step=5, client_state={})
    # A save killed before the rename, and one killed after the rename of a tampered dir lost its manifest.
    shutil.copytree(good, tmp_path / "step_00000006.partial")
    (tmp_path / "step_00000006.partial" / MANIFEST_NAME).unlink()
    shutil.copytree(good, tmp_path / "step_00000007")
    (tmp_path / "step_00000007" / MANIFEST_NAME).unlink()
    with caplog.at_level(logging.WARNING, logger="finetune.checkpoint"):
        assert find_latest_checkpoint(tmp_path) == good
    assert "step_00000006.partial" in caplog.text and "incomplete" in caplog.text
    assert "step_00000007" in caplog.text and "no manifest.json" in caplog.text


def test_keep_last_prunes_oldest_and_stale_partials(engine, tmp_path):
    (tmp_path / "step_00000001.partial").mkdir(parents=True)  # left by a killed save
    (tmp_path / "step_00000000.deleting-1-2").mkdir()  # left by a killed prune
    for step in (1, 2, 3, 4):
        save_checkpoint(engine, tmp_path, step=step, client_state={}, keep_last=2)
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_"))
    assert names == ["step_00000003", "step_00000004"]
    assert (tmp_path / LATEST_NAME).read_text() == "step_00000004"
    with pytest.raises(CheckpointError, match="keep_last"):
        save_checkpoint(engine, tmp_path, step=5, client_state={}, keep_last=0)


def test_resaving_a_step_after_falling_back_replaces_it_and_sets_aside_newer(engine, tmp_path):
    save_checkpoint(engine, tmp_path, step=10, client_state={"v": 1}, keep_last=3)
    save_checkpoint(engine, tmp_path, step=20, client_state={"v": 1}, keep_last=3)
    save_checkpoint(engine, tmp_path, step=30, client_state={"v": 1}, keep_last=3)
    # The run went back to step 10 (say 20 and 30 were judged bad) and now saves 20 again.
    new20 = save_checkpoint(engine, tmp_path, step=20, client_state={"v": 2}, keep_last=3)
    assert find_latest_checkpoint(tmp_path) == new20
    assert load_checkpoint(engine, new20)["v"] == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("step_00000030.abandoned")]


def _limited_file_size(limit: int):
    """Context: real EFBIG on writes beyond ``limit`` bytes (SIGXFSZ ignored so write() returns the error)."""

    class _Ctx:
        def __enter__(self):
            self.old_sig = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            self.soft, self.hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, self.hard))

        def __exit__(self, *exc):
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.soft, self.hard))
            signal.signal(signal.SIGXFSZ, self.old_sig)

    return _Ctx()


def _assert_failed_save_left_previous_intact(tmp_path: Path, good: Path, latest_before: str) -> None:
    assert (tmp_path / LATEST_NAME).read_text() == latest_before
    assert not list(tmp_path.glob("*.partial")), "partial directory must be removed"
    assert not (tmp_path / "step_00000002").exists()
    verify_checkpoint(good)
    assert find_latest_checkpoint(tmp_path) == good


def test_file_size_limit_during_save_raises_and_keeps_previous(engine, tmp_path):
    good = save_checkpoint(engine, tmp_path, step=1, client_state={})
    latest_before = (tmp_path / LATEST_NAME).read_text()
    limit = _largest_file(good).stat().st_size // 2
    with _limited_file_size(limit), pytest.raises(CheckpointError, match="previous checkpoint"):
        save_checkpoint(engine, tmp_path, step=2, client_state={})
    _assert_failed_save_left_previous_intact(tmp_path, good, latest_before)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounting a tmpfs needs root")
def test_full_tmpfs_during_save_raises_and_keeps_previous(engine, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    probe = tmp_path / "probe"
    save_checkpoint(engine, probe, step=1, client_state={})
    one = sum(p.stat().st_size for p in (probe / "step_00000001").rglob("*") if p.is_file())
    # Room for one checkpoint and a half: the second save runs out of space mid-shard (real ENOSPC).
    size_kb = int(one * 1.5) // 1024 + 64
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("tmpfs mount not permitted here")
    try:
        good = save_checkpoint(engine, mnt, step=1, client_state={})
        latest_before = (mnt / LATEST_NAME).read_text()
        with pytest.raises(CheckpointError, match="Free disk space"):
            save_checkpoint(engine, mnt, step=2, client_state={})
        _assert_failed_save_left_previous_intact(mnt, good, latest_before)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_rng_file_loads_with_weights_only(engine, tmp_path):
    path = save_checkpoint(engine, tmp_path, step=3, client_state={})
    state = torch.load(path / "rng_rank_00000.pt", weights_only=True)
    assert set(state) >= {"torch_cpu", "python", "numpy"}
    json.dumps({"python": state["python"], "numpy": state["numpy"]})  # JSON-able by construction


# ---------------------------------------------------------------------------------------------------- watchdog
def test_watchdog_fires_with_rank_step_lost_peer_and_checkpoint(engine, tmp_path):
    ckpt = save_checkpoint(engine, tmp_path / "ckpt", step=4, client_state={})
    hb = tmp_path / "hb"
    hb.mkdir()
    # A peer (rank 1) whose heartbeat stopped 60 s ago: it died.
    (hb / "rank_00001.json").write_text(json.dumps({"rank": 1, "alive_unix": time.time() - 60, "finished": False}))
    codes, messages = [], []
    wd = StepWatchdog(
        0.5,
        on_timeout=messages.append,
        heartbeat_dir=hb,
        ckpt_root=tmp_path / "ckpt",
        rank=0,
        world_size=2,
        heartbeat_s=0.1,
        exit_fn=codes.append,
    )
    wd.beat(4)
    deadline = time.monotonic() + 10
    while not codes and time.monotonic() < deadline:
        time.sleep(0.05)
    wd.stop()
    assert codes == [EXIT_STEP_TIMEOUT]
    msg = messages[0]
    assert "rank 0/2" in msg and "last completed step 4" in msg and "lost rank(s) 1" in msg and str(ckpt) in msg


def test_watchdog_quiet_while_beating_and_says_stuck_when_all_alive(tmp_path):
    codes = []
    wd = StepWatchdog(0.6, heartbeat_dir=tmp_path, rank=0, world_size=1, heartbeat_s=0.1, exit_fn=codes.append)
    for step in range(10):
        time.sleep(0.1)
        wd.beat(step)
    assert codes == []
    assert "a rank is stuck" in wd.message("test") and "no complete checkpoint" in wd.message("test")
    wd.stop()
    assert json.loads((tmp_path / "rank_00000.json").read_text())["finished"] is True


def test_watchdog_really_exits_the_process(tmp_path):
    """A process blocked forever (like a rank in a collective whose peer died) is ended with the distinct code."""
    code = (
        "import threading\n"
        "from finetune.watchdog import StepWatchdog\n"
        "wd = StepWatchdog(0.5, rank=3, world_size=4)\n"
        "wd.beat(17)\n"
        "threading.Event().wait()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.returncode == EXIT_STEP_TIMEOUT
    assert "rank 3/4" in proc.stderr and "last completed step 17" in proc.stderr


def test_guard_reports_a_lost_peer_by_pid_and_reraises_other_errors(tmp_path):
    from finetune.watchdog import EXIT_PEER_LOST, is_peer_loss

    dead = subprocess.Popen(["true"])
    dead.wait()
    hb = tmp_path / "hb"
    hb.mkdir()
    (hb / "rank_00001.json").write_text(
        json.dumps({"rank": 1, "host": socket.gethostname(), "pid": dead.pid, "alive_unix": time.time()})
    )
    codes, messages = [], []
    wd = StepWatchdog(0, messages.append, heartbeat_dir=hb, rank=0, world_size=2, heartbeat_s=0.2, exit_fn=codes.append)
    wd.beat(9)
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:12693. This is ...")
    assert is_peer_loss(gloo) and not is_peer_loss(ValueError("Connection closed by peer"))
    t0 = time.monotonic()
    with wd.guard():
        raise gloo
    assert codes == [EXIT_PEER_LOST]
    assert time.monotonic() - t0 < 1.0, "a dead pid on this host is recognised without waiting for staleness"
    assert "lost rank(s) 1" in messages[0] and "last completed step 9" in messages[0]
    with pytest.raises(ValueError, match="not a peer"), wd.guard():
        raise ValueError("not a peer loss")
    wd.stop()


def test_uncaught_peer_loss_error_is_reported_with_exit_87(tmp_path):
    """The excepthook safety net: a loop not wrapped in guard() still ends with the report and the distinct code."""
    hb = tmp_path / "hb"
    hb.mkdir()
    (hb / "rank_00001.json").write_text(json.dumps({"rank": 1, "host": "elsewhere", "alive_unix": time.time() - 99}))
    code = (
        "from finetune.watchdog import StepWatchdog\n"
        f"wd = StepWatchdog(0, heartbeat_dir={str(hb)!r}, rank=0, world_size=2)\n"
        "wd.beat(5)\n"
        "raise RuntimeError('[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert proc.returncode == 87, proc.stderr[-2000:]
    assert "Traceback" in proc.stderr and "lost rank(s) 1" in proc.stderr.splitlines()[-1]
