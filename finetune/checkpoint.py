"""Atomic, verified training checkpoints on top of DeepSpeed's ``engine.save_checkpoint``.

A checkpoint is complete only when its directory has its final name *and* a ``manifest.json`` that lists every file
with its size and sha256. The order of a save makes every crash point safe::

    ckpt_root/step_00000100.partial/   DeepSpeed shards + rng_rank_00000.pt ...   (all ranks write, then barrier)
    ckpt_root/step_00000100.partial/manifest.json                                 (global rank 0, written LAST, fsync)
    rename  step_00000100.partial -> step_00000100                                (atomic on POSIX, fsync parent)
    ckpt_root/latest  <- "step_00000100"                                          (temp file + os.replace + fsync)
    prune older complete checkpoints beyond ``keep_last``                         (rename to .deleting, then rmtree)

A SIGKILL at any moment therefore leaves either a ``*.partial`` directory (ignored by the loader) or a complete,
renamed checkpoint, and ``latest`` only ever names a directory that was complete when it was written. The loader
does not trust ``latest`` blindly: :func:`find_latest_checkpoint` scans ``step_*`` directories newest first and
returns the first whose manifest verifies (sizes always, sha256 when ``verify_hashes``), warning about each one it
skips, so a truncated or bit-flipped shard falls back to the previous checkpoint.

The checkpoint directory must be on a filesystem every rank sees (DeepSpeed's default): rank 0 lists and hashes the
files the other ranks wrote.

Rank 0 alone reads a checkpoint back, once: at save it hashes and fsyncs every file for the manifest; at resume
:func:`find_resume_checkpoint` and :func:`load_checkpoint` verify on rank 0 and give every rank the verdict. The other
ranks do no I/O meanwhile; they wait on a gloo group kept for these messages (``distributed.broadcast_from_main``), with a timeout
sized for the bytes rank 0 reads (:func:`rank0_io_timeout_s`), not the collective timeout: an NCCL collective that
outlasts ``train.collective_timeout_s`` is torn down by torch, and hashing 100 GB on shared storage can take that
long.

All ``torch.load`` calls here use ``weights_only=True``; the per-rank RNG file holds tensors plus python/numpy states
in JSON-able form (lists of ints) so it loads under that restriction.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from finetune import distributed as dist

if TYPE_CHECKING:
    from finetune.watchdog import StepWatchdog

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
LATEST_NAME = "latest"
MANIFEST_FORMAT = 1
_STEP_DIR_RE = re.compile(r"^step_(\d{8,})$")
_PARTIAL_SUFFIX = ".partial"
_HASH_CHUNK = 8 << 20  # 8 MiB reads: large enough that hashlib releases the GIL and threads hash in parallel
#: Read rate assumed for rank 0 reading a checkpoint back (sha256 + fsync) while the other ranks wait: half of what an
#: NFS mount over 1 GbE delivers (~110 MB/s). Local NVMe, Lustre or GPFS are 10-100x faster; the wait ends as soon as
#: rank 0 is done, so a slow guess costs nothing unless rank 0 hangs, and the step watchdog bounds that case.
SLOW_STORAGE_BYTES_PER_S = 50e6
#: The shortest such wait, for small checkpoints: listing, opening and fsyncing files on a busy shared filesystem.
MIN_RANK0_IO_WAIT_S = 600.0


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says which directory and what to do."""


def step_dir_name(step: int) -> str:
    """Directory name of the complete checkpoint for ``step`` (zero-padded so names sort by step)."""
    return f"step_{step:08d}"


def rank0_io_timeout_s(nbytes: int) -> float:
    """Seconds the other ranks wait for rank 0 to read ``nbytes`` of checkpoint back (hash, fsync).

    ``nbytes`` at :data:`SLOW_STORAGE_BYTES_PER_S`, at least :data:`MIN_RANK0_IO_WAIT_S`: 100 GB (a full 7B
    ZeRO-2 run) gets 2000 s.
    """
    return max(MIN_RANK0_IO_WAIT_S, nbytes / SLOW_STORAGE_BYTES_PER_S)


def _any_rank_failed(failed: bool) -> bool:
    """Collective: True on every rank when at least one rank passes ``failed=True`` (also acts as a barrier)."""
    return dist.all_reduce_sum([1.0 if failed else 0.0])[0] > 0


# --------------------------------------------------------------------------------------------------------------------
# rank 0 does the I/O, the others wait for its answer
# --------------------------------------------------------------------------------------------------------------------
_T = TypeVar("_T")


def _on_rank0(what: str, nbytes: Callable[[], int], task: Callable[[], _T], watchdog: StepWatchdog | None = None) -> _T:
    """Collective: run ``task`` on rank 0 only and return its result on every rank.

    ``nbytes`` (rank 0) says how much ``task`` reads; the other ranks wait :func:`rank0_io_timeout_s` of it, and so
    does ``watchdog`` (:meth:`StepWatchdog.allow`) on every rank. ``task`` reports expected failures in its result;
    an exception from it propagates on rank 0, and when that ends the process the others' wait fails as a peer loss.
    """
    rank0 = dist.rank() == 0
    size = 0
    if rank0:
        try:
            size = nbytes()
        except OSError as e:  # the task meets the same error and reports it; only the wait's size is unknown
            logger.warning("%s: cannot size the files to read (%s); waiting the minimum", what, e)
    size = dist.broadcast_from_main(size)
    timeout_s = rank0_io_timeout_s(size)
    with watchdog.allow(timeout_s, what) if watchdog is not None else contextlib.nullcontext():
        result = task() if rank0 else None
        return dist.broadcast_from_main(result, timeout_s)


def _dsft_version() -> str:
    try:
        from importlib.metadata import version

        return version("dsft")
    except Exception:  # noqa: BLE001 - metadata missing in a source checkout is not an error, only unknown
        return "unknown"


# --------------------------------------------------------------------------------------------------------------------
# filesystem primitives
# --------------------------------------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    """Make a rename/create inside ``path`` durable (POSIX: the directory entry lives in the parent's inode)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` so that readers see either the old content or the whole new content, never a torn file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _hash_and_sync(path: Path) -> tuple[int, str]:
    """Size and sha256 of ``path``; also fsyncs it (fsync on a read-only fd works on Linux) so the data is durable."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
        os.fsync(f.fileno())
        size = f.tell()
    return size, h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _hash_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _list_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)


def _dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in _list_files(root))


def _manifest_bytes(step_dir: Path) -> int:
    """Bytes a checkpoint's manifest lists (0 when it has no readable manifest: verifying it then reads nothing)."""
    try:
        files = json.loads((step_dir / MANIFEST_NAME).read_text())["files"]
        return sum(int(meta["size"]) for meta in files.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 0


def _remove_dir(path: Path) -> None:
    """Delete ``path`` by first renaming it out of the ``step_*`` namespace, so a kill mid-delete leaves no dir
    that looks like a checkpoint with missing files."""
    doomed = path.with_name(f"{path.name}.deleting-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(path, doomed)
    shutil.rmtree(doomed)


# --------------------------------------------------------------------------------------------------------------------
# RNG state (per rank)
# --------------------------------------------------------------------------------------------------------------------
def _rng_file(step_dir: Path, rank: int) -> Path:
    return step_dir / f"rng_rank_{rank:05d}.pt"


def _capture_rng() -> dict[str, Any]:
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch_cpu": torch.get_rng_state(),
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {
            "kind": np_kind,
            "keys": np_keys.tolist(),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    nps = state["numpy"]
    np.random.set_state(
        (nps["kind"], np.asarray(nps["keys"], dtype=np.uint32), nps["pos"], nps["has_gauss"], nps["gauss"])
    )
    if "torch_cuda" in state and torch.cuda.is_available():
        cuda_states = state["torch_cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            logger.warning(
                "checkpoint has CUDA RNG states for %d devices, this process sees %d: CUDA RNG not restored",
                len(cuda_states),
                torch.cuda.device_count(),
            )


# --------------------------------------------------------------------------------------------------------------------
# manifest
# --------------------------------------------------------------------------------------------------------------------
def _write_manifest(step_dir: Path, step: int, world_size: int | None, **extra: Any) -> dict[str, Any]:
    files = _list_files(step_dir)
    with ThreadPoolExecutor(_hash_threads()) as pool:
        results = list(pool.map(_hash_and_sync, files))
    manifest = {
        "format": MANIFEST_FORMAT,
        "step": step,
        "world_size": world_size,
        **extra,
        "dsft_version": _dsft_version(),
        "torch_version": torch.__version__,
        "created_unix": time.time(),
        "files": {
            str(p.relative_to(step_dir)): {"size": size, "sha256": digest}
            for p, (size, digest) in zip(files, results, strict=True)
        },
    }
    # Sub-directories (e.g. DeepSpeed's offloaded_tensors/) must be durable too before the manifest claims them.
    for d in sorted({p.parent for p in files}, key=lambda x: len(x.parts), reverse=True):
        _fsync_dir(d)
    _write_atomic(step_dir / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True).encode())
    return manifest


def verify_checkpoint(step_dir: str | os.PathLike, verify_hashes: bool = True) -> dict[str, Any]:
    """Check that ``step_dir`` is a complete checkpoint and return its manifest.

    Args:
        step_dir: A ``step_XXXXXXXX`` directory.
        verify_hashes: Also recompute every file's sha256 (reads all bytes, parallel threads). Sizes, the manifest's
            presence and the file list are always checked; they catch truncation and kills during save.

    Returns:
        The parsed manifest.

    Raises:
        CheckpointError: naming the first problem found (missing manifest, missing file, wrong size, wrong hash).
    """
    step_dir = Path(step_dir)
    mpath = step_dir / MANIFEST_NAME
    if not mpath.is_file():
        raise CheckpointError(f"{step_dir}: no {MANIFEST_NAME} (save was interrupted before it finished)")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        manifest["step"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{mpath}: unreadable manifest ({e})") from e
    for rel, meta in files.items():
        p = step_dir / rel
        if not p.is_file():
            raise CheckpointError(f"{p}: listed in the manifest but missing")
        size = p.stat().st_size
        if size != meta["size"]:
            raise CheckpointError(f"{p}: size {size} bytes, manifest says {meta['size']} (truncated or overwritten)")
    if verify_hashes:
        rels = list(files)
        with ThreadPoolExecutor(_hash_threads()) as pool:
            digests = list(pool.map(lambda r: _sha256(step_dir / r), rels))
        for rel, digest in zip(rels, digests, strict=True):
            if digest != files[rel]["sha256"]:
                raise CheckpointError(f"{step_dir / rel}: sha256 mismatch (file corrupted after it was saved)")
    return manifest


# --------------------------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------------------------
def save_checkpoint(
    engine: Any,
    ckpt_root: str | os.PathLike,
    step: int,
    client_state: dict[str, Any],
    keep_last: int = 2,
    watchdog: StepWatchdog | None = None,
) -> Path:
    """Collective: write a complete, verified checkpoint for ``step`` and point ``ckpt_root/latest`` at it.

    Every rank must call this. DeepSpeed writes its shards into ``step_XXXXXXXX.partial``; each rank adds its RNG
    state; after a barrier global rank 0 hashes and fsyncs every file, writes the manifest last, renames the directory
    to its final name, atomically replaces ``latest`` and prunes old checkpoints, while the other ranks wait for its
    verdict with a timeout sized for that I/O (:func:`_on_rank0`).

    Args:
        engine: The ``deepspeed.DeepSpeedEngine``.
        ckpt_root: Directory holding all checkpoints of the run (shared by every rank).
        step: Optimizer step just completed; names the directory.
        client_state: Extra state to store (data-loader position, config...), returned by :func:`load_checkpoint`.
        keep_last: How many complete checkpoints to keep (the new one included; at least 1).
        watchdog: The run's step watchdog: given the same allowance while rank 0 hashes, so it does not fire on a
            long but healthy save.

    Returns:
        The final checkpoint directory, ``ckpt_root/step_XXXXXXXX``.

    Raises:
        CheckpointError: on any rank's OSError (e.g. disk full). The partial directory is removed, and the previous
            checkpoint and ``latest`` are left untouched, on every rank.
    """
    if keep_last < 1:
        raise CheckpointError(f"keep_last={keep_last}: must be >= 1 (the checkpoint just written is always kept)")
    root = Path(ckpt_root)
    rank, world = dist.rank(), dist.world_size()
    final = root / step_dir_name(step)
    tag = final.name + _PARTIAL_SUFFIX
    zero_stage = int(engine.zero_optimization_stage())
    client_state = {**client_state, **_universal_info(engine)}
    partial = root / tag

    error: str | None = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if partial.exists():  # left by a save of the same step that was killed
                _remove_dir(partial)
        except OSError as e:
            error = _detach(e, f"cannot prepare {partial}")
    if _any_rank_failed(error is not None):
        raise CheckpointError(f"{partial}: cannot prepare checkpoint directory: {error or 'failed on another rank'}")

    t0 = time.perf_counter()
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    except (OSError, RuntimeError) as e:
        if dist.is_peer_loss(e):
            raise  # a peer is gone (gloo raises a plain RuntimeError): not a write failure; the watchdog reports it
        # torch.save reports ENOSPC/EFBIG as RuntimeError ("PytorchStreamWriter failed writing file ...").
        error = _detach(e, f"rank {rank}: DeepSpeed could not write {partial}")
        # DeepSpeed's save ends with a barrier that this rank skipped by raising inside a write; take part in it so
        # the healthy ranks are not left waiting (every write in DeepSpeed 0.16-0.19 precedes that final barrier).
        dist.barrier()
    if error is None:
        try:
            torch.save(_capture_rng(), _rng_file(partial, rank))
        except (OSError, RuntimeError) as e:
            error = _detach(e, f"rank {rank}: could not write {_rng_file(partial, rank)}")

    if _any_rank_failed(error is not None):
        _abort_partial(partial, rank)
        where = f"rank {rank}: {error}" if error is not None else "another rank failed to write its part"
        raise CheckpointError(
            f"saving checkpoint {final} failed ({where}). The partial directory was removed; the previous checkpoint "
            f"and {root / LATEST_NAME} are unchanged. Free disk space under {root} (or lower keep_last) and resume."
        )

    def finalize() -> str | None:  # rank 0: the error text, or None when the checkpoint is complete
        try:
            _write_manifest(partial, step, world, zero_stage=zero_stage)
            if final.exists():
                # Only when a step is saved again (e.g. after resuming from an older checkpoint because this one was
                # corrupt): move the old one out of the step_* namespace first; rename cannot replace a directory.
                _remove_dir(final)
            os.rename(partial, final)
            _fsync_dir(root)
            _write_atomic(root / LATEST_NAME, final.name.encode())
        except OSError as e:
            failure = _detach(e, f"rank 0: could not finalize {partial}")
            if partial.exists():
                try:
                    _remove_dir(partial)
                except OSError as e2:  # safe to leave: the loader ignores *.partial
                    logger.warning("%s: could not remove partial checkpoint after a failed save: %s", partial, e2)
            return failure
        try:
            _prune(root, step, keep_last)
        except OSError as e:
            # The new checkpoint is complete and `latest` names it; a failed clean-up must not fail the save.
            logger.warning("%s: pruning old checkpoints failed: %s", root, e)
        logger.info("saved checkpoint %s in %.1fs", final, time.perf_counter() - t0)
        return None

    error = _on_rank0(f"rank 0 hashing checkpoint {final.name}", lambda: _dir_bytes(partial), finalize, watchdog)
    if error is not None:
        raise CheckpointError(
            f"finalizing checkpoint {final} failed on rank 0: {error}. The previous checkpoint is intact; free disk "
            f"space under {root} and resume."
        )
    return final


def _detach(e: BaseException, what: str) -> str:
    """Log ``e`` with its traceback and return its text; the exception object itself is not kept.

    Its traceback (and that of its ``__context__``) holds the frames of the writer that failed, and torch.save's zip
    writer keeps its file open: holding on to the exception would keep a deleted file open and its space used.
    """
    # Formatted to text here: a LogRecord with exc_info would keep the exception alive in any handler that stores
    # records (pytest's capture does).
    logger.error("%s\n%s", what, "".join(traceback.format_exception(e)).rstrip())
    return f"{type(e).__name__}: {e}"


def _abort_partial(partial: Path, rank: int) -> None:
    """Collective clean-up after a failed save: rank 0 removes the partial directory, then everyone syncs."""
    # The failed writer (torch.save's zip writer and the frames of its traceback) sits in a reference cycle and keeps
    # its file open; collect it now so removing the directory really frees the space on every rank.
    gc.collect()
    if rank == 0 and partial.exists():
        try:
            _remove_dir(partial)
        except OSError as e:
            # Leaving it is safe (the loader ignores *.partial), so this is only worth a warning.
            logger.warning("%s: could not remove partial checkpoint after a failed save: %s", partial, e)
    dist.barrier()


def _complete_step_dirs(root: Path) -> list[tuple[int, Path]]:
    out = []
    for p in root.iterdir() if root.is_dir() else []:
        m = _STEP_DIR_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out, reverse=True)


def _prune(root: Path, step: int, keep_last: int) -> None:
    """Rank 0: keep the ``keep_last`` newest checkpoints up to ``step`` (always including ``step``)."""
    kept = 0
    for s, p in _complete_step_dirs(root):
        if s > step:
            # Newer than what we just wrote: a checkpoint from a timeline this run abandoned (it resumed from an
            # older one). Move it aside rather than delete it, so the scan no longer picks it but nothing is lost.
            aside = p.with_name(f"{p.name}.abandoned-{int(time.time())}")
            logger.warning("%s: newer than the step just saved (%d); moved to %s", p, step, aside.name)
            os.rename(p, aside)
            continue
        kept += 1
        if kept > keep_last:
            try:
                _remove_dir(p)
            except OSError as e:
                logger.warning("%s: could not prune old checkpoint: %s", p, e)
    for p in root.iterdir():
        if not p.is_dir():
            continue
        if p.name.endswith(_PARTIAL_SUFFIX):
            # Left by a save that was killed; rank 0 is the only writer of this root and no save is running now.
            logger.warning("%s: removing partial checkpoint left by an interrupted save", p)
            _remove_dir(p)
        elif ".deleting-" in p.name:
            shutil.rmtree(p)  # a deletion that was killed half-way; already outside the step_* namespace
        elif p.name.endswith(UNIVERSAL_SUFFIX) and not (root / p.name.removesuffix(UNIVERSAL_SUFFIX)).is_dir():
            _remove_dir(p)  # the universal copy of a checkpoint just pruned (or moved aside)


def find_latest_checkpoint(ckpt_root: str | os.PathLike, verify_hashes: bool = True) -> Path | None:
    """Return the newest complete checkpoint under ``ckpt_root`` whose manifest verifies, or None.

    Scans ``step_*`` directories newest first (``latest`` is a hint for humans and DeepSpeed tools, the manifest is
    the truth) and logs a warning naming each skipped directory and why, including ``*.partial`` ones.

    Args:
        ckpt_root: Directory given to :func:`save_checkpoint`.
        verify_hashes: Recompute sha256 of every file (reads the whole checkpoint once, in parallel threads).
            With False only sizes and the file list are checked, which still catches truncation and interrupted
            saves but not a flipped byte.

    Returns:
        The checkpoint directory, or None if there is no usable checkpoint.
    """
    root = Path(ckpt_root)
    if not root.is_dir():
        return None
    for p in sorted(root.iterdir()):
        if p.name.endswith(_PARTIAL_SUFFIX):
            logger.warning("skipping %s: incomplete (a save was interrupted; it never got its manifest)", p)
    for _, p in _complete_step_dirs(root):
        try:
            verify_checkpoint(p, verify_hashes=verify_hashes)
        except CheckpointError as e:
            logger.warning("skipping checkpoint %s: %s", p, e)
            continue
        return p
    return None


def find_resume_checkpoint(ckpt_root: str | os.PathLike, verify_hashes: bool = True) -> Path | None:
    """Collective: :func:`find_latest_checkpoint` on rank 0 alone, its answer on every rank.

    The checkpoints are read once in all (not once per rank); the other ranks wait for the answer with a timeout
    sized for every candidate's bytes. Pass the result to :func:`load_checkpoint` with ``verify_hashes=False``: it was
    just verified.
    """
    root = Path(ckpt_root)
    return _on_rank0(
        f"rank 0 verifying the checkpoints in {root}",
        lambda: sum(_manifest_bytes(p) for _, p in _complete_step_dirs(root)),
        lambda: find_latest_checkpoint(root, verify_hashes=verify_hashes),
    )


def load_checkpoint(
    engine: Any, ckpt_dir: str | os.PathLike, verify_hashes: bool = True, universal_dir: str | os.PathLike | None = None
) -> dict[str, Any]:
    """Collective: verify ``ckpt_dir``, load it into ``engine``, restore this rank's RNG; return the client state.

    Args:
        engine: The ``deepspeed.DeepSpeedEngine``: built with the same ZeRO stage and world size as at save, or
            with ``checkpoint.load_universal`` when ``universal_dir`` is given (see :func:`resolve_resume`).
        ckpt_dir: A complete checkpoint directory, e.g. from :func:`find_resume_checkpoint`.
        verify_hashes: Recompute sha256 before loading; False when the caller just verified it
            (:func:`find_resume_checkpoint`). Rank 0 alone verifies (sizes always) and tells the others.
        universal_dir: ``ckpt_dir``'s universal copy (:func:`convert_to_universal`): DeepSpeed loads the model and
            optimizer from it; the RNG states still come from ``ckpt_dir``.

    Returns:
        The ``client_state`` dict given to :func:`save_checkpoint` (DeepSpeed's own keys removed).

    Raises:
        CheckpointError: the checkpoint does not verify or DeepSpeed could not load it.
    """
    ckpt_dir = Path(ckpt_dir)
    rank, world = dist.rank(), dist.world_size()

    def verify() -> tuple[str | None, Any]:  # rank 0: (error text or None, the world size it was saved with)
        try:
            return None, verify_checkpoint(ckpt_dir, verify_hashes=verify_hashes).get("world_size")
        except CheckpointError as e:
            return str(e), None

    what = f"rank 0 verifying {ckpt_dir}"
    error, saved_world = _on_rank0(what, lambda: _manifest_bytes(ckpt_dir) if verify_hashes else 0, verify)
    if error is not None:
        raise CheckpointError(
            f"cannot resume from {ckpt_dir}: {error}; delete it to fall back to the previous checkpoint"
        )
    if saved_world not in (None, world) and universal_dir is None:
        logger.warning(
            "%s was saved with world size %s, loading with %d: DeepSpeed must re-partition (ZeRO needs the same "
            "world size unless the checkpoint is converted to a universal checkpoint)",
            ckpt_dir,
            saved_world,
            world,
        )

    ds_dir = Path(universal_dir) if universal_dir is not None else ckpt_dir
    decay = _group_weight_decay(engine)
    load_path, client_state = engine.load_checkpoint(str(ds_dir.parent), tag=ds_dir.name)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {ds_dir} (see its log above)")
    if universal_dir is not None:
        _repair_universal_optimizer(engine, decay)
    rng_path = _rng_file(ckpt_dir, rank)
    if rng_path.is_file():
        _restore_rng(torch.load(rng_path, map_location="cpu", weights_only=True))
    else:
        logger.warning("%s: no RNG state for rank %d; random streams will differ from the original run", ckpt_dir, rank)
    dist.barrier()
    client_state = dict(client_state or {})
    client_state.pop(_UC_INFO_KEY, None)  # DeepSpeed's, added by save_checkpoint
    return client_state


def _base_optimizer(engine: Any) -> Any:
    """The torch optimizer under DeepSpeed's ZeRO/bf16 wrapper (or the bare one, or None)."""
    opt = getattr(engine, "optimizer", None)
    return getattr(opt, "optimizer", opt)


def _param_groups(engine: Any) -> list[dict]:
    return list(getattr(_base_optimizer(engine), "param_groups", None) or [])


def _group_weight_decay(engine: Any) -> list[float]:
    """Each optimizer param group's weight decay, as this run built them (``finetune.model.param_groups``); see
    :func:`_repair_universal_optimizer`."""
    return [g.get("weight_decay") for g in _param_groups(engine)]


def _repair_universal_optimizer(engine: Any, decay: list[float]) -> None:
    """Undo two DeepSpeed 0.19 ZeRO-3 universal-load bugs (``load_hp_checkpoint_state_from_checkpoint_dir_stage3``;
    ZeRO 1-2 load group by group and are unaffected):

    - it copies the hyperparameters of the checkpoint's param group 0 into *every* group, so the no-decay group
      (norms, biases) gets the decay group's weight decay;
    - it gives every group's Adam state the *same* ``step`` tensor, which torch's Adam increments in place, so the
      step (and the bias correction) advances once per group per optimizer step.

    Each made a resumed full fine-tune drift (0.12-0.18% in the loss within ten steps, measured by
    tests/recipes/test_resume_world_size.py). Every other hyperparameter is the same in all our groups, and the
    learning rate is set by the schedule each step."""
    groups = _param_groups(engine)
    if len(groups) == len(decay):
        for group, wd in zip(groups, decay, strict=True):
            group["weight_decay"] = wd
    for state in getattr(_base_optimizer(engine), "state", {}).values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].clone()


# --------------------------------------------------------------------------------------------------------------------
# another world size or ZeRO stage: DeepSpeed universal checkpoints
# --------------------------------------------------------------------------------------------------------------------
#: DeepSpeed's client-state key that ``ds_to_universal`` requires (deepspeed.checkpoint.constants); it only checks
#: that the key is there (plus AutoTP patterns, which a data-parallel model has none of).
_UC_INFO_KEY = "universal_checkpoint_info"
#: Suffix of a checkpoint's universal copy, next to it: ``step_00000100.universal``. Outside the ``step_*`` pattern,
#: so it is never taken for a resume candidate itself; the original stays the truth.
UNIVERSAL_SUFFIX = ".universal"
#: The manifest field naming the checkpoint a universal copy was made from, and that checkpoint's manifest hash: a
#: copy whose source was saved again (same step, new content) is stale and converted again.
_SOURCE_KEY = "universal_of"


def _universal_info(engine: Any) -> dict[str, Any]:
    """The client-state entry that makes a checkpoint convertible by ``ds_to_universal`` without
    ``--inject_missing_state``; empty when the model brings its own (AutoTP sets it on the module, and DeepSpeed
    writes it before the client state, which would replace it)."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_VERSION_KEY, UNIVERSAL_CHECKPOINT_VERSION_VALUE

    if getattr(getattr(engine, "module", None), _UC_INFO_KEY, None) is not None:
        return {}
    return {_UC_INFO_KEY: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}


def universal_dir(step_dir: str | os.PathLike) -> Path:
    """Where the universal copy of ``step_dir`` lives: ``step_XXXXXXXX.universal`` next to it."""
    step_dir = Path(step_dir)
    return step_dir.with_name(step_dir.name + UNIVERSAL_SUFFIX)


def _partitioned(files: dict[str, Any] | list[str]) -> bool:
    """True when a checkpoint's optimizer state is split over its ranks (``*optim_states.pt`` shards: ZeRO 1-3, and
    ZeRO-0 with bf16, whose BF16_Optimizer partitions the fp32 master weights); False when every rank saved (and
    reads) the whole state in ``mp_rank_00_model_states.pt`` (ZeRO-0 in fp32/fp16), which any world size loads."""
    return any(str(name).endswith("optim_states.pt") for name in files)


@dataclass(frozen=True)
class ResumeSource:
    """What to resume from and how (:func:`resolve_resume`).

    Attributes:
        checkpoint: The verified checkpoint (RNG states, manifest).
        load_dir: The directory DeepSpeed loads: ``checkpoint`` itself or its universal copy.
        universal: True when ``load_dir`` is a universal copy: the DeepSpeed config needs ``checkpoint.load_universal``.
        saved_world_size: The world size the checkpoint was written with (None: not recorded).
        saved_zero_stage: Its ZeRO stage (None: written before dsft recorded it).
    """

    checkpoint: Path
    load_dir: Path
    universal: bool
    saved_world_size: int | None
    saved_zero_stage: int | None


def needs_universal(
    saved: dict[str, Any], world_size: int, zero_stage: int, partitions_optimizer: bool, nvme_optimizer: bool = False
) -> bool:
    """Whether a checkpoint with manifest ``saved`` must go through a universal copy to load into this run.

    Args:
        saved: The checkpoint's manifest (``world_size``, ``zero_stage``, ``files``).
        world_size: This run's data-parallel world size.
        zero_stage: This run's ``zero.stage``.
        partitions_optimizer: True when this run's optimizer state is split over ranks (ZeRO 1-3, or ZeRO-0 with bf16).
        nvme_optimizer: This run offloads the optimizer to NVMe.

    Returns:
        False when DeepSpeed loads the checkpoint as it is (same world size and stage, or ZeRO-0 fp32/fp16 on both
        sides, where every rank holds the whole state), True when it needs a universal copy.

    Raises:
        CheckpointError: the change cannot be loaded; the message names the keys to set.
    """
    saved_world, saved_stage = saved.get("world_size"), saved.get("zero_stage")
    same_world = saved_world in (None, world_size)
    same_stage = saved_stage in (None, zero_stage)
    if same_world and same_stage:
        return False
    saved_partitioned = _partitioned(saved.get("files", {}))
    was = f"world size {saved_world}, zero.stage={saved_stage if saved_stage is not None else '?'}"
    if not saved_partitioned and not partitions_optimizer:
        return False  # the whole optimizer state is in mp_rank_00_model_states.pt; nothing to re-partition
    if saved_partitioned != partitions_optimizer:
        raise CheckpointError(
            f"zero.stage={zero_stage}: the checkpoint was written with {was} and "
            f"{'a partitioned' if saved_partitioned else 'an unpartitioned (ZeRO-0 fp32/fp16)'} optimizer state; this "
            f"run's is {'partitioned' if partitions_optimizer else 'unpartitioned'}. DeepSpeed converts only between "
            "partitioned states (ds_to_universal reads *optim_states.pt shards). Resume with "
            f"zero.stage={saved_stage if saved_stage is not None else 'as before'} and the same precision, or start a "
            "new run from the exported weights (dsft export)."
        )
    if nvme_optimizer or any(str(f).startswith("offloaded_tensors") for f in saved.get("files", {})):
        raise CheckpointError(
            f"zero.offload_optimizer=nvme: the checkpoint was written with {was}, this run has world size "
            f"{world_size} and zero.stage={zero_stage}; DeepSpeed cannot load a universal checkpoint with the "
            "optimizer on NVMe. Resume with the checkpoint's world size and zero.stage, or with "
            "zero.offload_optimizer=none|cpu."
        )
    return True


def _source_hash(step_dir: Path) -> str:
    return _sha256(step_dir / MANIFEST_NAME)


def _universal_is_current(step_dir: Path, udir: Path) -> bool:
    """True when ``udir`` is a complete universal copy of the checkpoint now in ``step_dir``."""
    try:
        manifest = verify_checkpoint(udir, verify_hashes=False)
        return manifest.get(_SOURCE_KEY, {}).get("manifest_sha256") == _source_hash(step_dir)
    except (CheckpointError, OSError, AttributeError):
        return False


def convert_to_universal(step_dir: str | os.PathLike, workers: int = 1) -> Path:
    """Write the universal copy of the checkpoint ``step_dir`` (not collective: one process, e.g. rank 0).

    ``deepspeed.checkpoint.ds_to_universal`` writes into ``step_XXXXXXXX.universal.partial``; then, like every
    checkpoint, a manifest (files, sizes, sha256, the source's manifest hash) goes in last and the directory is
    renamed to ``step_XXXXXXXX.universal``. A kill at any point leaves the original untouched and at most a
    ``*.partial`` directory, which the next conversion (or save's pruning) removes. A current copy is reused.

    Args:
        step_dir: A complete checkpoint (its manifest is checked, sizes only).
        workers: Processes ``ds_to_universal`` extracts and merges with; 1 runs in this process (the only safe
            choice inside training, whose threads make forking unsafe).

    Returns:
        The universal directory.

    Raises:
        CheckpointError: ``step_dir`` is incomplete or DeepSpeed could not convert it (its message is included).
    """
    step_dir = Path(step_dir)
    out = universal_dir(step_dir)
    if _universal_is_current(step_dir, out):
        logger.info("%s: reusing its universal copy %s", step_dir, out.name)
        return out
    source = verify_checkpoint(step_dir, verify_hashes=False)
    if not _partitioned(source["files"]):
        raise CheckpointError(
            f"{step_dir}: no *optim_states.pt shards (ZeRO-0 in fp32/fp16): its optimizer state is whole in "
            "mp_rank_00_model_states.pt and loads on any world size as it is; there is nothing to convert"
        )
    partial = out.with_name(out.name + _PARTIAL_SUFFIX)
    t0 = time.perf_counter()
    try:
        if partial.exists():  # left by a conversion that was killed
            _remove_dir(partial)
        _run_ds_to_universal(step_dir, partial, workers)
        _write_manifest(
            partial,
            int(source["step"]),
            None,  # a universal copy loads on any world size
            zero_stage=source.get("zero_stage"),
            **{_SOURCE_KEY: {"name": step_dir.name, "manifest_sha256": _source_hash(step_dir)}},
        )
        if out.exists():  # stale: its source was saved again
            _remove_dir(out)
        os.rename(partial, out)
        _fsync_dir(out.parent)
        # ds_to_universal points `latest_universal` at the directory it wrote (the partial one): name the final one
        _write_atomic(out.parent / "latest_universal", out.name.encode())
    except OSError as e:
        raise CheckpointError(
            f"{step_dir}: writing its universal copy {partial} failed: {_detach(e, str(partial))}"
        ) from None
    logger.info("converted %s to a universal checkpoint in %.1fs", step_dir, time.perf_counter() - t0)
    return out


def _run_ds_to_universal(step_dir: Path, out: Path, workers: int) -> None:
    import io
    from types import SimpleNamespace

    from deepspeed.checkpoint import ds_to_universal

    args = SimpleNamespace(
        input_folder=str(step_dir),
        output_folder=str(out),
        num_extract_workers=workers,
        num_merge_workers=workers,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # checkpoints written before save_checkpoint added universal_checkpoint_info
    )
    chatter = io.StringIO()  # its step-by-step prints: kept for the log, not the console
    try:
        with contextlib.redirect_stdout(chatter):
            ds_to_universal.main(args)
    except (AssertionError, ValueError, KeyError, RuntimeError, NotImplementedError, IndexError) as e:
        logger.error("ds_to_universal output:\n%s", chatter.getvalue())
        raise CheckpointError(
            f"{step_dir}: DeepSpeed's ds_to_universal could not convert it ({type(e).__name__}: {e}); resume with the "
            "world size and zero.stage it was written with"
        ) from e
    logger.debug("ds_to_universal output:\n%s", chatter.getvalue())


def resolve_resume(
    ckpt_dir: str | os.PathLike,
    zero_stage: int,
    partitions_optimizer: bool,
    nvme_optimizer: bool = False,
    watchdog: StepWatchdog | None = None,
) -> ResumeSource:
    """Collective: how this run loads ``ckpt_dir``: as it is, or through its universal copy (converted once, here).

    Rank 0 reads the manifest, decides with :func:`needs_universal` and, when the world size or ZeRO stage changed,
    runs :func:`convert_to_universal` (a current copy is reused); the other ranks wait for its answer with a timeout
    sized for reading the checkpoint. Build the DeepSpeed config with ``load_universal=result.universal`` and pass
    ``result.load_dir`` to :func:`load_checkpoint` as ``universal_dir`` when ``universal``.

    Args:
        ckpt_dir: A complete checkpoint (e.g. from :func:`find_resume_checkpoint`).
        zero_stage: This run's ``zero.stage``.
        partitions_optimizer: This run splits the optimizer state over ranks (ZeRO 1-3, or ZeRO-0 with bf16).
        nvme_optimizer: This run offloads the optimizer to NVMe.
        watchdog: The run's step watchdog, if already running.

    Raises:
        CheckpointError: on every rank, when the change cannot be loaded or the conversion failed (the message
            names the keys to set); the original checkpoint is left as it was.
    """
    ckpt_dir = Path(ckpt_dir)
    world = dist.world_size()

    def decide() -> tuple[str | None, ResumeSource | None]:  # rank 0
        try:
            saved = json.loads((ckpt_dir / MANIFEST_NAME).read_text())
            saved_world, saved_stage = saved.get("world_size"), saved.get("zero_stage")
            universal = needs_universal(saved, world, zero_stage, partitions_optimizer, nvme_optimizer)
            load_dir = ckpt_dir
            if universal:
                logger.warning(
                    "%s was written with world size %s and zero.stage=%s; this run has %d and %d: loading it through "
                    "a DeepSpeed universal checkpoint",
                    ckpt_dir,
                    saved_world,
                    saved_stage,
                    world,
                    zero_stage,
                )
                load_dir = convert_to_universal(ckpt_dir)
            return None, ResumeSource(ckpt_dir, load_dir, universal, saved_world, saved_stage)
        except (CheckpointError, OSError, ValueError) as e:
            return str(e), None

    error, source = _on_rank0(
        f"rank 0 preparing {ckpt_dir.name} for world size {world}",
        lambda: 2 * _manifest_bytes(ckpt_dir),  # read once, written once
        decide,
        watchdog,
    )
    if error is not None:
        raise CheckpointError(f"cannot resume from {ckpt_dir}: {error}")
    return source


def check_resume_settings(saved: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Refuse a resume whose settings would change the data order the checkpoint's position refers to.

    Args:
        saved: The ``data_order`` entry of the checkpoint's client state (None: written before dsft saved it).
        current: The same keys for this run, e.g. ``{"data.seq_len": 2048, "data.packing": "greedy",
            "train.global_batch": 64, "train.seed": 0}``.

    Raises:
        CheckpointError: naming the first key that differs, its two values and the choices.
    """
    for key, value in (saved or {}).items():
        if key in current and current[key] != value:
            raise CheckpointError(
                f"{key}={current[key]}: the checkpoint was trained with {key}={value}, and the position it resumes "
                f"from counts batches of that data order. Resume with {key}={value}, or start a new run from its "
                "weights (train.resume=never with another output_dir, model.name_or_path=the exported model)."
            )
