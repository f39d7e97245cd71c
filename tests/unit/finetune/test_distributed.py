import pytest

from finetune.distributed import _env_from_launcher


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
