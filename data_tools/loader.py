"""The one shared loader: every recipe reads its data through ``build_dataloader``.

Sources: a Megatron ``.bin/.idx`` prefix (optional ``{prefix}_loss_mask``) in ``DistributedSampler``'s seeded order, or
a WebDataset ``index.json`` streamed shard by shard. Modes: ``packed`` (several samples per row, no attention across
samples), ``padding`` (pad to the longest sample of the batch) and ``bucket`` (length-grouped batches, then padding).

Plain text (a prefix without a loss mask) in packed mode is cut Megatron-style into contiguous chunks of ``seq_len``
tokens across documents, *with* Megatron's ``reset_position_ids`` / ``reset_attention_mask`` behaviour: position ids
restart and attention is blocked at every document start. Why this and not packing whole documents: pre-training
documents are often longer than a row, and packing would have to truncate (lose) or split them anyway; contiguous
chunks fill 100% of every row, need no packer, and each chunk is one O(1) memmap slice. The resets keep the one rule
that packing guarantees: no token attends to, or is trained to predict, another document.

A list of ``{"path", "weight"}`` sources is a weighted mixture (``loading.blend``): one blended source with Megatron
``BlendedDataset`` semantics whose order depends on global positions only (not on the rank or world size); the
planner treats it as one more mmap source, and each batch also carries ``source_counts`` (samples per source).

World-size-free order (mmap and mixtures): an epoch's rows (which samples, packed into which row, in which order) are
a function of ``(seed, epoch, seq_len, packing, sources)`` only, cut into optimizer steps of ``global_batch`` rows;
each rank takes its slice of every micro step (``mmap_source.make_plan``). So 1 rank x accumulation 4, 2 ranks x 2
and 4 ranks x 1 train on the same global batches, and ``state_dict()`` (epoch, rows consumed by all ranks, what fixed
the order) resumes on another world size. A WebDataset stream is dealt to ``world_size x workers`` slots instead
(streaming has no global order to cut); its state resumes on the same world size only, and says so. This module
never calls ``torch.distributed``: the caller passes ``rank`` and ``world_size``.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import DataLoader

from data_tools.loading import blend, mmap_source, webdataset_source
from data_tools.loading.packing import ATTENTION_MODES, PACKING_MODES, PackingStats

STATE_VERSION = 2  # 1: per-rank DistributedSampler order (before the world-size-free order)


@dataclass(frozen=True)
class LoaderConfig:
    """Validated arguments of ``build_dataloader`` (see there)."""

    seq_len: int
    micro_batch_size: int
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    packing: str = "packed"
    attention: str = "mask"
    num_workers: int = 0
    pin_memory: bool = False
    pad_multiple: int = 1
    shuffle: bool = True
    drop_last: bool = True
    pad_id: int = 0
    pack_window: int = 64
    shuffle_buffer: int = 1000
    global_batch: int | None = None  # rows per optimizer step, all ranks; None = micro_batch_size x world_size

    def __post_init__(self):
        if self.packing not in PACKING_MODES:
            raise ValueError(f"loader: packing={self.packing!r}, expected one of {PACKING_MODES}")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"loader: attention={self.attention!r}, expected one of {ATTENTION_MODES}")
        if self.seq_len < 2 or self.micro_batch_size < 1:
            raise ValueError(f"loader: seq_len={self.seq_len} must be >= 2, micro_batch_size >= 1")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"loader: rank={self.rank} is not in [0, world_size={self.world_size})")
        if self.pad_multiple < 1:
            raise ValueError(f"loader: pad_multiple={self.pad_multiple} must be >= 1")
        if self.num_workers < 0:
            raise ValueError(f"loader: num_workers={self.num_workers} must be >= 0")
        unit = self.micro_batch_size * self.world_size
        if self.global_batch is None:
            object.__setattr__(self, "global_batch", unit)
        if self.global_batch < 1 or self.global_batch % unit:
            raise ValueError(
                f"loader: global_batch={self.global_batch} rows is not a multiple of micro_batch_size x world_size = "
                f"{self.micro_batch_size} x {self.world_size}"
            )


class DistributedLoader:
    """Batches for one rank, resumable. Iterate once per epoch; the epoch advances by itself at its end.

    Attributes:
        epoch: the epoch being (or about to be) iterated.
        batches_consumed: batches of this epoch already handed out (counted when yielded).
        stats: ``PackingStats`` of the current epoch for this rank (mmap path: exact from the plan; WebDataset:
            counted as batches are made, including skipped ones on resume, and only when ``num_workers == 0``).
    """

    def __init__(self, source, cfg: LoaderConfig):
        self.source, self.cfg = source, cfg
        self.epoch, self.batches_consumed = 0, 0
        self._plan_epoch, self._plan, self.stats = None, None, PackingStats()
        if isinstance(source, webdataset_source.WebDatasetSource):
            slots = cfg.world_size * max(1, cfg.num_workers)
            self._slots = webdataset_source.assign_slots(source.samples, slots)
            self._num_batches = webdataset_source.epoch_batches(source, self._slots, cfg)

    @property
    def is_webdataset(self) -> bool:
        return isinstance(self.source, webdataset_source.WebDatasetSource)

    @property
    def is_mixture(self) -> bool:
        return isinstance(self.source, blend.BlendedSource)

    @property
    def source_names(self) -> list[str] | None:
        """Names of a mixture's sources, in the order of ``source_counts``; None for a single source."""
        return self.source.names if self.is_mixture else None

    def _ensure_plan(self) -> None:
        if not self.is_webdataset and self._plan_epoch != self.epoch:
            src, cfg = self.source, self.cfg
            if self.is_mixture:
                # The blend is already ordered (and shuffled within each source): its positions are the global order.
                src, cfg = self.source.epoch_view(self.epoch), dataclasses.replace(cfg, shuffle=False)
            self._plan, self.stats = mmap_source.make_plan(src, epoch=self.epoch, cfg=cfg)
            self._plan_source, self._plan_epoch = src, self.epoch

    def __len__(self) -> int:
        """Batches per epoch for this rank; the same number on every rank."""
        if self.is_webdataset:
            return self._num_batches
        self._ensure_plan()
        return len(self._plan)

    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch`` (from its first batch). Setting the current epoch keeps the position, so calling
        ``set_epoch(state['epoch'])`` after ``load_state_dict`` does not lose the resumed offset."""
        if epoch != self.epoch:
            self.epoch, self.batches_consumed = int(epoch), 0

    def _roll_over(self) -> None:
        """A position at the very end of an epoch is the start of the next one (a checkpoint taken right after the
        last batch must resume into the next epoch, not into an empty iteration)."""
        if self.batches_consumed >= len(self):
            self.epoch, self.batches_consumed = self.epoch + 1, 0

    def __iter__(self) -> Iterator[dict]:
        self._roll_over()
        n, start = len(self), self.batches_consumed
        if self.is_webdataset:
            stream = webdataset_source.WebDatasetStream(self.source, self._slots, self.cfg, self.epoch)
            self.stats = stream.stats  # filled as batches are made (stays empty when workers make them)
            # Streams are deterministic, so resuming = regenerating and skipping the consumed batches.
            batches = itertools.islice(self._iterate(stream, batch_size=None), start, n)
        else:
            ds = mmap_source.PlanBatches(self._plan_source, self._plan, self.cfg)
            if self.cfg.num_workers == 0:
                batches = (ds[j] for j in range(start, n))
            else:
                batches = self._iterate(ds, sampler=range(start, n), batch_size=None)
        for batch in batches:
            self.batches_consumed += 1
            yield batch
        self._roll_over()

    def _iterate(self, dataset, **kw):
        if self.cfg.num_workers == 0 and not kw.get("sampler"):
            return iter(dataset)
        return iter(DataLoader(dataset, num_workers=self.cfg.num_workers, pin_memory=self.cfg.pin_memory, **kw))

    @property
    def rows_consumed(self) -> int:
        """Rows of this epoch consumed by all ranks together (mmap and mixtures: always a prefix of the epoch's rows)."""
        return self.batches_consumed * self.cfg.micro_batch_size * self.cfg.world_size

    def state_dict(self) -> dict:
        """Position and everything that fixed the order; all of it is plain ints and strings.

        mmap and mixture sources: the position is ``rows_consumed`` over all ranks, so a run resumes on another world
        size or micro batch whose ``micro_batch_size x world_size`` divides it (a checkpoint at an optimizer step
        always does when the global batch is the same). A WebDataset stream's order depends on its
        ``world_size x num_workers`` slots, so its state also holds those and its per-rank batch count.
        """
        c = self.cfg
        self._roll_over()
        state = {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "rows_consumed": self.rows_consumed,
            "global_batch": c.global_batch,
            "seed": c.seed,
            "seq_len": c.seq_len,
            "packing": c.packing,
            "shuffle": c.shuffle,
            "mixture": self.source.fingerprint() if self.is_mixture else None,
            "stream": None,
        }
        if self.is_webdataset:
            state["stream"] = {
                "world_size": c.world_size,
                "micro_batch_size": c.micro_batch_size,
                "num_workers": c.num_workers,
                "batches_consumed": self.batches_consumed,
            }
        state["epoch_rows"] = len(self) * c.micro_batch_size * c.world_size
        return state

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``'s position. Raises ValueError, naming the setting, if what decides the order differs
        from this loader's or the position falls inside a micro step of this loader."""
        version = state.get("version")
        if version != STATE_VERSION:
            old = " (an older dsft's per-rank order)" if version == 1 else ""
            raise ValueError(
                f"loader state version {version!r}{old}, expected {STATE_VERSION}: this dsft would train on other "
                "batches from there; finish the run with the dsft that started it or start a fresh run"
            )
        mine = self.state_dict()
        _check_same_mixture(state.get("mixture"), mine["mixture"])
        for key in ("seed", "seq_len", "packing", "shuffle", "global_batch"):
            if state[key] != mine[key]:
                raise ValueError(
                    f"loader state: {key}={state[key]!r} in the checkpoint but {mine[key]!r} now; the resumed run "
                    f"would see other batches. Restore {key}={state[key]!r} or start a fresh run"
                )
        if (state["stream"] is None) != (mine["stream"] is None):
            raise ValueError(
                "loader state: the checkpoint read a WebDataset stream and this run an mmap source, or the other way "
                "round; restore the data setting of the checkpoint or start a fresh run"
            )
        if mine["stream"] is not None:
            for key in ("world_size", "micro_batch_size", "num_workers"):
                if state["stream"][key] != mine["stream"][key]:
                    raise ValueError(
                        f"loader state: a WebDataset stream is dealt to world_size x num_workers slots, so its order "
                        f"depends on them: {key}={state['stream'][key]!r} in the checkpoint but "
                        f"{mine['stream'][key]!r} now. Resume with {key}={state['stream'][key]!r}, or give the "
                        "source as a mixture [{path: ..., weight: 1}] (read map-style, the same order on any world "
                        "size) in a fresh run"
                    )
        self.epoch = int(state["epoch"])
        rows = len(self) * self.cfg.micro_batch_size * self.cfg.world_size
        if rows != state["epoch_rows"]:
            raise ValueError(
                f"loader state: {state['epoch_rows']} rows in epoch {self.epoch} in the checkpoint but {rows} now; "
                "the data changed since the checkpoint"
            )
        if mine["stream"] is not None:
            self.batches_consumed = int(state["stream"]["batches_consumed"])
            return
        unit = self.cfg.micro_batch_size * self.cfg.world_size
        if state["rows_consumed"] % unit:
            raise ValueError(
                f"loader state: the checkpoint is {state['rows_consumed']} rows into epoch {self.epoch}, not a whole "
                f"number of micro steps of micro_batch_size x world_size = {unit} rows; resume with a micro batch "
                "and world size whose product divides it"
            )
        self.batches_consumed = state["rows_consumed"] // unit


def _check_same_mixture(saved: list[dict] | None, now: list[dict] | None) -> None:
    """Refuse to resume a mixture whose sources, weights or sizes changed (the blended order would differ)."""
    if saved == now:
        return
    if saved is None or now is None:
        was, became = ("one source", "a mixture") if saved is None else ("a mixture", "one source")
        raise ValueError(
            f"loader state: the checkpoint trained on {was}, this run on {became}; restore the data "
            "setting of the checkpoint or start a fresh run"
        )
    old = {m["name"]: m for m in saved}
    new = {m["name"]: m for m in now}
    for name in sorted(set(old) ^ set(new)):
        what = "is new" if name in new else "was dropped"
        raise ValueError(
            f"loader state: mixture source {name!r} {what} since the checkpoint; the resumed run "
            "would see other batches. Restore the mixture or start a fresh run"
        )
    for name in sorted(old):
        a, b = old[name], new[name]
        for key in ("share", "units"):
            if a[key] != b[key]:
                change = "its data changed" if key == "units" else "restore it"
                raise ValueError(
                    f"loader state: mixture source {name!r} has {key} {a[key]!r} in the checkpoint but "
                    f"{b[key]!r} now ({change}, or start a fresh run)"
                )
    raise ValueError(
        f"loader state: the mixture's order changed since the checkpoint ({[m['name'] for m in saved]} "
        f"then, {[m['name'] for m in now]} now); restore it or start a fresh run"
    )


def build_dataloader(
    source: str | Path | list[dict],
    *,
    seq_len: int,
    micro_batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    packing: str = "packed",
    attention: str = "mask",
    num_workers: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
    pad_id: int = 0,
    pack_window: int = 64,
    shuffle_buffer: int = 1000,
    pin_memory: bool = False,
    pad_multiple: int = 1,
    global_batch: int | None = None,
) -> DistributedLoader:
    """Build the loader of one rank.

    Args:
        source: an mmap prefix (``P`` for ``P.bin/.idx``, optional ``P_loss_mask.bin/.idx``) or the path of a
            WebDataset ``index.json`` (format ``dsft-webdataset/1``) or of its folder; or a weighted mixture of
            those, ``[{"path": A, "weight": 0.75}, {"path": B, "weight": 0.25}]`` (optional ``"name"`` per item,
            default the file name; see ``loading.blend``: deterministic, a small source repeats).
        seq_len: row length in tokens; longer samples are truncated (counted in ``loader.stats``).
        micro_batch_size: rows per batch.
        rank: this process's rank; world_size: number of ranks (the loader never asks torch.distributed).
        seed: seeds every shuffle; the same on all ranks.
        packing: ``"packed"`` (first-fit packing, no sample split), ``"padding"`` or ``"bucket"``.
        attention: packed mode only. ``"mask"``: a (B, 1, T, T) bool block-diagonal causal ``attention_mask``
            (SDPA/eager, CPU). ``"position_ids"``: no mask; sample starts are where ``position_ids`` is 0, also
            given as ``cu_seq_lens_q/k`` + ``max_length_q/k`` for variable-length kernels (FlexAttention / varlen /
            flash-attn, see ``finetune.attention.resolve_attention`` and ``loading.packing.varlen_kwargs``).
        num_workers: DataLoader worker processes building batches (0 = in this process).
        shuffle: shuffle samples (mmap: DistributedSampler's permutation; WebDataset: shard order + a sample buffer).
        drop_last: mmap path. True: the epoch's last partial optimizer step is dropped (no sample is repeated, a few
            per epoch are skipped). False: the rows are padded to whole micro steps by repeating rows with no targets
            (labels all -100), so every sample's targets count exactly once over all ranks (exact evaluation).
        pad_id: token id of padding (labels there are -100 whatever it is).
        pack_window: rows the first-fit packer keeps open.
        shuffle_buffer: WebDataset sample shuffle buffer per worker.
        pin_memory: with ``num_workers`` > 0, batches arrive in page-locked memory, so the engine's
            ``.to(device, non_blocking=True)`` copies overlap the GPU's work.
        pad_multiple: padding/bucket modes: pad each batch's length up to a multiple of this (at most ``seq_len``), so
            compiled kernels see few distinct shapes.
        global_batch: rows per optimizer step over all ranks (micro batch x world size x accumulation), a multiple of
            ``micro_batch_size x world_size``; default one micro step. The order depends on it, not on the world size.

    Returns:
        A ``DistributedLoader``: iterable of batch dicts (``input_ids``, ``labels``, ``position_ids``,
        ``attention_mask`` except packed+position_ids, which has the varlen kwargs instead, ``num_real_tokens``; a
        mixture also ``source_counts``, an int64 tensor of real samples per source, excluding zero-weight repeats),
        with ``len``, ``set_epoch``, ``state_dict`` / ``load_state_dict`` (a mixture's state also holds its sources,
        weights and sizes, and a changed mixture is refused by name; a changed seed, seq_len, packing or global
        batch is refused by key).

    Raises:
        ValueError: bad arguments, or a mixture with a bad weight (``source[1].weight ...``).
    """
    cfg = LoaderConfig(
        seq_len=seq_len,
        micro_batch_size=micro_batch_size,
        rank=rank,
        world_size=world_size,
        seed=seed,
        packing=packing,
        attention=attention,
        num_workers=num_workers,
        pin_memory=pin_memory,
        pad_multiple=pad_multiple,
        shuffle=shuffle,
        drop_last=drop_last,
        pad_id=pad_id,
        pack_window=pack_window,
        shuffle_buffer=shuffle_buffer,
        global_batch=global_batch,
    )
    if isinstance(source, list | tuple):
        return DistributedLoader(blend.BlendedSource(blend.parse_mixture(list(source)), cfg), cfg)
    path = Path(source)
    if path.is_dir() and (path / "index.json").is_file():  # a WebDataset folder given instead of its index
        path = path / "index.json"
    if path.suffix == ".json":
        src = webdataset_source.WebDatasetSource(path)
    else:
        src = mmap_source.MmapSource(path)
    return DistributedLoader(src, cfg)
