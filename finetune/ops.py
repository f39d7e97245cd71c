"""DeepSpeed's JIT-compiled ops, built safely before DeepSpeed asks for them.

DeepSpeed compiles some C++ ops on first use through ``torch.utils.cpp_extension.load``: the CPU shared-memory
all-reduce (``deepspeed_shm_comm``, every CPU launch), ``cpu_adam`` (optimizer offload) and ``async_io`` (NVMe).
torch serializes concurrent builds with an empty ``lock`` file in the op's build directory, created with
``O_EXCL`` and removed when the build ends. A build that is killed (Ctrl-C, a job time limit, OOM) leaves that file
behind, and every later run then waits for it forever, silently. Neither torch nor DeepSpeed detects this, so we do:
each rank builds the ops it needs here, one rank at a time under an ``flock`` (released by the kernel when its
holder dies, unlike the lock file). While we hold the flock no other dsft process is building, so a torch lock file
found then is left over from a dead build and is removed (the one case this gets wrong: a build started outside
dsft, e.g. a plain DeepSpeed script, compiling the same op into the same directory at that moment). The built module
lands in DeepSpeed's op cache and ``deepspeed.initialize`` reuses it.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def _flock_path() -> Path:
    """<extensions root>/dsft/build.flock; the root is $TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions/py311_cpu.

    torch's own (private) resolver, so the root always matches where ``cpp_extension.load`` builds; it creates the dir.
    """
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory("dsft", verbose=False)) / "build.flock"


def clear_stale_locks(root: Path) -> list[Path]:
    """Remove torch build lock files under ``root``; call only while holding the build flock."""
    removed = []
    for lock in sorted(root.glob("*/lock")):
        lock.unlink(missing_ok=True)
        removed.append(lock)
        log.warning("removed %s left by a killed build of DeepSpeed's %s op; rebuilding it", lock, lock.parent.name)
    return removed


def unavailable(builder_names: list[str]) -> list[str]:
    """The named DeepSpeed op builders that cannot build on this machine (e.g. AsyncIOBuilder without libaio)."""
    from deepspeed.accelerator import get_accelerator

    return [name for name in builder_names if not _usable(get_accelerator().create_op_builder(name))]


def _usable(builder) -> bool:
    # The CPU accelerator answers an op it lacks with a NotImplementedBuilder that claims to be compatible.
    return builder is not None and builder.NAME != "deepspeed_not_implemented" and builder.is_compatible(verbose=False)


def build(builder_names: list[str]) -> None:
    """JIT-load each named DeepSpeed op builder (e.g. "CPUAdamBuilder") that is compatible here, one rank at a time."""
    from deepspeed.accelerator import get_accelerator

    builders = [get_accelerator().create_op_builder(name) for name in builder_names]
    builders = [b for b in builders if _usable(b)]
    if not builders:
        return
    flock = _flock_path()
    root = flock.parent.parent
    with open(flock, "w") as fh:  # closing the file releases the flock
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError as e:  # a filesystem without locks (some NFS mounts): build as DeepSpeed would, unguarded
            log.warning("cannot lock %s (%s): building DeepSpeed ops without the stale-lock check", flock, e)
        else:
            clear_stale_locks(root)
        for b in builders:
            if not (root / b.name / f"{b.name}.so").exists():
                log.warning("compiling DeepSpeed's %s op (first use; about a minute, cached in %s)", b.name, root)
            b.load()


def unlink_shm_allreduce_buffer() -> None:
    """Wait for every rank, then remove this rank's name for DeepSpeed's CPU all-reduce shared-memory buffer.

    Every CPU launch creates ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`` (~66 MB) and never
    unlinks it, so a machine that runs many jobs fills its RAM-backed /dev/shm (we saw 18 GB). Once every rank has
    mapped every buffer (init does this before returning, the barrier makes sure all ranks got there), the names are
    no longer needed: the mappings stay valid until the processes exit, and then the kernel frees the memory.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    name = "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
        os.getuid(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), os.environ.get("RANK", "0")
    )
    Path("/dev/shm", name).unlink(missing_ok=True)
