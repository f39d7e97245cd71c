"""Training throughput: a dsft recipe against ``transformers.Trainer`` + DeepSpeed, same model, data and batch.

    python -m benchmarks.train_throughput --size tiny --methods full lora --zero 2 --world 2 --micro-batch 4 --steps 6
    python -m benchmarks.train_throughput --size 1b --methods full lora --zero 2 3 --world 1 --micro-batch 16 \\
        --steps 30 --warmup-steps 5          # on the GPU machine

Both tools train the same random Llama (``--size tiny``: CPU-sized; ``--size 1b``: TinyLlama-1.1B shape) on the same
synthetic SFT set (lognormal lengths, median 256, max 1024, fixed seed; a prompt part without loss and a response
part with loss), at the same micro batch, precision, ZeRO stage and number of ranks, each started by the real
``deepspeed`` launcher:

- dsft: ``finetune/full.py`` / ``finetune/lora.py`` on the mmap copy of the data (``IndexedDatasetBuilder`` +
  ``_loss_mask`` + meta), packed rows of ``seq_len`` 1024 without cross-sample attention (the engine's default).
  Numbers come from its own ``metrics.jsonl``.
- peer: ``benchmarks/peer_hf_trainer.py`` on a ``datasets.Dataset`` of the same samples, one sample per row, padded
  to the longest sample of the batch by ``DataCollatorForSeq2Seq``. Numbers come from its ``TrainerCallback``.

Reported: real (non-pad) tokens/s over the steady state (the first ``--warmup-steps`` steps are dropped), the ratio
dsft/peer, MFU and peak memory. MFU convention: FLOPs per real token = 6·N for full fine-tuning and 4·N_base + 6·N_lora
for LoRA (forward 2 and input-gradient 2 FLOPs per weight, weight gradients 2 more only where weights train), where N
excludes the input embedding table (a lookup, no FLOPs) and attention-score FLOPs are not counted (PaLM appendix B
convention without its attention term); peak = dense bf16/fp16 tensor-core FLOP/s of the GPU from
``finetune.metrics.PEAK_TFLOPS``, so MFU is N/A on CPU. Peak memory is rank 0's ``torch.cuda.max_memory_allocated``
on a GPU and rank 0's peak RSS on CPU (which includes the Python/torch runtime, ~0.5 GiB, so small CPU models read
as equal).

``--profile`` runs each launch under ``benchmarks/profile_step.py`` and writes a torch.profiler table of the top ops
of a few steady-state steps next to the results, for when a target is missed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from launch.process import free_port as _free_port
from launch.process import run_logged

REPO = Path(__file__).resolve().parent.parent
PEER_SCRIPT = REPO / "benchmarks" / "peer_hf_trainer.py"
PROFILE_SCRIPT = REPO / "benchmarks" / "profile_step.py"
RECIPES = {"full": REPO / "finetune" / "full.py", "lora": REPO / "finetune" / "lora.py"}
DEFAULT_OUT = REPO / "bench_out" / "train_throughput"


@dataclass(frozen=True)
class ModelShape:
    """A Llama shape; ``vocab_size=None`` takes the tokenizer's length."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int | None = None


SHAPES = {
    # Small enough that a step of 4 packed rows x 1024 tokens per rank takes a few seconds on a shared CPU core.
    "tiny": ModelShape(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=344),
    # TinyLlama-1.1B (hidden 2048, 22 layers, 32 heads, 4 kv heads, MLP 5632, vocab 32000): 1.1e9 parameters.
    "1b": ModelShape(
        hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4, intermediate_size=5632, vocab_size=32000
    ),
}


@dataclass(frozen=True)
class DataSpec:
    """Synthetic SFT lengths: lognormal(ln(median), sigma) clipped to [min_len, max_len].

    sigma 0.7 makes the mean ~1.28x the median and the longest of 16 samples ~3.4x the median, so a batch of 16
    padded to its longest sample is ~60% padding: the "~2/3 pad" of real SFT sets (ARCHITECTURE / DESIGN brief).
    """

    num_samples: int = 2000
    median: float = 256.0
    sigma: float = 0.7
    max_len: int = 1024
    min_len: int = 8
    seed: int = 1234


@dataclass
class BenchConfig:
    """One benchmark invocation (``--size ... --methods ... --zero ...``); validated in ``__post_init__``."""

    size: str = "tiny"
    methods: tuple[str, ...] = ("full", "lora")
    zero: tuple[int, ...] = (2,)
    world: int = 2
    micro_batch: int = 4
    dsft_micro_batch: int | None = None
    steps: int = 10
    warmup_steps: int = 2
    precision: str = "auto"
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lr: float = 2e-5
    gradient_checkpointing: bool = False
    tools: tuple[str, ...] = ("dsft", "peer")
    out: str = str(DEFAULT_OUT)
    profile: bool = False
    timeout_s: int = 1800

    def __post_init__(self):
        if self.size not in SHAPES:
            raise ValueError(f"--size {self.size}: expected one of {', '.join(SHAPES)}")
        bad = [m for m in self.methods if m not in RECIPES]
        if bad or not self.methods:
            raise ValueError(f"--methods {' '.join(self.methods)}: expected some of {', '.join(RECIPES)}")
        if not self.zero or any(z not in (0, 1, 2, 3) for z in self.zero):
            raise ValueError(f"--zero {' '.join(map(str, self.zero))}: stages are 0-3")
        if self.world < 1 or self.micro_batch < 1 or (self.dsft_micro_batch is not None and self.dsft_micro_batch < 1):
            raise ValueError(
                f"--world {self.world}, --micro-batch {self.micro_batch} and --dsft-micro-batch "
                f"{self.dsft_micro_batch} must be >= 1"
            )
        if self.warmup_steps < 0 or self.steps <= self.warmup_steps:
            raise ValueError(
                f"--steps {self.steps} must exceed --warmup-steps {self.warmup_steps} (the warm-up steps are not timed)"
            )
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"--precision {self.precision}: expected auto, bf16, fp16 or fp32")
        if not self.tools or any(t not in ("dsft", "peer") for t in self.tools):
            raise ValueError(f"--tools {' '.join(self.tools)}: expected dsft and/or peer")


# ----------------------------------------------------------------------------------------------- data and model
def sample_lengths(spec: DataSpec, rng: np.random.Generator) -> np.ndarray:
    """``spec.num_samples`` sample lengths (int64) drawn lognormal and clipped to ``[min_len, max_len]``."""
    raw = rng.lognormal(mean=math.log(spec.median), sigma=spec.sigma, size=spec.num_samples)
    return np.clip(np.rint(raw), spec.min_len, spec.max_len).astype(np.int64)


def make_samples(spec: DataSpec, token_low: int, token_high: int, eos_id: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Synthetic SFT samples: ``(ids, loss_mask)`` pairs, deterministic in ``spec.seed``.

    Each sample is a prompt (10-50% of its tokens, loss mask 0) then a response ending in ``eos_id`` (mask 1). Ids
    are uniform in ``[token_low, token_high)``: the content does not matter for speed, only the lengths do.
    """
    if not 0 <= token_low < token_high:
        raise ValueError(f"make_samples: token range [{token_low}, {token_high}) is empty")
    rng = np.random.default_rng(spec.seed)
    lengths = sample_lengths(spec, rng)
    samples = []
    for n in lengths:
        ids = rng.integers(token_low, token_high, size=int(n), dtype=np.int64)
        ids[-1] = eos_id
        prompt = min(int(n) - 1, max(1, int(n * rng.uniform(0.1, 0.5))))
        mask = np.ones(int(n), dtype=np.uint8)
        mask[:prompt] = 0
        samples.append((ids, mask))
    return samples


def write_mmap(prefix: str | Path, samples: list[tuple[np.ndarray, np.ndarray]], tokenizer) -> Path:
    """Write ``samples`` as a dsft SFT dataset: ``prefix.bin/.idx``, ``prefix_loss_mask.bin/.idx`` and the meta file
    (with the tokenizer fingerprint the engine checks)."""
    from data_tools import indexed
    from data_tools.indexed import LOSS_MASK_SUFFIX
    from data_tools.meta import META_VERSION, tokenizer_fingerprint, write_meta

    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    dtype = indexed.token_dtype_for_vocab(len(tokenizer))
    tokens = indexed.IndexedDatasetBuilder(prefix, dtype)
    masks = indexed.IndexedDatasetBuilder(f"{prefix}{LOSS_MASK_SUFFIX}", np.uint8)
    for ids, mask in samples:
        tokens.add_document(ids.astype(dtype))
        masks.add_document(mask)
    tokens.finalize()
    masks.finalize()
    n_tokens = int(sum(len(ids) for ids, _ in samples))
    write_meta(
        prefix,
        {
            "dsft_meta_version": META_VERSION,
            "format": "synthetic-sft (benchmarks.train_throughput)",
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "vocab_size": len(tokenizer),
            "dtype": np.dtype(dtype).name,
            "has_loss_mask": True,
            "counts": {
                "documents": len(samples),
                "tokens": n_tokens,
                "masked_tokens": int(sum(int(m.sum()) for _, m in samples)),
                "truncated": 0,
                "skipped": 0,
            },
        },
    )
    return prefix


def write_hf_dataset(out_dir: str | Path, samples: list[tuple[np.ndarray, np.ndarray]]) -> Path:
    """The same samples as a ``datasets.Dataset`` (``input_ids``, ``attention_mask``, ``labels`` with -100 where the
    loss mask is 0) saved with ``save_to_disk``: what an HF Trainer user tokenizes their data into."""
    from datasets import Dataset

    data = {
        "input_ids": [ids.tolist() for ids, _ in samples],
        "attention_mask": [[1] * len(ids) for ids, _ in samples],
        "labels": [np.where(mask.astype(bool), ids, -100).tolist() for ids, mask in samples],
    }
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    Dataset.from_dict(data).save_to_disk(str(out_dir))
    return out_dir


def llama_config(shape: ModelShape, tokenizer):
    """The ``LlamaConfig`` of ``shape`` (vocabulary at least the tokenizer's, untied head like TinyLlama)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=max(shape.vocab_size or 0, len(tokenizer)),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )


def prepare_assets(size: str, root: str | Path, spec: DataSpec = DataSpec()) -> dict[str, Path]:
    """Tokenizer, random model, mmap data and HF dataset for ``size`` under ``root/size``; reused when the recorded
    shape and data spec match (building the 1.1B model takes a minute and 2.2 GB)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.tiny import train_tokenizer

    shape = SHAPES[size]
    base = Path(root) / size
    paths = {"model": base / "model", "mmap": base / "data" / "train", "hf_data": base / "data" / "hf_train"}
    stamp = base / "assets.json"
    want = {"shape": dataclasses.asdict(shape), "data": dataclasses.asdict(spec), "version": 1}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return paths
    if base.exists():
        shutil.rmtree(base)
    tok_dir = base / "tokenizer"
    train_tokenizer(tok_dir)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    config = llama_config(shape, tokenizer)
    torch.manual_seed(0)
    # bf16 on disk halves the 1.1B checkpoint; both tools load it in their training dtype anyway.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if size != "tiny" else torch.float32)
    model.save_pretrained(paths["model"], safe_serialization=True)
    tokenizer.save_pretrained(paths["model"])
    del model
    specials = {tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens}
    samples = make_samples(spec, token_low=max(specials) + 1, token_high=len(tokenizer), eos_id=tokenizer.eos_token_id)
    write_mmap(paths["mmap"], samples, tokenizer)
    write_hf_dataset(paths["hf_data"], samples)
    stamp.write_text(json.dumps(want, indent=2))
    return paths


# ------------------------------------------------------------------------------------------------ FLOPs and MFU
def count_params(shape: ModelShape, vocab_size: int, method: str, lora_r: int = 8) -> dict[str, int]:
    """Parameter counts of ``shape`` built on the meta device (nothing allocated), with PEFT LoRA on all linears.

    Returns:
        ``total`` (all weights incl. LoRA), ``embedding`` (input table), ``base_matmul`` (frozen or trained base
        weights that do FLOPs: everything but the input embedding), ``lora`` (adapter weights; 0 for full).
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        tie_word_embeddings=False,
    )
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    embedding = model.get_input_embeddings().weight.numel()
    base = sum(p.numel() for p in model.parameters())
    lora = 0
    if method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        with init_empty_weights():
            peft_model = get_peft_model(
                model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=lora_r, target_modules="all-linear", bias="none")
            )
        lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    return {"total": base + lora, "embedding": embedding, "base_matmul": base - embedding, "lora": lora}


def flops_per_token(params: dict[str, int], method: str) -> float:
    """Training FLOPs per real token (see the module docstring for the convention).

    Full: 6·N (forward 2, backward 4 per weight). LoRA: 4·N_base + 6·N_lora (the frozen base skips its weight
    gradients, 2 FLOPs per weight), N_base excluding the input embedding.
    """
    from finetune.metrics import flops_per_token as fpt

    if method == "full":
        return fpt(trainable_matmul=params["base_matmul"], frozen_matmul=0)
    if method == "lora":
        return fpt(trainable_matmul=params["lora"], frozen_matmul=params["base_matmul"])
    raise ValueError(f"flops_per_token: method={method!r}, expected full or lora")


def peak_flops(device_name: str | None, precision: str, tf32: bool = True) -> float | None:
    """Dense peak FLOP/s of one device at ``precision``: ``finetune.metrics.peak_flops`` (one table, one lookup)."""
    from finetune.metrics import peak_flops as lookup

    return lookup(device_name, precision, tf32)


def mfu(tokens_per_s: float, flops_token: float, peak_per_device: float | None, devices: int) -> float | None:
    """Model FLOPs utilization: ``finetune.metrics.mfu`` (one formula for the engine and the benchmarks)."""
    from finetune.metrics import mfu as utilization

    return utilization(flops_token, tokens_per_s, peak_per_device, devices)


# ---------------------------------------------------------------------------------------------- reading results
def steady_state(records: list[dict], warmup_steps: int) -> dict:
    """Real tokens/s over the records after the first ``warmup_steps`` steps.

    Each record has ``time_s`` (wall seconds of the step) and ``tokens`` (real tokens of all ranks), or only
    ``tokens_per_s``. With both counts the rate is sum(tokens) / sum(time). With rates only it is their harmonic
    mean, which equals that ratio when every step carries the same number of tokens (packed rows are ~97% full).
    """
    steady = records[warmup_steps:]
    if not steady:
        raise ValueError(f"steady_state: {len(records)} steps recorded, all inside the {warmup_steps} warm-up steps")
    if all("time_s" in r and "tokens" in r for r in steady):
        seconds = sum(r["time_s"] for r in steady)
        tokens = sum(r["tokens"] for r in steady)
        return {"tokens_per_s": tokens / seconds, "tokens_per_step": tokens / len(steady), "steps": len(steady)}
    rates = [r["tokens_per_s"] for r in steady]
    if any(not rate or rate <= 0 for rate in rates):
        raise ValueError(f"steady_state: non-positive tokens_per_s in {rates}")
    return {"tokens_per_s": len(rates) / sum(1.0 / r for r in rates), "tokens_per_step": None, "steps": len(rates)}


def read_dsft_metrics(path: str | Path) -> tuple[list[dict], int | None]:
    """Train rows of a dsft ``metrics.jsonl`` as step records, and rank 0's peak memory in bytes.

    Uses ``real_tokens`` / ``step_time_s`` when the engine logs them, else its ``tokens_per_s``.
    """
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    train = sorted(
        (r for r in rows if r.get("split", "train") == "train" and "tokens_per_s" in r), key=lambda r: r["step"]
    )
    if not train:
        raise ValueError(f"{path}: no train rows with tokens_per_s; did the run log every step (train.log_every=1)?")
    records = []
    for r in train:
        rec = {"step": r["step"], "tokens_per_s": r["tokens_per_s"]}
        if "real_tokens" in r and "step_time_s" in r:
            rec.update(tokens=r["real_tokens"], time_s=r["step_time_s"])
        records.append(rec)
    mem_gib = [r.get("mem_allocated_gib", r.get("mem_rss_gib")) for r in train]
    mem_gib = [m for m in mem_gib if m is not None]
    return records, int(max(mem_gib) * 2**30) if mem_gib else None


# ------------------------------------------------------------------------------------------------------ running
def resolve_precision(precision: str) -> str:
    """``auto`` -> bf16 on a GPU, fp32 on CPU (bf16 matmuls are emulated on most CPUs); the same for both tools."""
    import torch

    if precision != "auto":
        return precision
    return "bf16" if torch.cuda.is_available() else "fp32"


def peer_ds_config(zero_stage: int, precision: str) -> dict:
    """The ZeRO config an HF user copies from the Trainer DeepSpeed docs: ``auto`` values filled by the Trainer, no
    optimizer section (the Trainer's default AdamW is used), the docs' bucket sizes."""
    zero: dict = {"stage": zero_stage}
    if zero_stage in (1, 2):
        zero.update(
            allgather_partitions=True,
            allgather_bucket_size=2e8,
            overlap_comm=True,
            reduce_scatter=True,
            reduce_bucket_size=2e8,
            contiguous_gradients=True,
        )
    elif zero_stage == 3:
        zero.update(
            overlap_comm=True,
            contiguous_gradients=True,
            reduce_bucket_size="auto",
            stage3_prefetch_bucket_size="auto",
            stage3_param_persistence_threshold="auto",
            stage3_gather_16bit_weights_on_model_save=True,
        )
    return {
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_optimization": zero,
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
    }


def launcher_env(world: int) -> dict[str, str]:
    """Environment of the launched ranks: offline, and on CPU one OpenMP pool per rank sized to share the cores."""
    import torch

    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    if not torch.cuda.is_available():
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // world))
    return env


def launch(
    script: Path,
    args: list[str],
    world: int,
    log: Path,
    timeout_s: int,
    profile_dir: Path | None = None,
    profile_steps: tuple[int, int] = (2, 3),
) -> None:
    """Run ``deepspeed --num_gpus world script args``; raise with the log's tail when it fails.

    With ``profile_dir`` the script runs under ``profile_step.py``, which skips ``profile_steps[0]`` optimizer steps
    and records ``profile_steps[1]`` (after one profiler warm-up step).
    """
    from launch.run import find_deepspeed

    cmd = [find_deepspeed(), "--num_gpus", str(world), "--master_port", str(_free_port())]
    if profile_dir is not None:
        wait, active = profile_steps
        cmd += [str(PROFILE_SCRIPT), f"--out={profile_dir}", f"--wait={wait}", f"--active={active}"]
        cmd += ["--", str(script), *args]
    else:
        cmd += [str(script), *args]
    run_logged(cmd, log, script.name, env=launcher_env(world), timeout=timeout_s)


def dsft_overrides(cfg: BenchConfig, assets: dict, method: str, zero: int, precision: str, out: Path) -> list[str]:
    """The ``key=value`` overrides of the dsft recipe run (its YAML defaults are overridden where they differ from
    the peer's setup: no gradient checkpointing, no warm-up or weight decay, one micro-batch per step)."""
    overrides = [
        f"model.name_or_path={assets['model']}",
        f"model.gradient_checkpointing={str(cfg.gradient_checkpointing).lower()}",
        f"data.train={assets['mmap']}",
        "data.seq_len=1024",
        "data.packing=packed",
        f"output_dir={out}",
        f"precision={precision}",
        f"zero.stage={zero}",
        f"train.max_steps={cfg.steps}",
        f"train.micro_batch_size={cfg.dsft_micro_batch or cfg.micro_batch}",
        "train.grad_accum=1",
        f"train.lr={cfg.lr}",
        "train.warmup=0",
        "train.weight_decay=0.0",
        "train.log_every=1",
        "train.save_every=0",
        "train.resume=never",
    ]
    if method == "lora":
        overrides += [
            f"method.lora.r={cfg.lora_r}",
            f"method.lora.alpha={cfg.lora_alpha}",
            f"method.lora.dropout={cfg.lora_dropout}",
            "method.lora.target_modules=all-linear",
        ]
    return overrides


def run_dsft(cfg: BenchConfig, assets: dict, method: str, zero: int, precision: str, run_dir: Path) -> dict:
    """Train with the dsft recipe of ``method``; return its step records and peak memory from ``metrics.jsonl``."""
    out = run_dir / "dsft"
    if out.exists():
        shutil.rmtree(out)  # never resume an earlier benchmark run
    overrides = dsft_overrides(cfg, assets, method, zero, precision, out)
    prof = run_dir / "profile_dsft" if cfg.profile else None
    launch(RECIPES[method], overrides, cfg.world, run_dir / "dsft.log", cfg.timeout_s, prof, _profile_steps(cfg))
    records, peak = read_dsft_metrics(out / "metrics.jsonl")
    return {"records": records, "peak_memory_bytes": peak}


def peer_args(cfg: BenchConfig, assets: dict, method: str, precision: str, ds_path: Path, result: Path) -> list[str]:
    """Arguments of ``peer_hf_trainer.py``: the same model, samples, micro batch, precision and LoRA shape."""
    args = [
        f"--model={assets['model']}",
        f"--data={assets['hf_data']}",
        f"--ds-config={ds_path}",
        f"--out={result}",
        f"--micro-batch={cfg.micro_batch}",
        f"--steps={cfg.steps}",
        f"--precision={precision}",
        f"--method={method}",
        f"--lora-r={cfg.lora_r}",
        f"--lora-alpha={cfg.lora_alpha}",
        f"--lora-dropout={cfg.lora_dropout}",
        f"--lr={cfg.lr}",
    ]
    if cfg.gradient_checkpointing:
        args.append("--gradient-checkpointing")
    return args


def run_peer(cfg: BenchConfig, assets: dict, method: str, zero: int, precision: str, run_dir: Path) -> dict:
    """Train with ``peer_hf_trainer.py``; return its step records and peak memory."""
    ds_path = run_dir / "peer_ds_config.json"
    ds_path.write_text(json.dumps(peer_ds_config(zero, precision), indent=2))
    result = run_dir / "peer.json"
    result.unlink(missing_ok=True)
    args = peer_args(cfg, assets, method, precision, ds_path, result)
    prof = run_dir / "profile_peer" if cfg.profile else None
    launch(PEER_SCRIPT, args, cfg.world, run_dir / "peer.log", cfg.timeout_s, prof, _profile_steps(cfg))
    data = json.loads(result.read_text())
    return {"records": data["records"], "peak_memory_bytes": data["peak_memory_bytes"]}


def _profile_steps(cfg: BenchConfig) -> tuple[int, int]:
    """Profile the steady state: skip the warm-up steps, one profiler warm-up step, record the rest but the last."""
    return cfg.warmup_steps, max(1, cfg.steps - cfg.warmup_steps - 2)


def device_name() -> str | None:
    """CUDA device name, None on CPU."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def benchmark(cfg: BenchConfig) -> list[dict]:
    """Run every (method, ZeRO stage, tool) of ``cfg``; one result dict per run (``error`` set when it failed)."""
    import torch
    from transformers import AutoTokenizer

    precision = resolve_precision(cfg.precision)
    assets = prepare_assets(cfg.size, cfg.out)
    vocab = AutoTokenizer.from_pretrained(assets["model"]).__len__()
    shape = SHAPES[cfg.size]
    vocab = max(shape.vocab_size or 0, vocab)
    name = device_name()
    peak = peak_flops(name, precision)
    devices = cfg.world if torch.cuda.is_available() else 0
    results = []
    for method in cfg.methods:
        params = count_params(shape, vocab, method, cfg.lora_r)
        fpt = flops_per_token(params, method)
        for zero in cfg.zero:
            run_dir = Path(cfg.out) / cfg.size / "runs" / f"{method}_zero{zero}_w{cfg.world}_mb{cfg.micro_batch}"
            run_dir.mkdir(parents=True, exist_ok=True)
            for tool in cfg.tools:
                row = {
                    "size": cfg.size,
                    "method": method,
                    "zero": zero,
                    "tool": tool,
                    "world": cfg.world,
                    "micro_batch": (cfg.dsft_micro_batch or cfg.micro_batch) if tool == "dsft" else cfg.micro_batch,
                    "precision": precision,
                    "steps": cfg.steps,
                    "warmup_steps": cfg.warmup_steps,
                    "params": params,
                    "flops_per_token": fpt,
                }
                t0 = time.perf_counter()
                try:
                    runner = run_dsft if tool == "dsft" else run_peer
                    got = runner(cfg, assets, method, zero, precision, run_dir)
                    ss = steady_state(got["records"], cfg.warmup_steps)
                    row.update(ss, peak_memory_bytes=got["peak_memory_bytes"], records=got["records"])
                    row["mfu"] = mfu(ss["tokens_per_s"], fpt, peak, devices)
                except (RuntimeError, ValueError, OSError, KeyError) as e:
                    row["error"] = str(e)
                row["wall_s"] = time.perf_counter() - t0
                print(_progress_line(row), flush=True)
                results.append(row)
    for row in results:
        if row["tool"] == "dsft":
            peer = next((r for r in results if r["tool"] == "peer" and _same_config(r, row)), None)
            if peer and "tokens_per_s" in peer and "tokens_per_s" in row:
                row["ratio_vs_peer"] = row["tokens_per_s"] / peer["tokens_per_s"]
    return results


def _same_config(a: dict, b: dict) -> bool:
    return all(a[k] == b[k] for k in ("size", "method", "zero", "world"))


def _progress_line(row: dict) -> str:
    what = f"[train_throughput] {row['size']} {row['method']} zero{row['zero']} {row['tool']}"
    if "error" in row:
        return f"{what}: FAILED ({row['wall_s']:.0f} s): {row['error'].splitlines()[0]}"
    return f"{what}: {row['tokens_per_s']:,.0f} real tokens/s ({row['wall_s']:.0f} s wall)"


# ------------------------------------------------------------------------------------------------------- report
def _fmt_mem(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f}"


def format_table(results: list[dict]) -> str:
    """Markdown table of ``benchmark`` results, dsft and peer side by side per configuration."""
    lines = [
        "| size | method | ZeRO | ranks | micro batch | precision | tool | real tokens/step | real tokens/s "
        "| dsft / peer | MFU | peak mem GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        tool = "dsft" if r["tool"] == "dsft" else "HF Trainer + DeepSpeed"
        head = f"| {r['size']} | {r['method']} | {r['zero']} | {r['world']} | {r['micro_batch']} | {r['precision']} | {tool} "
        if "error" in r:
            lines.append(head + f"| failed: {r['error'].splitlines()[0][:80]} | | | | |")
            continue
        ratio = f"{r['ratio_vs_peer']:.2f}x" if r.get("ratio_vs_peer") else ""
        m = "N/A" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        per_step = "n/a" if r.get("tokens_per_step") is None else f"{r['tokens_per_step']:,.0f}"
        mem = _fmt_mem(r.get("peak_memory_bytes"))
        lines.append(head + f"| {per_step} | {r['tokens_per_s']:,.0f} | {ratio} | {m} | {mem} |")
    return "\n".join(lines)


def describe_run(cfg: BenchConfig) -> str:
    """One paragraph under the table: the command, the machine, the conventions."""
    import torch

    machine = device_name() or f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    methods, zero = " ".join(cfg.methods), " ".join(map(str, cfg.zero))
    cmd = (
        f"python -m benchmarks.train_throughput --size {cfg.size} --methods {methods} --zero {zero} "
        f"--world {cfg.world} --micro-batch {cfg.micro_batch} --steps {cfg.steps} --warmup-steps {cfg.warmup_steps}"
    )
    if cfg.dsft_micro_batch:
        cmd += f" --dsft-micro-batch {cfg.dsft_micro_batch}"
    mem = "torch.cuda.max_memory_allocated" if torch.cuda.is_available() else "peak RSS"
    return (
        f"`{cmd}` on {machine}, torch {torch.__version__}, {datetime.date.today().isoformat()}. Steady state: steps "
        f"{cfg.warmup_steps + 1}-{cfg.steps}. Real tokens = non-pad tokens of all ranks. MFU: 6·N (full), "
        "4·N_base + 6·N_lora (LoRA), N without the input embedding, attention FLOPs not counted; N/A on CPU. "
        f"Peak memory: rank 0, {mem}."
    )


def run() -> dict:
    """``make bench`` entry: the CPU-feasible subset (tiny model, full + LoRA, ZeRO-2, 2 ranks); GPU: same on 1b."""
    import torch

    if torch.cuda.is_available():
        cfg = BenchConfig(size="1b", world=1, micro_batch=16, steps=30, warmup_steps=5)
    else:
        cfg = BenchConfig()
    results = benchmark(cfg)
    return {
        "title": f"Training throughput: dsft vs HF Trainer + DeepSpeed ({cfg.size})",
        "markdown": format_table(results) + "\n\n" + describe_run(cfg),
        "data": {"config": dataclasses.asdict(cfg), "results": results},
    }


def build_parser() -> argparse.ArgumentParser:
    """The CLI (``python -m benchmarks.train_throughput --help``)."""
    d = BenchConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=tuple(SHAPES), default=d.size)
    p.add_argument("--methods", nargs="+", choices=tuple(RECIPES), default=list(d.methods))
    p.add_argument("--zero", nargs="+", type=int, choices=(0, 1, 2, 3), default=list(d.zero))
    p.add_argument("--world", type=int, default=d.world, help="ranks (GPUs, or CPU processes)")
    p.add_argument("--micro-batch", type=int, default=d.micro_batch, help="rows per rank per step, both tools")
    p.add_argument(
        "--dsft-micro-batch",
        type=int,
        default=None,
        help="dsft rows per rank per step if not --micro-batch; e.g. 5 packed rows of 1024 tokens carry about the "
        "samples of 16 padded peer rows (median 256), for a comparison at equal samples per step",
    )
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps per run, warm-up included")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="first steps left out of the timing")
    p.add_argument("--precision", default=d.precision, choices=("auto", "bf16", "fp16", "fp32"))
    p.add_argument("--lora-r", type=int, default=d.lora_r)
    p.add_argument("--gradient-checkpointing", action="store_true", help="for both tools")
    p.add_argument("--tools", nargs="+", choices=("dsft", "peer"), default=list(d.tools))
    p.add_argument("--out", default=d.out, help="work folder: assets, run logs, results.json, results.md")
    p.add_argument("--profile", action="store_true", help="write a torch.profiler top-ops table per run")
    p.add_argument("--timeout-s", type=int, default=d.timeout_s, help="per launch")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = BenchConfig(
            size=args.size,
            methods=tuple(args.methods),
            zero=tuple(args.zero),
            world=args.world,
            micro_batch=args.micro_batch,
            dsft_micro_batch=args.dsft_micro_batch,
            steps=args.steps,
            warmup_steps=args.warmup_steps,
            precision=args.precision,
            lora_r=args.lora_r,
            gradient_checkpointing=args.gradient_checkpointing,
            tools=tuple(args.tools),
            out=args.out,
            profile=args.profile,
            timeout_s=args.timeout_s,
        )
    except ValueError as e:
        print(f"benchmarks.train_throughput: {e}", file=sys.stderr)
        return 2
    results = benchmark(cfg)
    md = format_table(results) + "\n\n" + describe_run(cfg)
    print("\n" + md)
    out = Path(cfg.out)
    (out / f"results_{cfg.size}.json").write_text(
        json.dumps({"config": dataclasses.asdict(cfg), "results": results}, indent=2)
    )
    (out / f"results_{cfg.size}.md").write_text(md + "\n")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
