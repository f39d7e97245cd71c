import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.distributed import _env_from_launcher

REPO = Path(__file__).resolve().parents[3]


def test_openmpi_variables_map_to_torch_env():
    env = {
        "OMPI_COMM_WORLD_RANK": "3",
        "OMPI_COMM_WORLD_SIZE": "4",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
        "MASTER_ADDR": "node1",
    }
    assert _env_from_launcher(env) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}


def test_slurm_variables_map_and_strip_repeat_suffix():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS_PER_NODE": "4(x2)",
        "MASTER_ADDR": "node1",
    }
    assert _env_from_launcher(env) == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}


def test_single_task_allocation_is_a_world_of_one():
    assert _env_from_launcher({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) is None
    assert _env_from_launcher({}) is None


def test_mpi_launch_without_master_addr_is_refused():
    with pytest.raises(RuntimeError, match="MASTER_ADDR is not"):
        _env_from_launcher({"PMI_RANK": "0", "PMI_SIZE": "2"})


@pytest.mark.parametrize(("visible", "local_rank", "expected"), [(1, 3, 0), (4, 3, 3), (8, 3, 3), (2, 3, 1)])
def test_cuda_index_is_the_local_rank_among_the_visible_gpus(monkeypatch, visible, local_rank, expected):
    """SLURM --gpus-per-task=1 shows each task one device 0: local rank 3 must not ask for cuda:3."""
    import torch

    from finetune import distributed

    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert distributed.cuda_index() == expected
    assert distributed.device() == torch.device("cuda", expected)


# Runs the LoRA recipe's entry point until the process group exists, then prints the timeouts of the two groups the
# engine uses (the training group and the gloo group for rank 0's answers), read back from torch, and stops.
_READ_BACK_TIMEOUTS = """
import json, sys
import torch
from finetune import distributed, engine

real_init = distributed.init

def init_then_report(*args, **kwargs):
    real_init(*args, **kwargs)
    groups = {"world": torch.distributed.group.WORLD, "control": distributed._control_group()}
    timeouts = {k: g._get_backend(torch.device("cpu")).options._timeout.total_seconds() for k, g in groups.items()}
    print("TIMEOUTS", json.dumps(timeouts), flush=True)
    raise SystemExit(0)  # engine.main's finally destroys the group

distributed.init = init_then_report
engine.main(defaults={"method": {"name": "lora"}}, methods=("lora", "qlora"), argv=sys.argv[1:])
"""


def test_collective_timeout_is_the_timeout_of_every_process_group(tiny_llama_dir, tmp_path):
    """``train.collective_timeout_s`` on the command line bounds the collectives of a real (gloo, world of one)
    process group made by the engine, and of the group that carries rank 0's answers (``broadcast_from_main``)."""
    args = ["--config", "finetune/configs/lora.yaml", f"model.name_or_path={tiny_llama_dir}"]
    unused = tmp_path / "unused.jsonl"  # never read (the run stops once its groups exist), but it must exist:
    unused.write_text('{"text": "x"}\n')  # engine.main checks data paths before the process group
    args += [f"data.train={unused}", f"output_dir={tmp_path / 'out'}", "train.collective_timeout_s=123"]
    # A world of its own: not the pytest process's (some fixtures set RANK/MASTER_PORT for an in-process engine).
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-c", _READ_BACK_TIMEOUTS, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("TIMEOUTS ")), None)
    assert proc.returncode == 0 and line, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert json.loads(line.split(" ", 1)[1]) == {"world": 123.0, "control": 123.0}
