"""The tiled loss through the real launcher under ZeRO-3 (the head's weight is gathered by ZeRO-3's hooks inside the
head's forward and its gradient reduce-scattered like any other): the same losses, grad norms and eval loss as the
model's own loss, and final/ is a plain model (the head keeps its weight names)."""

from __future__ import annotations

import pytest

from tests.recipes.conftest import losses, metrics, run_recipe

ARGS = [
    "train.max_steps=8",
    "train.lr=3e-3",
    "zero.stage=3",
    "train.global_batch=4",
    "train.micro_batch_size=2",
    "train.grad_accum=null",
]


def test_tiled_loss_under_zero3_equals_the_plain_loss(tmp_path, tiny_llama_dir, counting_data):
    plain = run_recipe("full", tiny_llama_dir, counting_data, tmp_path / "plain", *ARGS, "train.tiled_loss=never")
    tiled = run_recipe("full", tiny_llama_dir, counting_data, tmp_path / "tiled", *ARGS, "train.tiled_loss=always")
    assert "tiled loss: the head and the loss in tiles" in (tmp_path / "tiled.log").read_text()
    lp, lt = losses(plain), losses(tiled)
    assert sorted(lt) == list(range(1, 9))
    assert [lt[s] for s in sorted(lt)] == pytest.approx([lp[s] for s in sorted(lp)], rel=1e-5)
    gp = [r["grad_norm"] for r in metrics(plain)]
    gt = [r["grad_norm"] for r in metrics(tiled)]
    assert gt == pytest.approx(gp, rel=1e-4)
    (ep,), (et,) = metrics(plain, "eval"), metrics(tiled, "eval")
    assert et["loss"] == pytest.approx(ep["loss"], rel=1e-5)

    from safetensors.torch import load_file

    weights = load_file(tiled / "final" / "model.safetensors")
    assert "lm_head.weight" in weights
