"""The only module that talks to ``torch.distributed``; everything else asks it ``rank()``, ``world_size()``, ``is_main()``.

A recipe runs the same way under three launchers:
- ``deepspeed --num_gpus N recipe.py`` passes ``--local_rank=N`` and sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* env vars;
- ``torchrun --nproc_per_node N recipe.py`` sets the same env vars;
- DeepSpeed's ``--launcher slurm|openmpi|mpich|impi|mvapich`` start ranks with ``srun``/``mpirun``, which set only
  their own variables (SLURM_PROCID, OMPI_COMM_WORLD_RANK, PMI_RANK, ...): we map those onto RANK/WORLD_SIZE/LOCAL_RANK,
  because otherwise every process would silently train alone as a world of one;
- ``python recipe.py`` sets none: we fill in a world of one so DeepSpeed does not go looking for MPI.
"""

from __future__ import annotations

import os
import weakref
from datetime import timedelta

import torch
import torch.distributed as dist

from finetune import ops
from launch.process import free_port  # a world of one picks its own rendezvous port

# (rank, world size, local rank, local world size) variables set by MPI implementations and srun, in lookup order.
_LAUNCHER_ENV = [
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK", "PMIX_LOCAL_SIZE"),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"),
]


def _env_from_launcher(env: dict[str, str]) -> dict[str, str] | None:
    """RANK/WORLD_SIZE/LOCAL_RANK from srun or mpirun variables, or None when no multi-process launcher is visible."""
    for rank_key, size_key, local_key, local_size_key in _LAUNCHER_ENV:
        if rank_key in env and int(env.get(size_key, "1")) > 1:
            if "MASTER_ADDR" not in env:
                raise RuntimeError(
                    f"{rank_key}={env[rank_key]} and {size_key}={env[size_key]} are set (an MPI/SLURM launch) but "
                    "MASTER_ADDR is not: export MASTER_ADDR/MASTER_PORT to every rank, or start one "
                    "`deepspeed --no_ssh --node_rank N` per node (python -m launch.run --slurm does this)"
                )
            local_size = env.get(local_size_key, "1").split("(")[0]  # SLURM writes e.g. "4(x2)"
            return {
                "RANK": env[rank_key],
                "WORLD_SIZE": env[size_key],
                "LOCAL_RANK": env.get(local_key, "0"),
                "LOCAL_WORLD_SIZE": local_size,
            }
    return None


# The timeout given to init(): groups made later get it too (torch would give them its 30-minute default).
_collective_timeout: timedelta | None = None


def init(timeout_s: int = 1800) -> None:
    """Create the process group (idempotent): NCCL on CUDA, gloo on CPU; ``timeout_s`` bounds every collective."""
    global _collective_timeout

    if dist.is_available() and dist.is_initialized():
        return
    if "RANK" not in os.environ and (mapped := _env_from_launcher(dict(os.environ))):
        os.environ.update(mapped)
    if "RANK" not in os.environ:  # plain `python recipe.py`: a world of one on this host
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    import deepspeed

    if torch.cuda.is_available():
        # Bind the device before NCCL creates its communicator, or every rank lands on GPU 0.
        torch.cuda.set_device(cuda_index())
    else:
        # Ranks on one CPU host share its cores; torch's default (all cores per process) oversubscribes them and a
        # 2-rank run on 2 cores gets ~5x slower. OMP_NUM_THREADS, when set, wins.
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", 1)))  # torchrun / deepspeed
        per_rank = max(1, (os.cpu_count() or 1) // local_ranks)
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", per_rank)))
        ops.build(["ShareMemCommBuilder"])  # the CPU all-reduce op init_distributed would compile unguarded
    _collective_timeout = timedelta(seconds=timeout_s)
    deepspeed.init_distributed(dist_backend=backend(), timeout=_collective_timeout, auto_mpi_discovery=False)
    if not torch.cuda.is_available():
        ops.unlink_shm_allreduce_buffer()  # every rank has mapped every buffer: the /dev/shm name can go before a crash


def backend() -> str:
    """The collective backend this machine uses: ``nccl`` with CUDA, ``gloo`` on CPU."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def rank() -> int:
    """Global rank (0 when no process group exists)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    """Number of ranks (1 when no process group exists)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def local_rank() -> int:
    """Rank on this host: picks the GPU."""
    return int(os.environ.get("LOCAL_RANK", 0))


def cuda_index() -> int:
    """This rank's GPU among the visible ones: ``local_rank % device_count``.

    ``local_rank()`` alone is wrong where the scheduler shows each task only its own GPU (SLURM
    ``--gpus-per-task=1``, some MPI setups): every task sees one device 0, and local rank 3 would ask for
    "invalid device ordinal". With all of a node's GPUs visible the two are the same. (DeepSpeed's ZeRO-3 ``zero.Init``
    still reads LOCAL_RANK itself, so ZeRO-3 needs every GPU of the node visible to each rank.)
    """
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return local_rank() % count if count else 0


def is_main() -> bool:
    """True on global rank 0: the rank that logs, writes files and converts data."""
    return rank() == 0


def device() -> torch.device:
    """This rank's compute device."""
    return torch.device("cuda", cuda_index()) if torch.cuda.is_available() else torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float | torch.Tensor]) -> list[float]:
    """Sum a few numbers (floats or 0-d tensors) over all ranks in one collective; a host sync."""
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(device()).reshape(()) for v in values])
    if dist.is_available() and dist.is_initialized() and world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_sum_async(t: torch.Tensor):
    """Start summing ``t`` (on this rank's device) over all ranks in place; returns the handle to ``wait()`` on, or
    None without a process group. Under NCCL ``wait()`` orders the device stream after the sum: no host sync."""
    if dist.is_available() and dist.is_initialized() and world_size() > 1:
        return dist.all_reduce(t, op=dist.ReduceOp.SUM, async_op=True)
    return None


def broadcast_object(obj):
    """``obj`` from rank 0 to every rank (e.g. a path decided on the main rank)."""
    if not (dist.is_available() and dist.is_initialized()) or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def destroy() -> None:
    """Tear the process group down at the end of a run: NCCL warns without it, and gloo can abort the process at exit
    ("terminate called without an active exception", pytorch/pytorch#190489), failing a run that finished."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# (default process group, the gloo group made for it), held weakly: torch's registry keeps both alive until
# destroy_process_group, which must free them while the interpreter runs; a gloo group still referenced here and
# freed at interpreter exit aborts the process ("terminate called without an active exception", 1 run in 8).
_control: tuple[weakref.ref, weakref.ref] | None = None


def _control_group():
    """The gloo group that carries rank 0's answers to the other ranks (created on first use, by every rank).

    Why gloo, whatever the training backend: its barrier honours a per-call ``timeout`` longer than the group's
    (checked in ``tests/reliability/test_rank0_verify.py``), on CPU, so a wait sized for rank 0's I/O needs neither a
    GPU kernel nor NCCL's timeout. Why not polling a file that rank 0 writes: a rank 0 that dies closes its sockets and
    the wait fails at once as a peer loss, and no shared-filesystem cache can delay the answer. The group needs a
    TCP route between the hosts (``GLOO_SOCKET_IFNAME`` picks the interface), like the rendezvous does.
    Every save and load is collective, so every rank reaches the first call at the same point (``new_group`` is
    collective).
    """
    global _control

    world = dist.group.WORLD
    group = _control[1]() if _control is not None and _control[0]() is world else None
    if group is None:
        group = dist.new_group(backend="gloo", timeout=_collective_timeout)
        _control = (weakref.ref(world), weakref.ref(group))
    return group


def broadcast_from_main(obj, timeout_s: float | None = None):
    """Collective: rank 0's ``obj`` on every rank, through :func:`_control_group` (gloo, whatever the backend).

    With ``timeout_s`` the ranks first wait up to that long for rank 0 to arrive (a gloo barrier; rank 0 arrives when
    its work is done); without, the group's default timeout applies (for answers that are ready at once).
    """
    if world_size() == 1:
        return obj

    group = _control_group()
    if timeout_s is not None:
        dist.barrier(group=group, timeout=timedelta(seconds=timeout_s))
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


# What torch.distributed raises in a survivor when a peer process dies: gloo closes the TCP pair at once; NCCL
# reports through its own watchdog (TORCH_NCCL_ASYNC_ERROR_HANDLING=2) after an error or the process-group timeout.
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
    if isinstance(exc, dist.DistError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return any(p in text for p in _PEER_LOSS_PATTERNS)
