"""Which ZeRO stages, offloads and quantized bases go together: the compatibility rules, written once.

Every caller asks :func:`check` and words the answer with its own key names through a :class:`KeyStyle`:

- ``finetune.config`` (``Config.validate``): ``zero.stage``, ``zero.offload_params``, ``method.qlora.bits`` ...;
- ``ds_configs.build.validate_ds_config``: the JSON keys (``"zero_optimization.stage"`` ...);
- ``ds_configs.memory``: its arguments (``zero_stage``, ``offload_params`` ...);
- ``ds_configs.generate``: a strategy row's "why" (:attr:`Violation.reason`).

The rules and where they come from:

1. ``offload_params`` needs stage 3: only ZeRO-3 partitions parameters, so only it can page them out
   (DeepSpeed's ``offload_param`` is a stage-3 section).
2. NVMe offload needs stage 3: ZeRO-Infinity's swapping lives in the stage-3 optimizer (DeepSpeed refuses NVMe
   optimizer offload below it).
3. ``offload_optimizer`` needs stage >= 1: ZeRO offloads the optimizer partitions it creates; stage 0 has none.
4. NVMe offload needs a path on a local NVMe drive.
5. A quantized (bitsandbytes) base cannot be offloaded: its 4/8-bit tensors are not ordinary parameters that
   ZeRO-3 can page out.
6. An 8-bit base cannot be partitioned by ZeRO-3: 4-bit codes are stored in the training dtype
   (``bnb_4bit_quant_storage``, see ``finetune/methods/qlora.py``), which ZeRO-3 partitions; LLM.int8 weights
   are int8 tensors with separate scales, which it cannot.
7. A quantized base supports 4 or 8 bits.
8. A quantized base does not train in fp16 (the 16-bit activations of the dequantised matmuls overflow; use bf16
   or fp32): :func:`check_precision`, which only the training config applies (the generator may pick fp16 for
   pre-Ampere GPUs from an estimate alone).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

OFFLOAD_DEVICES = ("none", "cpu", "nvme")
QUANT_BITS = (4, 8)
UNCHECKED = object()  # pass as an nvme path when the caller has none to check (the memory model)


@dataclass(frozen=True)
class KeyStyle:
    """How one caller names the settings in its messages.

    Attributes:
        keys: setting -> the caller's key: ``stage``, ``offload_optimizer``, ``offload_params``,
            ``optimizer_nvme_path``, ``param_nvme_path``, ``quant_bits``, ``precision``, ``quantized`` (what
            turns quantization on, e.g. ``method.name``).
        is_: ``(key, value) -> text`` for "this key has this value" (config: ``zero.stage=2``; JSON:
            ``"zero_optimization.stage" is 2``).
        set_: ``(key, value) -> text`` for "set this key to this value".
    """

    keys: Mapping[str, str]
    is_: Callable[[str, object], str] = lambda k, v: f"{k}={v}"
    set_: Callable[[str, object], str] = lambda k, v: f"{k}={v}"


CONFIG_KEYS = KeyStyle(
    {
        "stage": "zero.stage",
        "offload_optimizer": "zero.offload_optimizer",
        "offload_params": "zero.offload_params",
        "optimizer_nvme_path": "zero.nvme_path",
        "param_nvme_path": "zero.nvme_path",
        "quant_bits": "method.qlora.bits",
        "quantized": "method.name",
        "precision": "precision",
    }
)
JSON_KEYS = KeyStyle(
    {
        "stage": '"zero_optimization.stage"',
        "offload_optimizer": '"zero_optimization.offload_optimizer.device"',
        "offload_params": '"zero_optimization.offload_param.device"',
        "optimizer_nvme_path": '"zero_optimization.offload_optimizer.nvme_path"',
        "param_nvme_path": '"zero_optimization.offload_param.nvme_path"',
    },
    is_=lambda k, v: f"{k} is {v}",
    set_=lambda k, v: f"{k}: {json.dumps(v)}",
)
ARGUMENT_KEYS = KeyStyle(
    {
        "stage": "zero_stage",
        "offload_optimizer": "offload_optimizer",
        "offload_params": "offload_params",
        "optimizer_nvme_path": "nvme_path",
        "param_nvme_path": "nvme_path",
        "quant_bits": "quant_bits",
        "quantized": "method",
        "precision": "precision",
    },
    set_=lambda k, v: f"{k} {v}",
)


@dataclass(frozen=True)
class Violation:
    """One broken rule.

    Attributes:
        rule: stable id (``offload_params_needs_stage3`` ...); tests compare verdicts across callers by it.
        reason: why, without key names (a generator row's "why").
        values: the settings involved and their values.
        wording: ``(style, values) -> message`` in a caller's key names.
    """

    rule: str
    reason: str
    values: dict = field(default_factory=dict)
    wording: Callable[[KeyStyle, dict], str] | None = None

    def message(self, style: KeyStyle) -> str:
        """The message in ``style``'s key names: what is set, why it cannot work, and what to change."""
        return self.wording(style, self.values) if self.wording else self.reason


def _k(style: KeyStyle, setting: str) -> str:
    return style.keys.get(setting, setting)


def _is(style: KeyStyle, setting: str, value: object) -> str:
    return style.is_(_k(style, setting), value)


def _set(style: KeyStyle, setting: str, value: object) -> str:
    return style.set_(_k(style, setting), value)


def check(
    stage: int,
    offload_optimizer: str = "none",
    offload_params: str = "none",
    *,
    optimizer_nvme_path: object = UNCHECKED,
    param_nvme_path: object = UNCHECKED,
    quant_bits: int | None = None,
    quantized_by: str = "qlora",
) -> list[Violation]:
    """Every rule ``stage`` + offload + a quantized base break, most specific first (callers raise the first).

    Args:
        stage: ZeRO stage 0-3.
        offload_optimizer: ``none``, ``cpu`` or ``nvme``.
        offload_params: ``none``, ``cpu`` or ``nvme``.
        optimizer_nvme_path: the NVMe directory for optimizer offload (``UNCHECKED``: the caller has no path to
            check); ``None`` or ``""`` = not set.
        param_nvme_path: the same for parameter offload.
        quant_bits: bits of a quantized (bitsandbytes) base, None when the base is not quantized.
        quantized_by: the method that quantizes the base, for the messages.

    Returns:
        The violations (empty when the combination works).
    """
    out: list[Violation] = []
    v = {
        "stage": stage,
        "offload_optimizer": offload_optimizer,
        "offload_params": offload_params,
        "quant_bits": quant_bits,
        "quantized_by": quantized_by,
    }
    for setting, dev, path_setting, path in (
        ("offload_optimizer", offload_optimizer, "optimizer_nvme_path", optimizer_nvme_path),
        ("offload_params", offload_params, "param_nvme_path", param_nvme_path),
    ):
        if dev == "nvme" and path is not UNCHECKED and not path:
            out.append(
                Violation(
                    "nvme_needs_path",
                    "NVMe offload needs a directory on a local NVMe drive",
                    {**v, "setting": setting, "path_setting": path_setting},
                    lambda s, v: (
                        f"{_is(s, v['setting'], 'nvme')} but {_k(s, v['path_setting'])} is not set; give a "
                        f"directory on a local NVMe drive: {_set(s, v['path_setting'], '/local/nvme/dir')}"
                    ),
                )
            )
    if offload_params != "none" and stage != 3:
        out.append(
            Violation(
                "offload_params_needs_stage3",
                "parameter offload needs ZeRO-3 (only stage 3 partitions parameters)",
                v,
                lambda s, v: (
                    f"{_is(s, 'offload_params', v['offload_params'])} but parameter offload needs "
                    f"{_k(s, 'stage')} 3 (got {v['stage']}); use {_set(s, 'stage', 3)} or "
                    f"{_set(s, 'offload_params', 'none')}"
                ),
            )
        )
    for setting, dev in (("offload_optimizer", offload_optimizer), ("offload_params", offload_params)):
        if dev == "nvme" and stage != 3:
            out.append(
                Violation(
                    "nvme_needs_stage3",
                    "NVMe offload (ZeRO-Infinity) needs ZeRO-3",
                    {**v, "setting": setting},
                    lambda s, v: (
                        f"{_is(s, v['setting'], 'nvme')} (ZeRO-Infinity), which needs {_k(s, 'stage')} 3 (got "
                        f"{v['stage']}); use {_set(s, 'stage', 3)} or offload to cpu"
                    ),
                )
            )
    if offload_optimizer != "none" and stage == 0:
        out.append(
            Violation(
                "offload_optimizer_needs_stage1",
                "optimizer offload needs ZeRO stage >= 1 (ZeRO partitions the optimizer it offloads)",
                v,
                lambda s, v: (
                    f"{_is(s, 'offload_optimizer', v['offload_optimizer'])} but optimizer offload needs "
                    f"{_k(s, 'stage')} >= 1 (ZeRO partitions the optimizer it offloads); set {_k(s, 'stage')} 1-3"
                ),
            )
        )
    if quant_bits is not None:
        if quant_bits not in QUANT_BITS:
            out.append(
                Violation(
                    "quant_bits_unsupported",
                    quant_bits_refusal(quant_bits) or "",
                    v,
                    lambda s, v: f"{_is(s, 'quant_bits', v['quant_bits'])}: {quant_bits_refusal(v['quant_bits'])}",
                )
            )
        if offload_params != "none":
            out.append(
                Violation(
                    "quantized_no_param_offload",
                    "bitsandbytes 4/8-bit weights cannot be offloaded by ZeRO-3",
                    v,
                    lambda s, v: (
                        f"{_is(s, 'quantized', v['quantized_by'])} with {_is(s, 'offload_params', v['offload_params'])}: "
                        "quantized base weights cannot be partitioned/offloaded by ZeRO-3; use "
                        f"{_set(s, 'offload_params', 'none')} and {_set(s, 'stage', 2)}"
                    ),
                )
            )
        if quant_bits == 8 and stage == 3:
            out.append(
                Violation(
                    "quantized_8bit_no_stage3",
                    "ZeRO-3 partitions 4-bit QLoRA weights only (--quant-bits 4)",
                    v,
                    lambda s, v: (
                        f"{_is(s, 'quant_bits', 8)} with {_is(s, 'stage', 3)} is not supported: ZeRO-3 partitions "
                        f"4-bit QLoRA weights only; use {_set(s, 'quant_bits', 4)} or {_set(s, 'stage', 2)}"
                    ),
                )
            )
    return out


def quant_bits_refusal(bits: int) -> str | None:
    """Why ``bits`` is not a supported quantized-base width, or None."""
    return None if bits in QUANT_BITS else "a quantized (QLoRA) base supports 4 or 8 bits"


def check_precision(quant_bits: int | None, precision: str, quantized_by: str = "qlora") -> Violation | None:
    """Rule 8: a quantized base with fp16 training, or None when the pair is fine."""
    if quant_bits is None or precision != "fp16":
        return None
    return Violation(
        "quantized_no_fp16",
        "a quantized base is unstable in fp16",
        {"precision": precision, "quantized_by": quantized_by},
        lambda s, v: (
            f"{_is(s, 'quantized', v['quantized_by'])} with {_is(s, 'precision', 'fp16')} is unstable; use "
            f"{_set(s, 'precision', 'bf16')} or fp32"
        ),
    )


def first_error(violations: list[Violation], style: KeyStyle) -> str | None:
    """The first violation's message in ``style``, or None when there is none."""
    return violations[0].message(style) if violations else None
