"""The training configuration: one typed dataclass tree, loaded from YAML, overridden by ``key=value`` arguments.

Every value lives in exactly one place. ``load_config`` builds the tree (unknown keys and wrong types fail with the
dotted key named), and ``Config.validate`` is the ONE place where cross-field rules live; it runs before any process
group or model exists, so a bad config fails in seconds, not after a 40-second launch.

    cfg = load_config("finetune/configs/lora.yaml", ["train.lr=1e-4", "zero.stage=3"])
    plan = cfg.validate(world_size=2)          # -> ds_configs.batch.BatchPlan
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ds_configs import rules
from ds_configs.memory import TILED_LOSS_MODES
from finetune.methods import registry
from finetune.methods.lora import LoraMethodConfig  # noqa: F401  (re-exported: the sections live with their method)
from finetune.methods.prefix import PrefixMethodConfig  # noqa: F401
from finetune.methods.prompt import PromptMethodConfig  # noqa: F401
from finetune.methods.qlora import QLoraMethodConfig  # noqa: F401

# The attention kernels finetune.attention.resolve_attention knows (dsft_varlen is dsft's varlen_attn kernel).
ATTENTION_CHOICES = ("auto", "sdpa", "eager", "flex_attention", "flash_attention_2", "dsft_varlen")


class ConfigError(ValueError):
    """A configuration problem; the message names the dotted key and says what to do."""


# A dataclass field carrying ``help`` (shown by ``describe``) and optional ``choices`` (checked on load); the method
# modules' sections are made with the same helper.
_f = registry.option


@dataclass
class ModelConfig:
    name_or_path: str = _f("", "Hugging Face hub id or local directory of the base model (from_pretrained).")
    dtype: str = _f(
        "auto",
        "Dtype the weights are loaded in; 'auto' follows `precision` (bf16 -> bfloat16, fp16 -> float16, fp32 -> float32).",
        ("auto", "float32", "bfloat16", "float16"),
    )
    attn_implementation: str = _f(
        "auto",
        "Attention kernel for packed rows; auto picks per device, model and precision (finetune/attention.py).",
        ATTENTION_CHOICES,
    )
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward: less memory, ~30% more compute.")
    trust_remote_code: bool = _f(False, "Allow custom modelling code from the model repo (only for repos you trust).")


@dataclass
class DataSource:
    """One source of a weighted mixture (an item of a ``data.train`` / ``data.eval`` list)."""

    path: str = _f("", "The source: any kind a single data.train may be (mmap prefix, index.json, raw data).")
    weight: float = _f(1.0, "Share of the mixture (normalised over the list; >= 0, not all 0).")
    name: str | None = _f(None, "Name in source_counts and per-source eval keys; default the file name.")


@dataclass
class DataConfig:
    train: str | list[DataSource] = _f(
        "",
        "Training data: mmap prefix (x for x.bin/x.idx), WebDataset index.json, or raw .jsonl/.json/.parquet/... ; "
        "or a weighted mixture [{path: A, weight: 0.7}, {path: B, weight: 0.3}] (Megatron BlendedDataset order: "
        "deterministic, a small source repeats; batches count samples per source).",
    )
    eval: str | list[DataSource] | None = _f(
        None,
        "Evaluation data (same kinds as data.train); a list is evaluated per source (eval rows: loss/NAME) plus "
        "overall (all target tokens pooled); null disables evaluation.",
    )
    format: str = _f(
        "auto",
        "Format of raw input (jsonl/json/gz/parquet/arrow/csv, a datasets folder or a hub id) for the converter: "
        "auto | text | alpaca | sharegpt | messages | prompt_completion.",
    )
    split: str | None = _f(
        None, "Split of a hub dataset given as data.train/data.eval (default train), or of a save_to_disk DatasetDict."
    )
    subset: str | None = _f(None, "Subset (config name) of a hub dataset given as data.train/data.eval.")
    columns: str | None = _f(
        None, "Rename fields of raw input before format detection: 'prompt=question,completion=answer'."
    )
    seq_len: int = _f(1024, "Tokens per training row (packed rows are filled up to this length).")
    packing: str = _f(
        "auto",
        "Row building: packed (no cross-sample attention), padding, bucket; auto = packed, or padding for "
        "prefix/prompt tuning (their virtual tokens need a 2-D attention mask).",
        ("auto", "packed", "padding", "bucket"),
    )
    max_length: int | None = _f(
        None,
        "Raw .jsonl/.json: longest sample the converter keeps, in tokens; null = data.seq_len. Longer samples follow "
        "data.over_length. A value above data.seq_len leaves the rest to the loader, which truncates to data.seq_len.",
    )
    over_length: str = _f(
        "truncate",
        "Raw .jsonl/.json samples longer than data.max_length: truncate (keep the first tokens; an SFT sample left "
        "with no assistant token is dropped), drop, or error (stop at the first one; data.on_error=skip drops them). "
        "Counts are printed at start and written to metrics.jsonl and summary.json.",
        ("truncate", "drop", "error"),
    )
    on_error: str = _f(
        "fail",
        "Raw .jsonl/.json records that cannot be converted (malformed JSON, missing keys): fail = stop with "
        "file:line; skip = drop them and count them by reason.",
        ("fail", "skip"),
    )
    chat_template: str | None = _f(
        None,
        "Jinja chat template file that renders SFT records, instead of the tokenizer's own (or dsft's default for "
        "tokenizers without one). The template used is saved with the final model's tokenizer.",
    )
    cache_dir: str | None = _f(
        None, "Where raw .jsonl/.json is converted to mmap once; default <output_dir>/data_cache."
    )
    num_workers: int = _f(
        -1,
        "DataLoader worker processes per rank building batches; -1 = auto: 2 on a GPU (the next batches are built, "
        "in pinned memory, while the GPU computes), 0 on CPU (the ranks already share the cores).",
    )

    def loader_workers(self, cuda: bool) -> int:
        """``data.num_workers`` with auto (-1) resolved for the device."""
        return self.num_workers if self.num_workers >= 0 else (2 if cuda else 0)

    def sample_max_length(self, fmt: str) -> int | None:
        """``data.max_length`` with null resolved for records of ``fmt``: ``data.seq_len`` for SFT samples (a row
        holds whole samples), no limit for ``text`` (the loader cuts documents into rows without losing a token)."""
        if self.max_length is not None:
            return self.max_length
        return None if fmt == "text" else self.seq_len


@dataclass
class TrainConfig:
    max_steps: int = _f(0, "Optimizer steps to run; 0 = derive from train.epochs.")
    epochs: float = _f(1.0, "Passes over data.train when train.max_steps is 0.")
    micro_batch_size: int | None = _f(None, "Rows per rank per forward pass.")
    grad_accum: int | None = _f(None, "Micro-batches accumulated per optimizer step.")
    global_batch: int | None = _f(
        None, "Rows per optimizer step over all ranks = micro_batch_size x grad_accum x world."
    )
    lr: float = _f(2e-5, "Peak learning rate (AdamW).")
    lr_scheduler: str = _f("cosine", "Decay after warmup.", ("cosine", "linear", "constant"))
    min_lr_ratio: float = _f(0.0, "Final learning rate as a fraction of train.lr (cosine/linear).")
    warmup: float = _f(0.03, "Linear warmup: a fraction of the total steps if < 1, else a number of steps.")
    weight_decay: float = _f(0.0, "AdamW weight decay (never applied to biases and norm weights).")
    adam_betas: list[float] = _f(help="AdamW betas.", factory=lambda: [0.9, 0.95])
    max_grad_norm: float = _f(1.0, "Global gradient-norm clip; 0 disables clipping.")
    tiled_loss: str = _f(
        "auto",
        "Compute the head and the loss in tiles of tokens, never the full logits tensor (finetune/tiled_loss.py; the "
        "same value and gradients). auto = when a micro batch's fp32 logits would exceed 1 GiB (e.g. 8k tokens x "
        "a 152k vocabulary); always; never.",
        TILED_LOSS_MODES,
    )
    seed: int = _f(42, "Seed for model init (PEFT), data order and dropout.")
    eval_every: int = _f(0, "Evaluate on data.eval every N steps (0 = only at the end).")
    save_every: int = _f(0, "Write a resumable checkpoint every N steps (0 = none).")
    log_every: int = _f(
        10,
        "Write a metrics.jsonl row every N steps (loss = mean over those steps). Each row is the loop's one host "
        "sync: between rows the GPU never waits for the host.",
    )
    keep_last: int = _f(2, "Checkpoints kept under output_dir/checkpoints (older ones are pruned).")
    on_save_error: str = _f(
        "stop",
        "A checkpoint save that fails (e.g. disk full): stop = exit with a message (resume later with "
        "train.resume=auto); continue = warn and keep training, the previous checkpoint stays the resume point.",
        choices=("stop", "continue"),
    )
    resume: str = _f("auto", "auto = newest complete checkpoint in output_dir if any; never; or a checkpoint path.")
    collective_timeout_s: int = _f(1800, "Timeout of one collective (process-group timeout) in seconds.")
    step_timeout_s: int | None = _f(
        None,
        "Seconds without a finished step (its evaluation and checkpoint write included) before the watchdog ends the "
        "run with exit code 86 and a report naming the lost rank. null = automatic: just under "
        "train.collective_timeout_s on GPUs (NCCL: a dead peer blocks), off on CPU (gloo raises at once); 0 = off.",
    )
    max_bad_steps: int = _f(5, "Abort after this many consecutive steps with a non-finite loss or gradient norm.")


@dataclass
class ZeroConfig:
    stage: int = _f(2, "ZeRO stage: 0 (DDP), 1 (optimizer states), 2 (+gradients), 3 (+parameters).", (0, 1, 2, 3))
    offload_optimizer: str = _f("none", "Optimizer states to cpu or nvme (stage >= 1).", ("none", "cpu", "nvme"))
    offload_params: str = _f("none", "Parameters to cpu or nvme (stage 3 only).", ("none", "cpu", "nvme"))
    nvme_path: str | None = _f(None, "Directory on a fast local NVMe drive for nvme offload.")


class MethodConfig:
    """``method``: ``name`` plus one section per registered method that has settings (``method.lora``, ...).

    The concrete dataclass is built from the method registry (``finetune.methods``) by :func:`method_config_class`,
    and rebuilt when a method is registered, so that a method defined anywhere gets its YAML section, its
    did-you-mean errors and its ``describe()`` rows without an edit here. ``name`` accepts aliases and holds the
    canonical name (``ptuning_v2`` -> ``prefix``).
    """

    name: str

    def __post_init__(self) -> None:
        try:
            self.name = registry.get_method(self.name).name
        except ValueError as e:
            raise ConfigError(f"method.name={self.name!r}: {e}") from None

    def __reduce__(self):
        # the class is built at run time: pickle/deepcopy rebuild the instance from its values
        return (_rebuild_method_config, (dataclasses.asdict(self),))


_METHOD_CONFIG: tuple[int, type] | None = None  # (registry version, class)


def method_config_class() -> type:
    """The ``MethodConfig`` dataclass for the methods registered now (cached until the registry changes)."""
    global _METHOD_CONFIG
    if _METHOD_CONFIG is None or _METHOD_CONFIG[0] != registry.version():
        methods = registry.registered()
        aliases = ", ".join(f"{a}={m.name}" for m in methods for a in m.aliases)
        fields: list[tuple] = [
            (
                "name",
                str,
                _f("full", f"What is trained: {' | '.join(m.name for m in methods)} (aliases: {aliases})."),
            )
        ]
        for m in methods:
            if m.section_key is not None and m.section_key not in {f[0] for f in fields}:
                fields.append((m.section_key, m.config, _f(help=m.section_help or m.summary, factory=m.config)))
        cls = dataclasses.make_dataclass("MethodConfig", fields, bases=(MethodConfig,))
        cls.__module__ = __name__
        _METHOD_CONFIG = (registry.version(), cls)
    return _METHOD_CONFIG[1]


def _rebuild_method_config(values: dict) -> MethodConfig:
    return _build(method_config_class(), values, "method.")


def _section_type(tp: Any) -> Any:
    """A field's type, with the registry-built ``MethodConfig`` in place of its base class."""
    return method_config_class() if tp is MethodConfig else tp


@dataclass
class Config:
    model: ModelConfig = _f(help="Base model.", factory=ModelConfig)
    data: DataConfig = _f(help="Training and evaluation data.", factory=DataConfig)
    train: TrainConfig = _f(help="Optimization, schedule, logging, checkpoints.", factory=TrainConfig)
    zero: ZeroConfig = _f(help="DeepSpeed ZeRO stage and offload.", factory=ZeroConfig)
    method: MethodConfig = _f(help="Fine-tuning method and its settings.", factory=lambda: method_config_class()())
    output_dir: str = _f("", "Run directory: checkpoints/, final/, metrics.jsonl, loss.png, tensorboard/.")
    precision: str = _f(
        "auto", "Training precision; auto = bf16 where supported, else fp32.", ("auto", "bf16", "fp16", "fp32")
    )
    tf32: bool = _f(True, "Allow TF32 matmuls on Ampere+ GPUs for fp32 math (no effect on CPU).")
    deepspeed: str | None = _f(None, 'Your own DeepSpeed JSON; its "auto" values are filled from this config.')

    @property
    def is_peft(self) -> bool:
        """True when only adapter / prompt parameters train (the final output is a PEFT adapter folder)."""
        return registry.get_method(self.method.name).is_peft

    @property
    def packing(self) -> str:
        """``data.packing`` with ``auto`` resolved for the method (padding for methods that need padded rows)."""
        if self.data.packing != "auto":
            return self.data.packing
        return "padding" if registry.get_method(self.method.name).needs_padding else "packed"

    def validate(self, world_size: int):
        """Check every cross-field rule and resolve the batch plan; raise ``ConfigError`` naming the key.

        Args:
            world_size: number of data-parallel ranks the run will have.

        Returns:
            The ``ds_configs.batch.BatchPlan`` (micro batch, accumulation, world size, global batch).
        """
        from ds_configs.batch import resolve_batch

        if not self.model.name_or_path:
            raise ConfigError("model.name_or_path is empty: set it to a hub id or a local model directory")
        if not self.data.train:
            raise ConfigError("data.train is empty: set it to an mmap prefix, a WebDataset index.json or a .jsonl file")
        if not self.output_dir:
            raise ConfigError("output_dir is empty: set output_dir=DIR (checkpoints and final weights go there)")
        t = self.train
        if t.max_steps < 0 or (t.max_steps == 0 and t.epochs <= 0):
            raise ConfigError("train.max_steps / train.epochs: set train.max_steps > 0 or train.epochs > 0")
        for key in ("lr",):
            if getattr(t, key) <= 0:
                raise ConfigError(f"train.{key}={getattr(t, key)} must be > 0")
        for key in ("log_every", "keep_last", "max_bad_steps"):
            if getattr(t, key) < 1:
                raise ConfigError(f"train.{key}={getattr(t, key)} must be >= 1")
        for key in ("eval_every", "save_every", "max_grad_norm", "weight_decay", "warmup"):
            if getattr(t, key) < 0:
                raise ConfigError(f"train.{key}={getattr(t, key)} must be >= 0")
        if t.step_timeout_s is not None and t.step_timeout_s < 0:
            raise ConfigError(f"train.step_timeout_s={t.step_timeout_s} must be >= 0 (0 = off) or null (automatic)")
        if t.resume not in ("auto", "never") and not Path(t.resume).exists():
            raise ConfigError(f"train.resume={t.resume!r}: no such checkpoint; use auto, never or an existing path")
        if self.data.num_workers < -1:
            raise ConfigError(f"data.num_workers={self.data.num_workers}: use -1 (auto) or a count >= 0")
        if self.data.seq_len < 8:
            raise ConfigError(f"data.seq_len={self.data.seq_len} is too short; use >= 8 (typically 512-8192)")
        self._validate_data()
        self._validate_precision()
        self._validate_zero()
        self._validate_method()
        try:
            return resolve_batch(
                world_size=world_size,
                micro_batch_size=t.micro_batch_size,
                grad_accum=t.grad_accum,
                global_batch=t.global_batch,
            )
        except (ValueError, TypeError) as e:
            raise ConfigError(
                f"train.micro_batch_size={t.micro_batch_size} x train.grad_accum={t.grad_accum} x world_size="
                f"{world_size} vs train.global_batch={t.global_batch}: {e}"
            ) from e

    def _validate_data(self) -> None:
        d = self.data
        for key in ("train", "eval"):
            items = getattr(d, key)
            if isinstance(items, list):
                _validate_mixture(f"data.{key}", items)
        if d.max_length is not None and d.max_length < 1:
            raise ConfigError(f"data.max_length={d.max_length} must be >= 1 (or null for data.seq_len)")
        if d.chat_template is not None and not Path(d.chat_template).is_file():
            raise ConfigError(
                f"data.chat_template={d.chat_template}: no such file; give a Jinja chat template file, or null to use "
                "the tokenizer's template"
            )

    def _validate_precision(self) -> None:
        wants = {"bfloat16": "bf16", "float16": "fp16"}.get(self.model.dtype)
        if wants and self.precision in ("bf16", "fp16") and wants != self.precision:
            raise ConfigError(
                f"precision={self.precision} with model.dtype={self.model.dtype}: fp16 and bf16 cannot be mixed; "
                f"set model.dtype=auto (or precision={wants})"
            )
        if self.deepspeed:
            user = _read_json(self.deepspeed, "deepspeed")
            fp16_on = _enabled(user.get("fp16"))
            bf16_on = _enabled(user.get("bf16")) or _enabled(user.get("bfloat16"))
            if fp16_on and bf16_on:
                raise ConfigError(f"deepspeed={self.deepspeed}: both fp16.enabled and bf16.enabled are true; keep one")
            if (fp16_on and self.precision == "bf16") or (bf16_on and self.precision == "fp16"):
                raise ConfigError(
                    f"precision={self.precision} but deepspeed={self.deepspeed} enables "
                    f"{'fp16' if fp16_on else 'bf16'}: fp16 and bf16 cannot be mixed; set precision=auto"
                )

    def _validate_zero(self) -> None:
        """The stage / offload / quantized-base rules (``ds_configs.rules``), worded with this config's keys."""
        z = self.zero
        method = registry.get_method(self.method.name)
        bits = method.quant_bits(self)
        violations = rules.check(
            z.stage,
            z.offload_optimizer,
            z.offload_params,
            optimizer_nvme_path=z.nvme_path,
            param_nvme_path=z.nvme_path,
            quant_bits=bits,
            quantized_by=method.name,
        )
        if violations:
            raise ConfigError(violations[0].message(_config_keys(method)))

    def _validate_method(self) -> None:
        method = registry.get_method(self.method.name)
        if v := rules.check_precision(method.quant_bits(self), self.precision, quantized_by=method.name):
            raise ConfigError(v.message(_config_keys(method)))
        if message := method.validate(self):
            raise ConfigError(message)
        if method.needs_padding and self.packing != "padding":
            raise ConfigError(
                f"data.packing={self.data.packing} with method.name={method.name}: the method needs padded rows "
                "(virtual tokens need a 2-D attention mask); use data.packing=padding (or auto)"
            )


def _validate_mixture(key: str, items: list[DataSource]) -> None:
    """Weights of a ``data.train``/``data.eval`` list: finite, >= 0, not all 0; paths given; names unique."""
    import math

    from data_tools.loading.blend import default_name

    if not items:
        raise ConfigError(f"{key}=[]: give at least one source, e.g. {key}=[{{path: A, weight: 1}}]")
    names: dict[str, int] = {}
    for i, item in enumerate(items):
        if not item.path:
            raise ConfigError(f"{key}[{i}].path is empty: give the source's path")
        if not math.isfinite(item.weight) or item.weight < 0:
            raise ConfigError(f"{key}[{i}].weight={item.weight!r} must be a finite number >= 0 (a share of the mix)")
        name = item.name or default_name(item.path)
        if name in names:
            raise ConfigError(
                f"{key}[{i}]: the name {name!r} is also {key}[{names[name]}]'s; set {key}[{i}].name to tell them apart"
            )
        names[name] = i
    if sum(item.weight for item in items) <= 0:
        raise ConfigError(f"{key}: every weight is 0; give at least one source a weight > 0")


def _config_keys(method: registry.Method) -> rules.KeyStyle:
    """``ds_configs.rules`` messages in this config's keys (the quantization bits live in the method's section)."""
    section = method.section_key or method.name
    return dataclasses.replace(
        rules.CONFIG_KEYS, keys={**rules.CONFIG_KEYS.keys, "quant_bits": f"method.{section}.bits"}
    )


def _enabled(section: Any) -> bool:
    return isinstance(section, dict) and section.get("enabled") in (True, "true")  # "auto" follows `precision`


def _read_json(path: str, key: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise ConfigError(f"{key}={path}: no such file") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{key}={path}:{e.lineno}: invalid JSON: {e.msg}") from e


# ---------------------------------------------------------------------------------------------------------------
# Loading: YAML + overrides -> typed tree


def _parse_override(arg: str) -> tuple[str, Any]:
    if "=" not in arg:
        raise ConfigError(f"override {arg!r}: expected key=value, e.g. train.lr=1e-4")
    key, raw = arg.split("=", 1)
    # YAML scalars give the natural types: 1e-4 -> float, true -> bool, null -> None, [a, b] -> list.
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for i, p in enumerate(parts[:-1]):
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _coerce(key: str, value: Any, tp: Any, choices: tuple | None) -> Any:
    """Convert a YAML value to the field type ``tp`` or raise naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and str in args and "," not in value:
            return _coerce(key, value, str, choices)  # 'all-linear' stays a string; 'q,v' becomes a list
        errors = []
        for a in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, a, choices)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if errors else f"{key}: cannot be null")
    if origin is list:
        (item,) = typing.get_args(tp)
        if dataclasses.is_dataclass(item):  # a list of sections (data.train mixtures): each item a typed mapping
            if not isinstance(value, list):
                raise ConfigError(f"{key}={value!r}: expected a string or a list of {{path: ..., weight: ...}}")
            return [_build(item, v, f"{key}[{i}].") for i, v in enumerate(value)]
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}={value!r}: expected a list, e.g. {key}=[a,b]")
        return [_coerce(f"{key}[{i}]", v, item, None) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            out = value
        elif isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            out = value.lower() in ("true", "yes", "on", "1")
        elif isinstance(value, int) and value in (0, 1):
            out = bool(value)
        else:
            raise ConfigError(f"{key}={value!r}: expected true or false")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
            raise ConfigError(f"{key}={value!r}: expected an integer")
        out = int(value)
    elif tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError as e:
                raise ConfigError(f"{key}={value!r}: expected a number") from e
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}={value!r}: expected a number")
        out = float(value)
    elif tp is str:
        if isinstance(value, dict | list) or value is None:
            raise ConfigError(f"{key}={value!r}: expected a string")
        out = str(value)
    else:
        raise ConfigError(f"{key}: unsupported field type {tp}")
    if choices and out not in choices:
        raise ConfigError(f"{key}={out!r}: expected one of {', '.join(map(str, choices))}")
    return out


def _build(cls: type, data: dict, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        if k not in fields:
            all_keys = [prefix + n for n in fields]
            close = difflib.get_close_matches(prefix + str(k), all_keys, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known keys: {', '.join(all_keys)}"
            raise ConfigError(f"unknown key '{prefix}{k}'{hint}")
        tp = _section_type(hints[k])
        if dataclasses.is_dataclass(tp):
            kwargs[k] = _build(tp, v if v is not None else {}, f"{prefix}{k}.")
        else:
            kwargs[k] = _coerce(prefix + k, v, tp, fields[k].metadata.get("choices"))
    return cls(**kwargs)


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, defaults: dict | None = None
) -> Config:
    """Build a ``Config`` from recipe ``defaults``, then a YAML file, then ``key=value`` overrides (last wins).

    Args:
        path: YAML file (nested sections; see ``finetune/configs/``), or None.
        overrides: command-line ``dotted.key=value`` strings; values are parsed as YAML scalars.
        defaults: nested dict a recipe uses to say what it fixes (e.g. ``{"method": {"name": "lora"}}``).

    Raises:
        ConfigError: unknown key (with a suggestion), wrong type or value outside its choices.
    """
    tree: dict = json.loads(json.dumps(defaults or {}))  # deep copy
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as e:
            raise ConfigError(f"--config {path}: no such file") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path}: invalid YAML: {e}") from e
        _deep_merge(tree, loaded)
    for arg in overrides or []:
        key, value = _parse_override(arg)
        _set_dotted(tree, key, value)
    return _build(Config, tree, "")


def _deep_merge(base: dict, extra: dict) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = v


def to_dict(cfg: Config) -> dict:
    """The config as a plain nested dict (written to ``output_dir/config.yaml`` for reproducibility)."""
    return dataclasses.asdict(cfg)


def describe(cls: type = Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) for every leaf field: the reference table behind ``--help``."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _section_type(hints[f.name])
        if dataclasses.is_dataclass(tp):
            rows.extend(describe(tp, f"{prefix}{f.name}."))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((prefix + f.name, default, f.metadata.get("help", "")))
    return rows
