"""The loader benchmark runs end to end on a small sample and reports what the README table shows."""

from __future__ import annotations

import numpy as np

from benchmarks import loader_throughput


def test_lengths_are_sft_like():
    lengths = loader_throughput.sft_lengths()
    assert 230 <= np.median(lengths) <= 280 and lengths.max() == 1024 and lengths.min() >= 16


def test_run_reports_throughput_and_efficiency():
    result = loader_throughput.run(n_samples=1500, max_batches=3)
    assert set(result) == {"title", "markdown", "data"}
    eff = {m: e["efficiency"] for m, e in result["data"]["efficiency"].items()}
    assert eff["packed"] > 0.95 and eff["packed"] > eff["padding"] and eff["bucket"] > eff["padding"]
    speed = result["data"]["throughput"]
    assert len(speed) == 4 and all(v["tokens_per_s"] > 0 and v["batches"] == 3 for v in speed.values())
    assert "| packed |" in result["markdown"]
