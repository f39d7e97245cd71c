"""finetune.ops: a torch build lock left by a killed DeepSpeed op build no longer hangs the next run."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_stale_build_lock_is_cleared_and_the_op_loads(tmp_path):
    from torch.utils.cpp_extension import _get_build_directory

    # Seed a private extensions dir with the cached shm op (if built before) so the test need not recompile it.
    cached = Path(_get_build_directory("deepspeed_shm_comm", verbose=False))
    op_dir = tmp_path / "deepspeed_shm_comm"
    if (cached / "deepspeed_shm_comm.so").exists():
        shutil.copytree(cached, op_dir, ignore=shutil.ignore_patterns("lock"))
    op_dir.mkdir(exist_ok=True)
    (op_dir / "lock").touch()  # what a build killed mid-compile leaves; torch alone would wait on it forever
    code = "from finetune import ops; ops.build(['ShareMemCommBuilder']); print('loaded')"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "loaded" in proc.stdout
    assert "killed build" in proc.stderr  # the user is told what was removed
    assert not (op_dir / "lock").exists()
    assert (op_dir / "deepspeed_shm_comm.so").exists()


def test_unlink_shm_buffer_removes_only_this_ranks_name(monkeypatch):
    from finetune import ops

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")  # no real job uses port 1
    names = [f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_1_{r}" for r in (0, 1)]
    for n in names:
        Path("/dev/shm", n).write_bytes(b"x")
    try:
        monkeypatch.setenv("RANK", "1")
        ops.unlink_shm_allreduce_buffer()
        assert Path("/dev/shm", names[0]).exists() and not Path("/dev/shm", names[1]).exists()
    finally:
        for n in names:
            Path("/dev/shm", n).unlink(missing_ok=True)


def test_unavailable_names_ops_this_machine_cannot_build():
    from finetune import ops

    # cpu_adam builds wherever a C++ compiler does; an op the accelerator lacks must be reported, not "compatible"
    assert ops.unavailable(["CPUAdamBuilder", "NoSuchBuilder"]) == ["NoSuchBuilder"]
