"""Build, merge and validate DeepSpeed JSON configs: the engine's single entry point is :func:`make_ds_config`.

The engine passes what its training config says (ZeRO stage, precision, offload, the :class:`BatchPlan`); we emit
the DeepSpeed dict. A user's own JSON (or a preset) may be given too: its ``"auto"`` values are filled from the
arguments — the HF Trainer convention, so JSON files written for HF work here — and an explicit value that
contradicts an argument is an error naming the JSON key, never silently overridden either way.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ds_configs import rules
from ds_configs.batch import BatchPlan
from ds_configs.rules import OFFLOAD_DEVICES

PRECISIONS = ("bf16", "fp16", "fp32")
AUTO = "auto"

# Defaults below follow DeepSpeed's documented defaults except where a comment says why not.
# DeepSpeed's default buckets are 5e8 elements; with overlap_comm stage 1/2 holds 4.5 × (reduce + allgather)
# buckets in 16-bit (DeepSpeed docs: 9 GB at 5e8). HF's "auto" uses hidden² (1.7e7 for h=4096); without a hidden
# size we use 5e7 (0.9 GB of buffers), which still keeps NVLink/IB messages large enough to run at bandwidth.
STAGE12_BUCKET = 50_000_000
# Floor for hidden²-sized buckets: a small model (h=128 → 16k elements) would otherwise all-reduce once per
# parameter (39 collectives per step for a 4-layer model, ~15% of a CPU step in benchmarks/train_throughput's
# profile). 5e6 elements is 10 MB of 16-bit buffer; models with h ≥ 2236 are unaffected.
MIN_BUCKET = 5_000_000
STAGE3_REDUCE_BUCKET = 50_000_000
STAGE3_PREFETCH_BUCKET = 50_000_000  # DeepSpeed default 5e7
STAGE3_PERSISTENCE_THRESHOLD = 100_000  # DeepSpeed default 1e5: params smaller than this stay unpartitioned
STAGE3_MAX_LIVE = 1_000_000_000  # DeepSpeed default 1e9
STAGE3_MAX_REUSE = 1_000_000_000  # DeepSpeed default 1e9
STAGE3_SUB_GROUP = 1_000_000_000  # DeepSpeed default 1e9
# fp16 dynamic loss scaling: loss_scale 0 = dynamic; start at 2**16, double after `loss_scale_window` clean steps
# (DeepSpeed's documented defaults). On overflow ZeRO 1-3 halve after `hysteresis` overflows; ZeRO-0's fused fp16
# optimizer ignores hysteresis and halves on every one (deepspeed/runtime/fp16/fused_optimizer.py _update_scale).
FP16_SECTION = {
    "enabled": True,
    "loss_scale": 0,
    "initial_scale_power": 16,
    "loss_scale_window": 1000,
    "hysteresis": 2,
    "min_loss_scale": 1,
}
# libaio settings for NVMe offload (DeepSpeed ZeRO-Infinity tutorial values; DeepSpeed >= 0.15 reads
# "intra_op_parallelism" where older docs say "thread_count", which it now ignores).
AIO_SECTION = {
    "block_size": 1_048_576,
    "queue_depth": 8,
    "intra_op_parallelism": 1,
    "single_submit": False,
    "overlap_events": True,
}

# Compute capability per GPU family, for --gpu-arch. bf16 needs Ampere (8.0) or newer.
GPU_ARCH_CAPABILITY: dict[str, tuple[int, int]] = {
    "p100": (6, 0),
    "v100": (7, 0),
    "t4": (7, 5),
    "rtx2080": (7, 5),
    "a100": (8, 0),
    "a10": (8, 6),
    "a40": (8, 6),
    "a6000": (8, 6),
    "rtx3090": (8, 6),
    "l4": (8, 9),
    "l40": (8, 9),
    "l40s": (8, 9),
    "rtx4090": (8, 9),
    "h100": (9, 0),
    "h200": (9, 0),
    "gh200": (9, 0),
    "b200": (10, 0),
}


def comm_bucket(hidden_size: int | None, default: int) -> int:
    """ZeRO reduce/allgather bucket in elements: HF's hidden² rule with a MIN_BUCKET floor, ``default`` if unknown."""
    return max(hidden_size * hidden_size, MIN_BUCKET) if hidden_size else default


def gpu_arch_capability(arch: str) -> tuple[int, int]:
    """Compute capability of a GPU named by family (``a100``, ``v100``, ``h100`` …) or as ``8.0`` / ``sm_80``.

    Raises:
        ValueError: unknown name; the message lists the known ones.
    """
    key = arch.strip().lower().replace("-", "").replace("_", "")
    if key in GPU_ARCH_CAPABILITY:
        return GPU_ARCH_CAPABILITY[key]
    if key.startswith("sm") and key[2:].isdigit() and len(key) >= 4:
        return int(key[2:-1]), int(key[-1])
    parts = key.split(".")
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        return int(parts[0]), int(parts[1])
    raise ValueError(
        f"--gpu-arch {arch!r}: unknown; use a compute capability like 8.0 or sm_80, or one of "
        f"{', '.join(sorted(GPU_ARCH_CAPABILITY))}"
    )


def resolve_precision(precision: str = "auto", device_capability: tuple[int, int] | None = None) -> str:
    """Pick the training precision for a device.

    On a GPU, ``auto`` is bf16 from compute capability 8.0 (Ampere) on — same range as fp32, no loss scaling — and
    fp16 with dynamic loss scaling before that. ``device_capability=None`` means no CUDA device (CPU ranks):
    ``auto`` is fp32 there because bf16 matmuls on CPUs without AVX-512-BF16/AMX are emulated (slow) and lose
    precision for no memory need; an explicit ``bf16`` is allowed (DeepSpeed's CPU accelerator supports it), while
    ``fp16`` is refused because DeepSpeed's fp16 optimizer raises on CPU.

    Args:
        precision: ``auto``, ``bf16``, ``fp16`` or ``fp32``.
        device_capability: ``torch.cuda.get_device_capability()``, or None on CPU.

    Returns:
        ``bf16``, ``fp16`` or ``fp32``.

    Raises:
        ValueError: unknown precision, bf16 on a pre-Ampere GPU, or fp16 on CPU.
    """
    if precision not in (AUTO, *PRECISIONS):
        raise ValueError(f"precision={precision!r}: expected one of auto, bf16, fp16, fp32")
    if device_capability is None:
        if precision == "fp16":
            raise ValueError(
                "precision=fp16 needs a CUDA GPU (DeepSpeed's fp16 optimizer raises on CPU); use bf16 or fp32"
            )
        return "fp32" if precision == AUTO else precision
    bf16_ok = tuple(device_capability) >= (8, 0)
    if precision == AUTO:
        return "bf16" if bf16_ok else "fp16"
    if precision == "bf16" and not bf16_ok:
        major, minor = device_capability
        raise ValueError(
            f"precision=bf16 needs compute capability >= 8.0 (Ampere); this GPU is {major}.{minor}: use fp16 "
            "(with dynamic loss scaling) or auto"
        )
    return precision


def render_ds_config(
    *,
    zero_stage: int,
    batch: BatchPlan | None,
    precision: str,
    offload_optimizer: str = "none",
    offload_params: str = "none",
    nvme_path: str | None = None,
    gradient_clipping: float | str = 1.0,
    optimizer: dict | None = None,
    hidden_size: int | None = None,
) -> dict:
    """Emit the DeepSpeed dict without validation or merging; ``batch=None`` / ``precision="auto"`` write ``"auto"``.

    The template form (``"auto"`` fields) is what the presets are; :func:`make_ds_config` fills it.
    ``hidden_size``, when known, sizes the communication buckets like HF's ``"auto"`` (hidden², 0.9·hidden²,
    10·hidden), which keeps bucket buffers proportional to the model.
    """
    cfg: dict[str, Any] = {}
    if batch is None:
        cfg["train_batch_size"] = AUTO
        cfg["train_micro_batch_size_per_gpu"] = AUTO
        cfg["gradient_accumulation_steps"] = AUTO
    else:
        cfg["train_batch_size"] = batch.global_batch
        cfg["train_micro_batch_size_per_gpu"] = batch.micro_batch_size
        cfg["gradient_accumulation_steps"] = batch.grad_accum
    cfg["gradient_clipping"] = gradient_clipping
    # Log through the engine's own metrics; DeepSpeed's default prints every 10 steps.
    cfg["steps_per_print"] = 1_000_000_000
    cfg["wall_clock_breakdown"] = False
    if precision == AUTO:
        cfg["fp16"] = {**FP16_SECTION, "enabled": AUTO}
        cfg["bf16"] = {"enabled": AUTO}
    else:
        cfg["fp16"] = dict(FP16_SECTION) if precision == "fp16" else {"enabled": False}
        cfg["bf16"] = {"enabled": precision == "bf16"}
    if optimizer is not None:
        cfg["optimizer"] = copy.deepcopy(optimizer)

    zero: dict[str, Any] = {"stage": zero_stage}
    bucket = comm_bucket(hidden_size, STAGE12_BUCKET if zero_stage in (1, 2) else STAGE3_REDUCE_BUCKET)
    if zero_stage in (1, 2):
        zero.update(
            overlap_comm=True,
            contiguous_gradients=True,
            reduce_scatter=True,
            reduce_bucket_size=bucket,
            allgather_bucket_size=bucket,
        )
    elif zero_stage == 3:
        zero.update(
            overlap_comm=True,
            contiguous_gradients=True,
            reduce_bucket_size=bucket,
            stage3_prefetch_bucket_size=int(0.9 * hidden_size * hidden_size) if hidden_size else STAGE3_PREFETCH_BUCKET,
            stage3_param_persistence_threshold=10 * hidden_size if hidden_size else STAGE3_PERSISTENCE_THRESHOLD,
            stage3_max_live_parameters=STAGE3_MAX_LIVE,
            stage3_max_reuse_distance=STAGE3_MAX_REUSE,
            sub_group_size=STAGE3_SUB_GROUP,
            # Gather the full 16-bit weights when saving, so final/ is a loadable HF model, not empty shards.
            stage3_gather_16bit_weights_on_model_save=True,
        )
    path = AUTO if nvme_path is None else str(nvme_path)
    if offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    elif offload_optimizer == "nvme":
        zero["offload_optimizer"] = {
            "device": "nvme",
            "nvme_path": path,
            "pin_memory": True,
            "buffer_count": 4,
            "fast_init": False,
        }
    if offload_params == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    elif offload_params == "nvme":
        zero["offload_param"] = {
            "device": "nvme",
            "nvme_path": path,
            "pin_memory": True,
            "buffer_count": 5,
            "buffer_size": 100_000_000,
            "max_in_cpu": 1_000_000_000,
        }
    if "nvme" in (offload_optimizer, offload_params):
        cfg["aio"] = dict(AIO_SECTION)
    cfg["zero_optimization"] = zero
    return cfg


def load_user_config(user_config: dict | str | Path) -> tuple[dict, str]:
    """Read a user's DeepSpeed JSON (path or dict); returns a deep copy and a label for error messages.

    Raises:
        ValueError: the file is missing, is not JSON, or is not a JSON object.
    """
    if isinstance(user_config, dict):
        return copy.deepcopy(user_config), "ds_config"
    path = Path(user_config)
    if not path.is_file():
        raise ValueError(f"{path}: DeepSpeed config file not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a DeepSpeed config must be a JSON object, got {type(data).__name__}")
    return data, str(path)


def zero_settings_from_json(user_config: dict | str | Path) -> dict[str, Any]:
    """The explicit ZeRO choices in a user's JSON or a preset, as ``make_ds_config`` keyword arguments.

    Lets a caller default its own settings to what a chosen JSON says (e.g. ``deepspeed=presets/zero3_offload.json``
    implies ``zero_stage=3, offload_optimizer="cpu", offload_params="cpu"``) instead of contradicting it.
    ``"auto"`` and absent values are left out.
    """
    cfg, _ = load_user_config(user_config)
    found: dict[str, Any] = {}
    for key, path in (
        ("zero_stage", "zero_optimization.stage"),
        ("offload_optimizer", "zero_optimization.offload_optimizer.device"),
        ("offload_params", "zero_optimization.offload_param.device"),
        ("nvme_path", "zero_optimization.offload_optimizer.nvme_path"),
        ("nvme_path", "zero_optimization.offload_param.nvme_path"),
        ("gradient_clipping", "gradient_clipping"),
    ):
        value = _get(cfg, path)
        if value is not _MISSING and value != AUTO and key not in found:
            found[key] = value
    return found


def make_ds_config(
    *,
    zero_stage: int,
    batch: BatchPlan,
    precision: str,
    offload_optimizer: str = "none",
    offload_params: str = "none",
    nvme_path: str | None = None,
    gradient_clipping: float = 1.0,
    optimizer: dict | None = None,
    user_config: dict | str | Path | None = None,
    hidden_size: int | None = None,
    load_universal: bool = False,
) -> dict:
    """The DeepSpeed config dict for ``deepspeed.initialize(config=...)``.

    Args:
        zero_stage: 0 (plain data parallel), 1 (optimizer states partitioned), 2 (+ gradients), 3 (+ parameters).
        batch: the batch plan; the only source of the three batch fields.
        precision: ``bf16``, ``fp16`` (dynamic loss scaling) or ``fp32`` (resolve ``auto`` first with
            :func:`resolve_precision`).
        offload_optimizer: ``none``, ``cpu`` or ``nvme`` (ZeRO-Offload / ZeRO-Infinity for optimizer states).
        offload_params: ``none``, ``cpu`` or ``nvme``; needs ``zero_stage=3``.
        nvme_path: local NVMe directory for ``nvme`` offload.
        gradient_clipping: max global grad norm (0 disables).
        optimizer: a DeepSpeed ``optimizer`` section (e.g. ``{"type": "AdamW", "params": {...}}``), passed through.
        user_config: a user's JSON (path or dict); ``"auto"`` values are filled from the arguments, other keys kept.
        hidden_size: model hidden size; sizes communication buckets (optional).
        load_universal: the run resumes from a DeepSpeed universal checkpoint (another world size or ZeRO stage
            than at save; ``finetune.checkpoint.resolve_resume``): sets ``checkpoint.load_universal``, which
            DeepSpeed reads when the engine is built, so it cannot be switched on later.

    Returns:
        The validated DeepSpeed config dict (JSON-serialisable, no ``"auto"`` left).

    Raises:
        ValueError: an invalid argument, a user value contradicting an argument, or an invalid combination; the
            message names the argument or JSON key and what to change.
    """
    if zero_stage not in (0, 1, 2, 3) or isinstance(zero_stage, bool):
        raise ValueError(f"zero_stage={zero_stage!r}: expected 0, 1, 2 or 3")
    if not isinstance(batch, BatchPlan):
        raise ValueError(f"batch={batch!r}: expected a BatchPlan (use ds_configs.resolve_batch)")
    if precision not in PRECISIONS:
        raise ValueError(
            f"precision={precision!r}: expected bf16, fp16 or fp32 (resolve 'auto' with resolve_precision)"
        )
    for name, value in (("offload_optimizer", offload_optimizer), ("offload_params", offload_params)):
        if value not in OFFLOAD_DEVICES:
            raise ValueError(f"{name}={value!r}: expected none, cpu or nvme")
    if not isinstance(gradient_clipping, int | float) or gradient_clipping < 0:
        raise ValueError(f"gradient_clipping={gradient_clipping!r}: expected a number >= 0 (0 disables clipping)")
    if optimizer is not None and (not isinstance(optimizer, dict) or "type" not in optimizer):
        raise ValueError(
            f"optimizer={optimizer!r}: expected a DeepSpeed optimizer section like {{'type': 'AdamW', ...}}"
        )

    generated = render_ds_config(
        zero_stage=zero_stage,
        batch=batch,
        precision=precision,
        offload_optimizer=offload_optimizer,
        offload_params=offload_params,
        nvme_path=nvme_path,
        gradient_clipping=gradient_clipping,
        optimizer=optimizer,
        hidden_size=hidden_size,
    )
    if nvme_path is None:
        _drop_auto_nvme_path(generated)
    label = "arguments"
    if user_config is not None:
        user, label = load_user_config(user_config)
        generated = _merge_user_config(generated, user, label, optimizer_given=optimizer is not None)
    validate_ds_config(generated, source=label, world_size=batch.world_size)
    if load_universal:
        generated.setdefault("checkpoint", {})["load_universal"] = True
    return generated


def _drop_auto_nvme_path(cfg: dict) -> None:
    # In the non-template form a missing nvme_path stays missing so validation reports it by key.
    for section in ("offload_optimizer", "offload_param"):
        sec = cfg.get("zero_optimization", {}).get(section)
        if sec and sec.get("nvme_path") == AUTO:
            del sec["nvme_path"]


# Keys whose value comes from the arguments: an explicit user value must equal ours.
_ARGUMENT_KEYS = {
    "train_batch_size": "batch (train.global_batch)",
    "train_micro_batch_size_per_gpu": "batch (train.micro_batch_size)",
    "gradient_accumulation_steps": "batch (train.grad_accum)",
    "gradient_clipping": "gradient_clipping",
    "fp16.enabled": "precision",
    "bf16.enabled": "precision",
    "zero_optimization.stage": "zero_stage",
    "zero_optimization.offload_optimizer.device": "offload_optimizer",
    "zero_optimization.offload_optimizer.nvme_path": "nvme_path",
    "zero_optimization.offload_param.device": "offload_params",
    "zero_optimization.offload_param.nvme_path": "nvme_path",
}
# What an argument means when its section is absent from the generated config.
_IMPLICIT = {
    "zero_optimization.offload_optimizer.device": "none",
    "zero_optimization.offload_param.device": "none",
}


def _leaves(tree: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _leaves(value, path + ".")
        else:
            yield path, value


def _get(tree: dict, path: str) -> Any:
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _set(tree: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    node = tree
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


class _Missing:
    def __repr__(self) -> str:
        return "<not set>"


_MISSING = _Missing()


def _merge_user_config(generated: dict, user: dict, label: str, optimizer_given: bool) -> dict:
    if "bfloat16" in user:
        # DeepSpeed accepts "bfloat16" as an alias of "bf16"; one spelling keeps the contradiction checks simple.
        if "bf16" in user:
            raise ValueError(f"{label}: both 'bf16' and its alias 'bfloat16' are set; keep only 'bf16'")
        user["bf16"] = user.pop("bfloat16")
    merged = copy.deepcopy(generated)
    for path, value in _leaves(user):
        ours = _get(generated, path)
        if ours is _MISSING and path in _IMPLICIT:
            ours = _IMPLICIT[path]
        is_argument = path in _ARGUMENT_KEYS or (optimizer_given and path.startswith("optimizer."))
        if value == AUTO:
            if ours is _MISSING:
                hint = (
                    "pass nvme_path (--nvme-path / the training config's nvme path)"
                    if path.endswith("nvme_path")
                    else "write an explicit value"
                )
                raise ValueError(f'{label}: "{path}" is "auto" but dsft has no value to fill it with; {hint}')
            continue  # ours is already in `merged`
        if is_argument:
            if ours is _MISSING:
                # The caller gave no value for this key (e.g. no nvme_path, an optimizer without betas): the
                # user's explicit one stands; validate_ds_config still checks the result.
                _set(merged, path, copy.deepcopy(value))
                continue
            if not _same(value, ours):
                arg = _ARGUMENT_KEYS.get(path, "optimizer")
                raise ValueError(
                    f'{label}: "{path}" is {json.dumps(value)} but the training config gives {arg} = '
                    f'{json.dumps(ours)}; make them agree or write "auto" in the JSON to take the training '
                    "config's value"
                )
            continue
        _set(merged, path, copy.deepcopy(value))
    return merged


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) == float(b)
    return a == b


def validate_ds_config(cfg: dict, source: str = "ds_config", world_size: int | None = None) -> None:
    """Check a DeepSpeed config for combinations DeepSpeed rejects late or with an unhelpful message.

    Args:
        cfg: the config dict.
        source: where it came from (a file path or ``arguments``), for the messages.
        world_size: data-parallel ranks, to check the batch triple exactly.

    Raises:
        ValueError: naming the offending key and what to do.
    """
    for path, value in _leaves(cfg):
        if value == AUTO:
            raise ValueError(f'{source}: "{path}" is still "auto"; fill it (make_ds_config fills auto values)')
    fp16 = _get(cfg, "fp16.enabled") is True
    bf16 = _get(cfg, "bf16.enabled") is True or _get(cfg, "bfloat16.enabled") is True
    if fp16 and bf16:
        raise ValueError(f'{source}: "fp16.enabled" and "bf16.enabled" are both true; enable at most one')
    stage = _get(cfg, "zero_optimization.stage")
    stage = 0 if stage is _MISSING else stage
    if stage not in (0, 1, 2, 3):
        raise ValueError(f'{source}: "zero_optimization.stage" is {stage!r}; expected 0, 1, 2 or 3')
    opt_dev = _get(cfg, "zero_optimization.offload_optimizer.device")
    par_dev = _get(cfg, "zero_optimization.offload_param.device")
    opt_dev = "none" if opt_dev in (_MISSING, None) else opt_dev
    par_dev = "none" if par_dev in (_MISSING, None) else par_dev
    for key, dev in (("offload_optimizer", opt_dev), ("offload_param", par_dev)):
        if dev not in OFFLOAD_DEVICES:
            raise ValueError(f'{source}: "zero_optimization.{key}.device" is {dev!r}; expected none, cpu or nvme')
    nvme_paths = [_get(cfg, f"zero_optimization.{key}.nvme_path") for key in ("offload_optimizer", "offload_param")]
    violations = rules.check(
        stage,
        opt_dev,
        par_dev,
        optimizer_nvme_path=None if nvme_paths[0] is _MISSING else nvme_paths[0],
        param_nvme_path=None if nvme_paths[1] is _MISSING else nvme_paths[1],
    )
    if violations:  # the stage/offload rules, written once in ds_configs.rules, in this JSON's key names
        raise ValueError(f"{source}: {violations[0].message(rules.JSON_KEYS)}")
    clip = cfg.get("gradient_clipping", 0.0)
    if not isinstance(clip, int | float) or isinstance(clip, bool) or clip < 0:
        raise ValueError(f'{source}: "gradient_clipping" is {clip!r}; expected a number >= 0')
    total = cfg.get("train_batch_size")
    micro = cfg.get("train_micro_batch_size_per_gpu")
    accum = cfg.get("gradient_accumulation_steps")
    if all(isinstance(v, int) for v in (total, micro, accum)):
        if world_size is not None and total != micro * accum * world_size:
            raise ValueError(
                f'{source}: "train_batch_size" {total} != "train_micro_batch_size_per_gpu" {micro} × '
                f'"gradient_accumulation_steps" {accum} × world_size {world_size} = {micro * accum * world_size}; '
                "build the three from one ds_configs.BatchPlan"
            )
        if world_size is None and total % (micro * accum):
            raise ValueError(
                f'{source}: "train_batch_size" {total} is not a multiple of micro batch {micro} × accumulation {accum}'
            )


# The presets: name → (zero stage, optimizer offload, parameter offload, what it is for). The JSON files in
# ds_configs/presets/ are render_ds_config templates of these ("auto" batch, precision, clipping and nvme_path),
# written by `python -m ds_configs.generate --write-presets ds_configs/presets`; a test keeps them equal.
PRESETS: dict[str, tuple[int, str, str, str]] = {
    "zero0": (0, "none", "none", "plain data parallel; fastest when the whole model + optimizer fit on each GPU"),
    "zero1": (1, "none", "none", "optimizer states partitioned; same communication as DDP"),
    "zero2": (2, "none", "none", "optimizer states + gradients partitioned; the usual multi-GPU default"),
    "zero2_offload": (2, "cpu", "none", "ZeRO-2 with Adam on the CPU (ZeRO-Offload): big models on few GPUs"),
    "zero3": (3, "none", "none", "parameters partitioned too; models larger than one GPU across many"),
    "zero3_offload": (3, "cpu", "cpu", "ZeRO-3 with optimizer and parameters in CPU memory: largest on CPU RAM"),
    "zero3_nvme": (3, "nvme", "nvme", "ZeRO-Infinity: optimizer and parameters on local NVMe (needs libaio)"),
}
PRESET_DIR = Path(__file__).parent / "presets"


def preset_template(name: str) -> dict:
    """The preset's DeepSpeed template (``"auto"`` batch, precision, clipping, nvme_path) as the generator writes it.

    Raises:
        ValueError: unknown preset name.
    """
    if name not in PRESETS:
        raise ValueError(f"preset {name!r}: expected one of {', '.join(PRESETS)}")
    stage, opt, par, _ = PRESETS[name]
    return render_ds_config(
        zero_stage=stage,
        batch=None,
        precision=AUTO,
        offload_optimizer=opt,
        offload_params=par,
        nvme_path=None,
        gradient_clipping=AUTO,
    )


def preset_path(name: str) -> Path:
    """Path of the committed preset JSON (pass it as ``make_ds_config(user_config=...)``)."""
    if name not in PRESETS:
        raise ValueError(f"preset {name!r}: expected one of {', '.join(PRESETS)}")
    return PRESET_DIR / f"{name}.json"
