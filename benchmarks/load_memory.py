"""Peak host memory per rank while dsft loads a model of ~1 GB of weights: is it at most 1.3x the weights?

A Llama of 484M parameters (TinyLlama's width, 8 layers, vocab 32000, untied embeddings) is built locally with
random weights and saved as bf16 safetensors (0.97 GB; nothing is downloaded). Each case runs
``finetune.model.load_model`` (the engine's own loading, the method applied) in fresh processes, one per rank (a gloo
group for 2 ranks), and reports each rank's peak resident memory during the load (``VmHWM`` minus the resident
memory just before it, so imports do not count; file pages of the memory-mapped safetensors count too) next to the
weights' size.

    python -m benchmarks.load_memory
    python -m benchmarks.run --only load_memory

On a GPU machine ZeRO 0-2 load onto the rank's own device (``device_map``): the host then holds only what
safetensors maps while copying; on CPU the model lives in host memory, so 1x is the floor there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from launch.process import free_port

SHAPE = dict(
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=4
)
VOCAB = 32000
TARGET = 1.3
# (method, zero stage, ranks)
CASES = [("full", 2, 1), ("lora", 2, 1), ("full", 3, 2), ("lora", 3, 2)]


def build(out: Path) -> int:
    """The bf16 model in ``out`` (built once); returns the weights' bytes on disk."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if not (out / "config.json").is_file():
        config = LlamaConfig(vocab_size=VOCAB, tie_word_embeddings=False, max_position_embeddings=2048, **SHAPE)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(out, safe_serialization=True)
        del model
    return sum(p.stat().st_size for p in out.glob("*.safetensors"))


def proc_status_kib(field: str) -> int:
    """A KiB field of /proc/self/status (VmRSS, VmHWM); long_context_memory reads it too."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(model_dir: str, method: str, stage: int, out: str) -> None:
    """One rank: load through dsft, write {rank, peak_bytes}."""
    import torch

    from finetune import distributed as dist
    from finetune.config import load_config
    from finetune.model import load_model

    dist.init()
    cfg = load_config(
        None,
        [f"model.name_or_path={model_dir}", f"method.name={method}", "precision=bf16", f"zero.stage={stage}"],
        None,
    )
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": True},
    }
    torch.set_num_threads(1)
    before = proc_status_kib("VmRSS")
    model = load_model(cfg, ds_config, "bf16", "sdpa")
    peak = proc_status_kib("VmHWM") - before
    Path(out, f"rank{dist.rank()}.json").write_text(json.dumps({"rank": dist.rank(), "peak_bytes": peak * 1024}))
    del model
    dist.destroy()


def run_case(model_dir: Path, method: str, stage: int, ranks: int) -> list[int]:
    """Peak load bytes of each rank of one case."""
    with tempfile.TemporaryDirectory() as out:
        port = str(free_port())
        procs = []
        for rank in range(ranks):
            env = {
                **os.environ,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(ranks),
                "LOCAL_WORLD_SIZE": str(ranks),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "OMP_NUM_THREADS": "1",
                "HF_HUB_OFFLINE": "1",
            }
            cmd = [sys.executable, "-m", "benchmarks.load_memory", "--child", str(model_dir), method, str(stage), out]
            procs.append(subprocess.Popen(cmd, env=env))
        for p in procs:
            if p.wait(timeout=1200) != 0:
                raise RuntimeError(f"load_memory: {method} ZeRO-{stage} x{ranks} rank failed (exit {p.returncode})")
        reports = sorted((json.loads(p.read_text()) for p in Path(out).glob("rank*.json")), key=lambda r: r["rank"])
        return [r["peak_bytes"] for r in reports]


def run(model_dir: str | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(model_dir or Path(tmp) / "model")
        weights = build(path)
        rows, data = [], []
        for method, stage, ranks in CASES:
            peaks = run_case(path, method, stage, ranks)
            worst = max(peaks) / weights
            ok = "yes" if worst <= TARGET else "**no**"
            gib = ", ".join(f"{p / 2**30:.2f}" for p in peaks)
            rows.append(f"| {method} | {stage} | {ranks} | {gib} | {worst:.2f}x | {ok} |")
            data.append({"method": method, "zero_stage": stage, "ranks": ranks, "peak_bytes": peaks, "ratio": worst})
    table = "\n".join(
        [
            f"Weights: {weights / 2**30:.2f} GiB (bf16 safetensors, {sum(1 for _ in CASES)} cases).",
            "",
            "| method | ZeRO | ranks | peak host memory per rank while loading (GiB) | worst / weights | "
            f"<= {TARGET}x |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )
    return {
        "title": "Peak host memory while loading (~1 GB model)",
        "markdown": table,
        "data": {"weights": weights, "cases": data},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=4, metavar=("MODEL", "METHOD", "STAGE", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help="where to build (or reuse) the model; default a temporary folder")
    args = parser.parse_args(argv)
    if args.child:
        model_dir, method, stage, out = args.child
        child(model_dir, method, int(stage), out)
        return 0
    print(run(args.model_dir)["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
