"""What the user sees of a run: ``metrics.jsonl`` rows, TensorBoard events, ``loss.png``, throughput and MFU.

Only the main rank writes; other ranks get a ``MetricsLogger(enabled=False)`` whose calls do nothing.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import torch

# Dense (no sparsity) peak per GPU in TFLOP/s, from the vendors' datasheets: (bf16/fp16 tensor cores, TF32 tensor
# cores, plain FP32). An fp32 run is measured against the TF32 peak when train's `tf32` lets matmuls use it, else
# against FP32; V100 and T4 have no bf16 or TF32 (their first number is fp16). MFU uses the 6·N·tokens/s convention
# (PaLM, Chowdhery et al. 2022 app. B): forward + backward of every parameter, attention FLOPs not counted; for PEFT
# methods the frozen base still costs ~4·N, so their MFU is an upper bound.
PEAK_TFLOPS: dict[str, tuple[float, float | None, float]] = {
    "H200": (989.0, 494.5, 66.9),
    "H100 SXM": (989.0, 494.5, 66.9),
    "H100 PCIe": (756.0, 378.0, 51.2),
    "H100 NVL": (835.0, 417.5, 60.0),
    "H100": (989.0, 494.5, 66.9),
    "A100": (312.0, 156.0, 19.5),
    "A10G": (125.0, 62.5, 31.2),
    "A10": (125.0, 62.5, 31.2),
    "L40S": (362.0, 183.0, 91.6),
    "L40": (181.0, 90.5, 90.5),
    "L4": (121.0, 60.0, 30.3),
    "RTX 4090": (165.0, 82.6, 82.6),
    "RTX 3090": (71.0, 35.6, 35.6),
    "V100": (125.0, None, 15.7),
    "T4": (65.0, None, 8.1),
}


def peak_flops(device_name: str | None, precision: str, tf32: bool = True) -> float | None:
    """Dense peak FLOP/s of the GPU called ``device_name`` (``torch.cuda.get_device_name()``) at ``precision``.

    The longest table name that appears in ``device_name`` as a whole word wins ("H100 PCIe" beats "H100", and "L4"
    does not match an "L40"). None on CPU (``device_name`` None) and for GPUs missing from :data:`PEAK_TFLOPS`.
    """
    if device_name is None:
        return None
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if re.search(rf"(?<![0-9A-Za-z]){re.escape(key)}(?![0-9A-Za-z])", device_name):
            half, tf32_peak, fp32_peak = PEAK_TFLOPS[key]
            if precision in ("bf16", "fp16"):
                return half * 1e12
            return (tf32_peak if tf32 and tf32_peak else fp32_peak) * 1e12
    return None


def peak_flops_per_gpu(precision: str = "bf16", tf32: bool = True) -> float | None:
    """:func:`peak_flops` of this rank's GPU; None on CPU."""
    if not torch.cuda.is_available():
        return None
    return peak_flops(torch.cuda.get_device_name(), precision, tf32)


def flops_per_token(trainable_matmul: int, frozen_matmul: int) -> float:
    """Training FLOPs per token, the one convention of the engine and the benchmarks: 6 per trainable weight
    (forward 2, input gradient 2, weight gradient 2) and 4 per frozen one (no weight gradient), matmul weights only
    (the input embedding is a lookup; a tied one counts once, as the LM head). Attention scores are not counted
    (PaLM, Chowdhery et al. 2022 app. B). Full fine-tuning: 6·N; LoRA: 4·N_base + 6·N_lora."""
    return 6.0 * trainable_matmul + 4.0 * frozen_matmul


def matmul_params(model) -> tuple[int, int]:
    """(trainable, frozen) counts of ``model``'s weights that do matmuls: every parameter but an untied input
    embedding; ZeRO-3 partitions and 4-bit codes counted at their full size."""
    from finetune.methods import param_numel

    emb = model.get_input_embeddings()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    lookup = emb.weight if emb is not None and (out is None or out.weight is not emb.weight) else None
    trainable = frozen = 0
    for p in model.parameters():
        if p is lookup:
            continue
        if p.requires_grad:
            trainable += param_numel(p)
        else:
            frozen += param_numel(p)
    return trainable, frozen


def mfu(flops_token: float, tokens_per_s: float, peak_per_device: float | None, devices: int) -> float | None:
    """Model FLOPs utilization: ``tokens_per_s · flops_token / (peak_per_device · devices)`` (None without a peak)."""
    if peak_per_device is None or devices < 1 or tokens_per_s <= 0:
        return None
    return tokens_per_s * flops_token / (peak_per_device * devices)


def memory_stats() -> dict:
    """Peak GPU memory of this rank in GiB (CPU: resident set size of this process)."""
    if torch.cuda.is_available():
        return {
            "mem_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
            "mem_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        }
    try:
        import resource

        return {"mem_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    except ImportError:  # not on POSIX
        return {}


# Rows reach the disk at most this many seconds late (and at every flush(): checkpoints, evaluation, the end). A flush
# per row costs a write syscall and a TensorBoard event-file flush on every step of a fast run.
FLUSH_S = 10.0


class MetricsLogger:
    """Append per-step rows to ``metrics.jsonl`` and TensorBoard; draw ``loss.png`` on demand.

    Args:
        output_dir: run directory.
        enabled: False on non-main ranks (every call is then a no-op).
        append: keep existing rows (a resumed run continues the same file).
    """

    def __init__(self, output_dir: str | Path, enabled: bool = True, append: bool = False):
        self.enabled = enabled
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / "metrics.jsonl"
        self._tb = None
        self._file = None
        self._flushed = time.monotonic()
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if not append and self.path.exists():
            self.path.unlink()
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(self.output_dir / "tensorboard"))
        self._file = self.path.open("a")

    def log(self, row: dict) -> None:
        """Write one row (must hold ``step``); numbers also go to TensorBoard as ``<split>/<key>``."""
        if not self.enabled:
            return
        row = {"time": time.time(), **row}
        self._file.write(json.dumps(row, default=float) + "\n")
        split = row.get("split", "train")
        if "source" in row:  # data rows: one per source (data/data.train/truncated, data/data.eval/truncated)
            split = f"{split}/{row['source']}"
        scalars = {}
        for k, v in row.items():
            if isinstance(v, dict):  # e.g. a mixture's source_counts {name: n}: train/source_counts/NAME
                scalars.update({f"{k}/{sub}": x for sub, x in v.items()})
            else:
                scalars[k] = v
        for k, v in scalars.items():
            if k not in ("step", "time", "split") and isinstance(v, int | float) and not isinstance(v, bool):
                if v is not None and math.isfinite(v):
                    self._tb.add_scalar(f"{split}/{k}", v, row["step"])
        if time.monotonic() - self._flushed > FLUSH_S:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows to ``metrics.jsonl`` and TensorBoard now."""
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()
        self._flushed = time.monotonic()

    def plot(self) -> Path | None:
        """Draw train and eval loss against step into ``loss.png`` (matplotlib, headless Agg backend)."""
        if not self.enabled or not self.path.exists():
            return None
        self.flush()
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        train = [(r["step"], r["loss"]) for r in rows if r.get("split") == "train" and _finite(r.get("loss"))]
        evals = [(r["step"], r["loss"]) for r in rows if r.get("split") == "eval" and _finite(r.get("loss"))]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train, strict=True), label="train", linewidth=1)
        if evals:
            ax.plot(*zip(*evals, strict=True), "o-", label="eval")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (mean per target token)")
        ax.grid(alpha=0.3)
        ax.legend()
        out = self.output_dir / "loss.png"
        fig.tight_layout()
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return out

    def close(self) -> None:
        """Flush and close ``metrics.jsonl`` and TensorBoard."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _finite(v) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)
