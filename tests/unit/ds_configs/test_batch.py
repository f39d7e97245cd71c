"""Batch arithmetic: any two of micro / accum / global determine the third; errors name the train.* keys."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ds_configs import BatchPlan, resolve_batch


def test_global_batch_is_product():
    assert BatchPlan(micro_batch_size=4, grad_accum=8, world_size=2).global_batch == 64


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (dict(micro_batch_size=4, grad_accum=8), BatchPlan(4, 8, 2)),
        (dict(micro_batch_size=4, global_batch=64), BatchPlan(4, 8, 2)),
        (dict(grad_accum=8, global_batch=64), BatchPlan(4, 8, 2)),
        (dict(micro_batch_size=4, grad_accum=8, global_batch=64), BatchPlan(4, 8, 2)),
        (dict(global_batch=64), BatchPlan(1, 32, 2)),
        (dict(), BatchPlan(1, 1, 2)),
        (dict(micro_batch_size=3), BatchPlan(3, 1, 2)),
    ],
)
def test_any_two_determine_the_third(given, expected):
    assert resolve_batch(world_size=2, **given) == expected


def test_inconsistent_triple_names_all_keys():
    with pytest.raises(ValueError) as err:
        resolve_batch(world_size=2, micro_batch_size=4, grad_accum=8, global_batch=60)
    msg = str(err.value)
    for key in ("train.micro_batch_size", "train.grad_accum", "train.global_batch", "64"):
        assert key in msg


def test_not_divisible_by_accum_suggests_multiple():
    with pytest.raises(ValueError, match=r"train\.global_batch=50 is not divisible .*train\.grad_accum=8.* 64"):
        resolve_batch(world_size=2, grad_accum=8, global_batch=50)


def test_not_divisible_by_micro_suggests_multiple():
    with pytest.raises(ValueError, match=r"train\.global_batch=10 .*train\.micro_batch_size=4.* 16"):
        resolve_batch(world_size=2, micro_batch_size=4, global_batch=10)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "4"])
def test_rejects_non_positive_integers(bad):
    with pytest.raises(ValueError, match="train.micro_batch_size"):
        resolve_batch(world_size=1, micro_batch_size=bad)
    with pytest.raises(ValueError, match="world_size"):
        resolve_batch(world_size=bad)


@given(
    world=st.integers(1, 64),
    micro=st.integers(1, 64),
    accum=st.integers(1, 64),
    drop=st.sampled_from(["micro_batch_size", "grad_accum"]),
)
def test_roundtrip_recovers_dropped_value(world, micro, accum, drop):
    full = BatchPlan(micro, accum, world)
    given_ = {"micro_batch_size": micro, "grad_accum": accum, "global_batch": full.global_batch}
    del given_[drop]
    assert resolve_batch(world_size=world, **given_) == full
