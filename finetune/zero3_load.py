"""Load a safetensors model into a ZeRO-3 partitioned model with rank 0 holding one tensor at a time.

Why by hand: transformers' ZeRO-3 path (``from_pretrained`` under ``HfDeepSpeedConfig``) reads the *whole* state dict
into rank 0's memory (``safetensors`` copies every tensor out of its memory map, and the map's pages stay resident
too) before it copies module by module: measured 2.45x the weights on rank 0 for a 0.90 GiB model
(``benchmarks/load_memory.py``), so 8 ranks of a 70B model need rank 0 to hold 280 GB. ``safetensors`` has no reader
for one tensor without the memory map, so this module reads each tensor's bytes with plain file reads from the
offsets in the file's header (the format: an 8-byte little-endian header length, a JSON header, then the data).

    model = load_partitioned(model_dir, config, dtype=torch.bfloat16, attn_implementation="sdpa")

It returns None, and the caller uses ``from_pretrained``, for anything it does not cover exactly: no local
``model.safetensors`` (or ``.index.json``) folder, or checkpoint keys that are not the model's own (a legacy prefix, a
renamed or fused weight that transformers converts while loading).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import struct
from pathlib import Path

import torch

from finetune import distributed as dist

logger = logging.getLogger(__name__)

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def safetensors_index(model_dir: str | Path) -> dict[str, tuple[Path, dict, int]] | None:
    """``{tensor name: (file, header entry, data start)}`` of a local safetensors model folder, None if it is not one."""
    root = Path(model_dir)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({root / f for f in json.loads(index.read_text())["weight_map"].values()})
    elif (root / "model.safetensors").is_file():
        files = [root / "model.safetensors"]
    else:
        return None
    out = {}
    for path in files:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, entry in header.items():
            if name != "__metadata__":
                out[name] = (path, entry, 8 + n)
    return out


def read_tensor(path: Path, entry: dict, data_start: int) -> torch.Tensor:
    """One tensor, read with ``readinto`` (no memory map: nothing stays resident after the copy)."""
    begin, end = entry["data_offsets"]
    buf = bytearray(end - begin)
    with open(path, "rb") as fh:
        fh.seek(data_start + begin)
        if fh.readinto(buf) != len(buf):
            raise OSError(f"{path}: truncated at tensor data offset {begin}")
    dtype = _DTYPES.get(entry["dtype"])
    if dtype is None:
        raise ValueError(f"{path}: tensor dtype {entry['dtype']} is not supported")
    if not buf:
        return torch.empty(entry["shape"], dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(entry["shape"])


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


@contextlib.contextmanager
def _freed_memory_returned():
    """While building under ``zero.Init``, serve allocations of 1 MiB and more with their own memory maps.

    Why: ``zero.Init`` allocates each module's full weights and frees them once partitioned. glibc raises its mmap
    threshold after such frees (up to 32 MiB), so the next modules' weights come from the heap, and the heap's freed
    holes are never returned: measured +1.2 GiB resident for a 0.45 GiB partition, against +0.6 GiB with a fixed
    threshold. The model's fill runs under it too (each gathered module is a transient full copy). Afterwards the threshold
    stays fixed at glibc's dynamic maximum (32 MiB). No-op off glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        yield
        return
    mallopt(_M_MMAP_THRESHOLD, 1 << 20)
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, 32 << 20)


def _keys(model) -> tuple[set[str], set[str]]:
    """(keys a checkpoint of ``model`` must hold, keys it may hold): tied weights are required once."""
    persistent = set(model.state_dict())
    required = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers() if n in persistent}
    return required, persistent


def load_partitioned(model_dir: str | Path, config, *, dtype, attn_implementation: str, trust_remote_code: bool):
    """Build ``config``'s model under ``zero.Init`` (an ``HfDeepSpeedConfig`` must be alive) and fill it from
    ``model_dir``'s safetensors, module by module: every rank gathers one module's parameters, rank 0 copies them
    from the file, ZeRO-3 re-partitions them. Returns None when the folder is not covered (see the module doc)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    index = safetensors_index(model_dir)
    if index is None:
        return None
    with _freed_memory_returned():
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
        )
        required, allowed = _keys(model)
        if not required <= set(index) or not set(index) <= allowed:
            logger.info("%s: checkpoint keys differ from the model's; loading through from_pretrained", model_dir)
            return None
        _fill(model, index)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    if (Path(model_dir) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_dir)
    return model


def _fill(model, index: dict) -> None:
    """Copy every checkpoint tensor into ``model``, one module's parameters gathered at a time."""
    from deepspeed import zero

    main, done = dist.rank() == 0, set()
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        params = [(dot + n, p) for n, p in module.named_parameters(recurse=False) if dot + n in index]
        params = [(n, p) for n, p in params if id(p) not in done]  # a tied weight loads once
        if params:
            with zero.GatheredParameters([p for _, p in params], modifier_rank=0), torch.no_grad():
                if main:
                    for name, p in params:
                        p.copy_(read_tensor(*index[name]))
            done.update(id(p) for _, p in params)
        for n, buf in module.named_buffers(recurse=False):
            if dot + n in index and buf is not None:  # not partitioned: every rank reads its own (they are small)
                with torch.no_grad():
                    buf.copy_(read_tensor(*index[dot + n]))
