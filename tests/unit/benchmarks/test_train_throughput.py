"""The pieces of the training benchmark that take no training: data, FLOPs/MFU arithmetic, parsing, the table.

The timed runs themselves are benchmarks (``python -m benchmarks.train_throughput``), never asserted here.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from benchmarks import peer_hf_trainer, profile_step
from benchmarks import train_throughput as tt


def test_lengths_follow_the_spec():
    spec = tt.DataSpec(num_samples=4000)
    lengths = tt.sample_lengths(spec, np.random.default_rng(spec.seed))
    assert lengths.shape == (4000,)
    assert lengths.min() >= spec.min_len and lengths.max() <= spec.max_len
    assert 236 <= np.median(lengths) <= 276  # median ~256
    assert 1.15 <= lengths.mean() / np.median(lengths) <= 1.45  # lognormal sigma 0.7: mean ~1.28x median
    # A batch of 16 padded to its longest sample is mostly padding (what packing removes).
    batches = lengths[: 16 * 200].reshape(200, 16)
    pad_fraction = 1 - batches.sum() / (batches.max(axis=1).sum() * 16)
    assert 0.5 <= pad_fraction <= 0.75


def test_samples_are_deterministic_and_masked_prompt_first():
    spec = tt.DataSpec(num_samples=50, seed=7)
    a = tt.make_samples(spec, token_low=4, token_high=100, eos_id=2)
    b = tt.make_samples(spec, token_low=4, token_high=100, eos_id=2)
    assert all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b, strict=True))
    for ids, mask in a:
        assert len(ids) == len(mask) and ids[-1] == 2
        assert ids[:-1].min() >= 4 and ids[:-1].max() < 100
        first_target = int(np.argmax(mask))
        assert first_target >= 1 and mask[:first_target].sum() == 0 and mask[first_target:].all()
    with pytest.raises(ValueError, match="empty"):
        tt.make_samples(spec, token_low=10, token_high=10, eos_id=2)


def test_mmap_and_hf_dataset_hold_the_same_samples(tmp_path, tiny_tokenizer):
    from datasets import load_from_disk

    from data_tools.indexed import IndexedDataset
    from data_tools.meta import check_meta_matches_tokenizer

    samples = tt.make_samples(tt.DataSpec(num_samples=20), token_low=4, token_high=len(tiny_tokenizer), eos_id=2)
    prefix = tt.write_mmap(tmp_path / "train", samples, tiny_tokenizer)
    ids_ds, mask_ds = IndexedDataset(prefix), IndexedDataset(f"{prefix}_loss_mask")
    assert len(ids_ds) == len(mask_ds) == 20
    check_meta_matches_tokenizer(prefix, tiny_tokenizer)  # the engine's check passes
    hf = load_from_disk(str(tt.write_hf_dataset(tmp_path / "hf", samples)))
    for i, (ids, mask) in enumerate(samples):
        assert np.array_equal(ids_ds[i], ids) and np.array_equal(mask_ds[i], mask)
        assert hf[i]["input_ids"] == ids.tolist() and sum(hf[i]["attention_mask"]) == len(ids)
        assert hf[i]["labels"] == [t if m else -100 for t, m in zip(ids.tolist(), mask.tolist(), strict=True)]


def test_param_counts_match_the_llama_arithmetic():
    shape = tt.SHAPES["tiny"]
    h, i, L, kv = shape.hidden_size, shape.intermediate_size, shape.num_layers, shape.num_kv_heads
    kv_dim = h // shape.num_heads * kv
    vocab = 500
    full = tt.count_params(shape, vocab, "full")
    per_layer = 2 * h * h + 2 * h * kv_dim + 3 * h * i + 2 * h  # attention, MLP, two RMSNorms
    assert full["embedding"] == vocab * h
    assert full["base_matmul"] == L * per_layer + h + vocab * h  # + final norm + LM head
    assert full["lora"] == 0 and full["total"] == full["base_matmul"] + full["embedding"]
    lora = tt.count_params(shape, vocab, "lora", lora_r=8)
    pairs = [(h, h), (h, kv_dim), (h, kv_dim), (h, h), (h, i), (h, i), (i, h)]  # q k v o gate up down
    assert lora["lora"] == L * 8 * sum(a + b for a, b in pairs)


def test_flops_and_mfu_arithmetic():
    params = {"base_matmul": 1_000_000_000, "lora": 5_000_000, "embedding": 0, "total": 0}
    assert tt.flops_per_token(params, "full") == 6e9
    assert tt.flops_per_token(params, "lora") == 4e9 + 3e7
    with pytest.raises(ValueError):
        tt.flops_per_token(params, "prefix")
    h100 = tt.peak_flops("NVIDIA H100 80GB HBM3", "bf16")
    assert h100 == pytest.approx(989e12)
    assert tt.peak_flops("NVIDIA H100 PCIe", "bf16") == pytest.approx(756e12)  # the longer name wins
    assert tt.peak_flops(None, "bf16") is None  # CPU
    assert tt.peak_flops("NVIDIA H100 80GB HBM3", "fp32") == pytest.approx(494.5e12)  # TF32 tensor cores
    assert tt.peak_flops("NVIDIA H100 80GB HBM3", "fp32", tf32=False) == pytest.approx(66.9e12)
    assert tt.peak_flops("Some Future GPU", "bf16") is None
    # 42k tokens/s of a 1.1B model on one H100: 6 * 1.03e9 * 42e3 / 989e12 = 26%
    assert tt.mfu(42_000, 6 * 1.0345e9, h100, 1) == pytest.approx(6 * 1.0345e9 * 42_000 / 989e12)
    assert tt.mfu(42_000, 6e9, h100, 2) == pytest.approx(tt.mfu(21_000, 6e9, h100, 1))
    assert tt.mfu(1000, 6e9, None, 1) is None


def test_steady_state_skips_warmup():
    recs = [{"time_s": 10.0, "tokens": 100}] + [{"time_s": 1.0, "tokens": 1000}, {"time_s": 3.0, "tokens": 1000}]
    ss = tt.steady_state(recs, warmup_steps=1)
    assert ss["tokens_per_s"] == pytest.approx(500.0) and ss["tokens_per_step"] == 1000 and ss["steps"] == 2
    # rates only: the harmonic mean = tokens / time when every step carries the same tokens
    rates = [{"tokens_per_s": 1.0}, {"tokens_per_s": 1000.0}, {"tokens_per_s": 1000.0 / 3}]
    assert tt.steady_state(rates, 1)["tokens_per_s"] == pytest.approx(500.0)
    with pytest.raises(ValueError, match="warm-up"):
        tt.steady_state(recs, warmup_steps=3)


def test_read_dsft_metrics(tmp_path):
    rows = [
        {"step": 2, "split": "train", "tokens_per_s": 200.0, "mem_rss_gib": 1.5},
        {"step": 1, "split": "train", "tokens_per_s": 100.0, "mem_rss_gib": 1.0},
        {"step": 2, "split": "eval", "loss": 3.0},
        {"step": 3, "split": "train", "tokens_per_s": 300.0, "real_tokens": 600, "step_time_s": 2.0},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    records, peak = tt.read_dsft_metrics(path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[2]["tokens"] == 600 and records[2]["time_s"] == 2.0 and "time_s" not in records[0]
    assert peak == int(1.5 * 2**30)
    path.write_text(json.dumps({"step": 1, "split": "eval", "loss": 1.0}) + "\n")
    with pytest.raises(ValueError, match="log_every"):
        tt.read_dsft_metrics(path)


def test_table_has_one_row_per_run_and_the_ratio():
    base = {"size": "tiny", "method": "full", "zero": 2, "world": 2, "micro_batch": 4, "precision": "fp32"}
    rows = [
        {**base, "tool": "dsft", "tokens_per_s": 3000.0, "ratio_vs_peer": 1.5, "mfu": None, "peak_memory_bytes": 2**30},
        {
            **base,
            "tool": "peer",
            "tokens_per_s": 2000.0,
            "tokens_per_step": 1500.0,
            "mfu": 0.123,
            "peak_memory_bytes": None,
        },
        {**base, "method": "lora", "tool": "peer", "error": "peer_hf_trainer.py exited with 1\nTraceback"},
    ]
    table = tt.format_table(rows).splitlines()
    assert len(table) == 2 + 3
    assert len({line.count("|") for line in table}) == 1  # every row has every column
    assert "| n/a | 3,000 | 1.50x | N/A | 1.00 |" in table[2]
    assert "| 1,500 | 2,000 |" in table[3] and "12.3%" in table[3] and "HF Trainer + DeepSpeed" in table[3]
    assert "failed: peer_hf_trainer.py exited with 1 |" in table[4]


def test_bench_config_validation():
    with pytest.raises(ValueError, match="warm-up"):
        tt.BenchConfig(steps=2, warmup_steps=2)
    with pytest.raises(ValueError, match="--methods"):
        tt.BenchConfig(methods=("prefix",))
    with pytest.raises(ValueError, match="--size"):
        tt.BenchConfig(size="70b")
    args = tt.build_parser().parse_args(["--size", "1b", "--zero", "2", "3", "--micro-batch", "16", "--world", "1"])
    assert args.size == "1b" and args.zero == [2, 3] and args.micro_batch == 16


def test_peer_ds_config_uses_hf_auto_values():
    z2 = tt.peer_ds_config(2, "bf16")
    assert z2["bf16"]["enabled"] and not z2["fp16"]["enabled"]
    assert z2["train_micro_batch_size_per_gpu"] == "auto" and "optimizer" not in z2
    assert z2["zero_optimization"]["stage"] == 2 and z2["zero_optimization"]["overlap_comm"]
    assert tt.peer_ds_config(3, "fp32")["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]


def test_peer_script_arguments(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text("{}")
    base = ["--model", "m", "--data", "d", "--ds-config", str(ds), "--out", "o.json", "--precision", "fp32"]
    args = peer_hf_trainer.parse_args([*base, "--micro-batch", "16", "--steps", "30", "--local_rank=0"])
    assert (args.micro_batch, args.steps, args.method, args.local_rank) == (16, 30, "full", 0)
    assert args.lora_r == tt.BenchConfig().lora_r and math.isclose(args.lr, tt.BenchConfig().lr)
    with pytest.raises(SystemExit):
        peer_hf_trainer.parse_args([*base, "--micro-batch", "0", "--steps", "3"])
    with pytest.raises(SystemExit):
        peer_hf_trainer.parse_args(
            [*base[:5], str(tmp_path / "missing.json"), *base[6:], "--micro-batch", "1", "--steps", "1"]
        )


def test_profile_wrapper_passes_the_script_arguments_through():
    args = profile_step.build_parser().parse_args(
        ["--local_rank=1", "--out", "p", "--", "finetune/full.py", "a=1", "--flag"]
    )
    assert args.script == "finetune/full.py" and args.local_rank == 1
    assert [a for a in args.script_args if a != "--"] == ["a=1", "--flag"]


def test_profiler_counts_one_step_per_training_step_not_per_optimizer_call():
    import torch

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    groups = [{"params": model[0].parameters()}, {"params": model[1].parameters(), "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-3)
    steps = []
    handles = profile_step.install_step_hooks(lambda: steps.append(1))
    try:
        for _ in range(3):
            model(torch.randn(2, 4)).sum().backward()
            all_groups = opt.param_groups
            for g in all_groups:  # what DeepSpeed ZeRO-1/2 do: one inner step per parameter group
                opt.param_groups = [g]
                opt.step()
            opt.param_groups = all_groups
    finally:
        for h in handles:
            h.remove()
    assert len(steps) == 3


def test_both_tools_get_the_same_run_settings(tmp_path):
    """The dsft overrides are valid config keys and say what the peer arguments say (catches renamed keys)."""
    from finetune.config import load_config

    cfg = tt.BenchConfig(micro_batch=16, steps=30, warmup_steps=5, world=1, lora_r=4)
    assets = {"model": tmp_path / "model", "mmap": tmp_path / "train", "hf_data": tmp_path / "hf"}
    ds = tmp_path / "ds.json"
    ds.write_text("{}")
    for method in ("full", "lora"):
        dsft = load_config(None, tt.dsft_overrides(cfg, assets, method, 3, "bf16", tmp_path / "out"))
        peer = peer_hf_trainer.parse_args(tt.peer_args(cfg, assets, method, "bf16", ds, tmp_path / "peer.json"))
        assert dsft.train.micro_batch_size == peer.micro_batch == 16 and dsft.train.grad_accum == peer.grad_accum
        assert dsft.train.max_steps == peer.steps == 30 and dsft.train.lr == peer.lr
        assert dsft.precision == peer.precision == "bf16" and dsft.zero.stage == 3
        assert dsft.model.gradient_checkpointing is peer.gradient_checkpointing is False
        assert dsft.train.adam_betas == list(peer.adam_betas) and dsft.train.max_grad_norm == peer.max_grad_norm
        assert dsft.data.seq_len == tt.DataSpec().max_len and dsft.data.packing == "packed"
        assert peer.model == str(assets["model"]) == dsft.model.name_or_path
        if method == "lora":
            lora = dsft.method.lora
            assert (
                (lora.r, lora.alpha, lora.dropout) == (peer.lora_r, peer.lora_alpha, peer.lora_dropout) == (4, 16, 0.05)
            )
    dsft_mb = tt.dsft_overrides(tt.BenchConfig(micro_batch=16, dsft_micro_batch=5), assets, "full", 2, "bf16", tmp_path)
    assert "train.micro_batch_size=5" in dsft_mb


def test_profile_sync_counts_are_per_step():
    from types import SimpleNamespace as E

    events = [
        E(key="aten::_local_scalar_dense", count=26, cpu_time_total=2000.0),
        E(key="c10d::allreduce_", count=10, cpu_time_total=5000.0),
        E(key="aten::mm", count=99, cpu_time_total=1.0),
    ]
    counts = profile_step.sync_counts(events, steps=2)
    assert counts == {"host syncs (.item() / float() / .tolist())": (13.0, 1.0), "all-reduces": (5.0, 2.5)}
