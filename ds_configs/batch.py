"""Batch arithmetic: the one place where ``micro_batch × grad_accum × world_size = global batch`` is computed.

Everything else (the engine, the generator, the DeepSpeed JSON) asks a :class:`BatchPlan`; nobody multiplies
batch sizes by hand. DeepSpeed itself checks ``train_batch_size == micro × accum × world`` at ``initialize`` and
fails with an assertion that does not say which of the user's settings to change, so we check first and name them.
"""

from __future__ import annotations

from dataclasses import dataclass

# The training-config keys the user sets; error messages name these so the user knows what to edit.
MICRO_KEY = "train.micro_batch_size"
ACCUM_KEY = "train.grad_accum"
GLOBAL_KEY = "train.global_batch"


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's samples are split: per-GPU micro batch × accumulation steps × data-parallel ranks.

    Attributes:
        micro_batch_size: samples per rank per forward/backward (``train_micro_batch_size_per_gpu``).
        grad_accum: forward/backward passes per optimizer step (``gradient_accumulation_steps``).
        world_size: data-parallel ranks (all GPUs on all nodes, or CPU ranks).
    """

    micro_batch_size: int
    grad_accum: int
    world_size: int

    def __post_init__(self) -> None:
        for name, key in (("micro_batch_size", MICRO_KEY), ("grad_accum", ACCUM_KEY), ("world_size", "world_size")):
            value = getattr(self, name)
            # bool is an int subclass; True as a batch size is always a bug upstream.
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{key}={value!r}: must be a positive integer")

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over all ranks (``train_batch_size`` in DeepSpeed)."""
        return self.micro_batch_size * self.grad_accum * self.world_size


def _check_optional(key: str, value: int | None) -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{key}={value!r}: must be a positive integer (or left unset to be derived)")


def resolve_batch(
    *,
    world_size: int,
    micro_batch_size: int | None = None,
    grad_accum: int | None = None,
    global_batch: int | None = None,
) -> BatchPlan:
    """Complete a batch plan from any two of micro batch, accumulation and global batch.

    With one or none given, the missing ones default to 1 (micro batch 1, accumulation 1), which is always valid.
    With all three given they must agree.

    Args:
        world_size: data-parallel ranks.
        micro_batch_size: per-rank micro batch, or None to derive it.
        grad_accum: accumulation steps, or None to derive it.
        global_batch: samples per optimizer step over all ranks, or None to derive it.

    Returns:
        The complete :class:`BatchPlan`.

    Raises:
        ValueError: a value is not a positive integer, the three disagree, or the global batch is not divisible by
            the other factors; the message names the ``train.*`` keys and what to change.
    """
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size={world_size!r}: must be a positive integer")
    _check_optional(MICRO_KEY, micro_batch_size)
    _check_optional(ACCUM_KEY, grad_accum)
    _check_optional(GLOBAL_KEY, global_batch)

    if global_batch is None:
        return BatchPlan(micro_batch_size or 1, grad_accum or 1, world_size)

    if micro_batch_size is not None and grad_accum is not None:
        plan = BatchPlan(micro_batch_size, grad_accum, world_size)
        if plan.global_batch != global_batch:
            raise ValueError(
                f"{GLOBAL_KEY}={global_batch} disagrees with {MICRO_KEY}={micro_batch_size} × {ACCUM_KEY}={grad_accum}"
                f" × world_size={world_size} = {plan.global_batch}; unset one of the three (it is derived from the"
                f" other two) or set {GLOBAL_KEY}={plan.global_batch}"
            )
        return plan

    if grad_accum is not None:
        # micro batch derived: global / (accum × world)
        per_step = grad_accum * world_size
        if global_batch % per_step:
            raise ValueError(
                f"{GLOBAL_KEY}={global_batch} is not divisible by {ACCUM_KEY}={grad_accum} × world_size={world_size}"
                f" = {per_step}; set {GLOBAL_KEY} to a multiple of {per_step} (e.g. {_round_up(global_batch, per_step)})"
                f" or change {ACCUM_KEY}"
            )
        return BatchPlan(global_batch // per_step, grad_accum, world_size)

    micro = micro_batch_size or 1
    per_step = micro * world_size
    if global_batch % per_step:
        raise ValueError(
            f"{GLOBAL_KEY}={global_batch} is not divisible by {MICRO_KEY}={micro} × world_size={world_size}"
            f" = {per_step}; set {GLOBAL_KEY} to a multiple of {per_step} (e.g. {_round_up(global_batch, per_step)})"
            f" or change {MICRO_KEY}"
        )
    return BatchPlan(micro, global_batch // per_step, world_size)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
