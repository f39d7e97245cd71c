"""Peak memory of one training step at long sequence lengths with a 152k vocabulary: plain loss vs tiled loss.

A Llama-shaped model small enough that the logits dominate (hidden 256, 2 layers, Qwen2's 152,064-token vocabulary,
untied head) runs one forward + backward on one row of 2k-16k tokens, each case in a fresh process. CPU: the peak
resident memory of the step (``VmHWM`` minus the resident memory after the model is built); GPU when present:
``torch.cuda.max_memory_allocated`` of the step. The plain loss needs about 3 x tokens x vocab x 4 bytes (logits,
log-softmax, their gradient), 19 GB at 16k, so on a machine with less memory than ``--max-gib`` allows, plain cases
past the largest that fits are predicted from the measured ones (linear in tokens) and marked so.

    python -m benchmarks.long_context_memory [--max-gib 8]
    python -m benchmarks.run --only long_context_memory
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.load_memory import proc_status_kib

VOCAB = 152_064
SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
SEQS = (2048, 4096, 8192, 16384)
BUDGET_GIB = 8.0  # the fixed budget of the "longest that fits" column


def child(seq: int, mode: str) -> dict:
    """One step in this process: ``{"peak_bytes": ...}``."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from finetune.tiled_loss import install, summed_loss

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, tie_word_embeddings=False, max_position_embeddings=seq, **SHAPE)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(device)
    model.train()
    head = install(model, mode="always" if mode == "tiled" else "never", tokens_per_micro_batch=seq)

    class Engine:  # what summed_loss needs of a DeepSpeed engine
        def __init__(self):
            self.device = device

        def __call__(self, **kw):
            return model(**kw)

    ids = torch.randint(0, VOCAB, (1, seq), device=device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = proc_status_kib("VmRSS") * 1024
    loss = summed_loss(Engine(), {"input_ids": ids, "labels": ids}, head)
    loss.backward()
    peak = (torch.cuda.max_memory_allocated() if cuda else proc_status_kib("VmHWM") * 1024) - base
    return {"peak_bytes": int(peak), "loss": float(loss) / (seq - 1)}


def _run(seq: int, mode: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.long_context_memory", "--child", str(seq), mode]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"long_context_memory {mode} seq={seq} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def run(max_gib: float | None = None) -> dict:
    import torch

    gpu = torch.cuda.is_available()
    limit = max_gib if max_gib is not None else (1e9 if gpu else 0.5 * _available_gib())
    results: dict[str, dict[int, dict]] = {"plain": {}, "tiled": {}}
    for mode in ("plain", "tiled"):
        for seq in SEQS:
            measured = [(s, r["peak_bytes"]) for s, r in results[mode].items() if not r.get("predicted")]
            if mode == "plain" and len(measured) >= 2:
                (s0, p0), (s1, p1) = measured[-2], measured[-1]
                predicted = p1 + (p1 - p0) * (seq - s1) / (s1 - s0)
                if predicted / 2**30 > limit:  # would not fit this machine: predict instead of swapping
                    results[mode][seq] = {"peak_bytes": int(predicted), "predicted": True}
                    continue
            results[mode][seq] = _run(seq, mode)
    rows = []
    for seq in SEQS:
        cells = []
        for mode in ("plain", "tiled"):
            r = results[mode][seq]
            cells.append(f"{r['peak_bytes'] / 2**30:.2f}" + (" (predicted)" if r.get("predicted") else ""))
        ratio = results["plain"][seq]["peak_bytes"] / max(1, results["tiled"][seq]["peak_bytes"])
        rows.append(f"| {seq} | {cells[0]} | {cells[1]} | {ratio:.1f}x |")
    fits = {
        mode: max((s for s in SEQS if results[mode][s]["peak_bytes"] / 2**30 <= BUDGET_GIB), default=0)
        for mode in results
    }
    where = "GPU max_memory_allocated" if gpu else "CPU peak RSS"
    table = "\n".join(
        [
            f"One forward + backward, 1 row, vocab {VOCAB}, {where} of the step (GiB).",
            "",
            "| seq_len | plain loss | tiled loss | plain / tiled |",
            "|---|---|---|---|",
            *rows,
            "",
            f"Longest of {list(SEQS)} within {BUDGET_GIB:g} GiB: plain {fits['plain'] or 'none'}, "
            f"tiled {fits['tiled'] or 'none'}.",
        ]
    )
    data = {m: {str(s): r for s, r in res.items()} for m, res in results.items()}
    return {"title": "Long-context step memory: plain vs tiled loss", "markdown": table, "data": data}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("SEQ", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--max-gib", type=float, help="predict plain cases above this (default: half of free RAM)")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1])))
        return 0
    print(run(args.max_gib)["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
