"""The method registry: every fine-tuning method is one :class:`Method`, registered with one :func:`register` call.

A method says everything the rest of dsft needs to know about it, in one place:

- its name and aliases (``prefix`` is also ``ptuning_v2`` / ``p_tuning_v2``, the recipe's name);
- its config dataclass, the ``method.<section>`` of the YAML (``finetune.config`` builds ``MethodConfig`` from the
  registered sections, so ``describe()`` and the did-you-mean errors cover them);
- whether it is PEFT (``final/`` is an adapter folder), whether it needs padded rows;
- ``load_kwargs`` (extra ``from_pretrained`` arguments) and ``prepare`` (make the loaded base trainable);
- ``memory``: what ``ds_configs.memory`` counts for it;
- ``lr_range``: the usual peak learning rates (``dsft doctor`` compares ``train.lr`` with it).

This module imports neither torch nor ``finetune.config``: ``finetune.config`` and ``ds_configs`` import it, and
``python -m ds_configs.generate`` stays a light command. ``Config`` / ``ModelShape`` / ``MethodSpec`` appear in
type hints only.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ds_configs.memory import MethodSpec, ModelShape
    from finetune.config import Config


def option(default: Any = dataclasses.MISSING, help: str = "", choices: tuple | None = None, factory=None) -> Any:
    """A config dataclass field carrying ``help`` (shown by ``describe``) and optional ``choices`` (checked on load).

    The one field helper of every config dataclass: ``finetune.config`` uses it for its own sections too.
    """
    meta = {"help": help, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _no_load_kwargs(cfg: Config, precision: str = "fp32") -> dict:
    return {}


def _no_knobs(cfg: Config) -> dict:
    return {}


def _no_tokens(spec: MethodSpec) -> int:
    return 0


def _valid(cfg: Config) -> str | None:
    return None


@dataclass(frozen=True)
class MemoryTerms:
    """What ``ds_configs.memory.estimate`` counts for a method (formulas in ``ds_configs/memory.py``).

    Attributes:
        trainable_params: ``(shape, spec) -> int``, the parameters with gradients and Adam state.
        trains_base: True when the trainable parameters are base weights (full fine-tuning, a head-only method): the
            frozen rest is ``total - trainable``. False when they are added (adapters, prompts): the whole base is frozen.
        extra_tokens: ``spec -> int``, positions every row gains in the activations (prompt tuning's soft prompt).
        quantized: the frozen base is stored in ``spec.quant_bits`` bits (bitsandbytes): base bytes/param from
            ``ds_configs.memory.QUANT_BYTES``, a dequantisation buffer, and the quantized-base rules of
            ``ds_configs.rules``.
        load_bytes_per_param: bytes per parameter while each rank loads the checkpoint. DeepSpeed's estimators assume
            fp32 (4) for full fine-tuning; a PEFT base loads in 16-bit (2).
        knobs: ``cfg -> dict`` of ``MethodSpec`` fields read from the training config (LoRA rank, bits, ...): what
            :func:`memory_spec` passes on.
    """

    trainable_params: Callable[[ModelShape, MethodSpec], int]
    trains_base: bool = False
    extra_tokens: Callable[[MethodSpec], int] = _no_tokens
    quantized: bool = False
    load_bytes_per_param: int = 2
    knobs: Callable[[Config], dict] = _no_knobs


@dataclass(frozen=True)
class Method:
    """One fine-tuning method. Declare one per ``finetune/methods/<m>.py`` (or in a test) and :func:`register` it.

    Attributes:
        name: canonical ``method.name``.
        summary: one line for ``--help`` and ``describe()``.
        prepare: ``(model, cfg) -> model``, make the loaded base trainable the method's way.
        memory: what the memory model counts (see :class:`MemoryTerms`).
        lr_range: (low, high) usual peak learning rates for AdamW with this method; outside it ``dsft doctor`` warns.
        aliases: other names accepted wherever a method is named (``--method``, ``method.name``, ``dsft train``).
        config: dataclass of the ``method.<section>`` settings (fields made with :func:`option`), or None.
        section: the key under ``method.``; default: ``name``.
        section_help: ``describe()`` text of the section.
        is_peft: only adapter / prompt parameters train and ``final/`` is a PEFT adapter folder.
        needs_padding: rows must be padded, not packed (``data.packing=auto`` picks padding; packed is refused).
        keeps_position_ids: the batch's ``position_ids`` reach the model (PEFT prompt learning shifts positions
            itself and ignores explicit ones).
        load_kwargs: ``(cfg, precision) -> dict`` of extra ``from_pretrained`` arguments (QLoRA's quantization).
        validate: ``cfg -> message | None``, the method's own config rules (``Config.validate`` raises the message).
        export_as: the method whose ``prepare`` rebuilds the trained parameters on an unquantized fp32 base for
            ``finetune.export zero`` (QLoRA: ``lora``); None = this one.
        recipe: the ``finetune/<recipe>.py`` script that trains it, or None (``sft.py`` trains any method).
    """

    name: str
    summary: str
    prepare: Callable[[Any, Config], Any]
    memory: MemoryTerms
    lr_range: tuple[float, float]
    aliases: tuple[str, ...] = ()
    config: type | None = None
    section: str | None = None
    section_help: str = ""
    is_peft: bool = False
    needs_padding: bool = False
    keeps_position_ids: bool = True
    load_kwargs: Callable[[Config, str], dict] = _no_load_kwargs
    validate: Callable[[Config], str | None] = _valid
    export_as: str | None = None
    recipe: str | None = None

    def __post_init__(self) -> None:
        low, high = self.lr_range
        if not 0 < low < high:
            raise ValueError(f"method {self.name!r}: lr_range={self.lr_range} must be (low, high) with 0 < low < high")
        if self.config is not None and not dataclasses.is_dataclass(self.config):
            raise ValueError(f"method {self.name!r}: config={self.config!r} must be a dataclass")

    @property
    def section_key(self) -> str | None:
        """The ``method.<key>`` this method's settings live under (None: it has none)."""
        return None if self.config is None else (self.section or self.name)

    def quant_bits(self, cfg: Config) -> int | None:
        """Bits of the quantized frozen base for ``cfg`` (None when the base is not quantized)."""
        return self.memory.knobs(cfg).get("quant_bits", 4) if self.memory.quantized else None


class UnknownMethod(ValueError):
    """A method name that is neither registered nor an alias; the message suggests the closest one."""


_METHODS: dict[str, Method] = {}  # canonical name -> method, in registration order
_ALIASES: dict[str, str] = {}  # alias -> canonical name
_version = 0  # bumped by every register/unregister: finetune.config rebuilds MethodConfig when it changes


def register(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to the registry: the config, engine, export, memory model and generator know it from now on.

    Args:
        method: the method.
        replace: allow replacing a method of the same name (its aliases are replaced too).

    Returns:
        ``method`` (so a module can write ``LORA = register(Method(...))``).

    Raises:
        ValueError: the name or an alias is taken, or the config section is another method's.
    """
    global _version
    if method.name in _METHODS and replace:
        unregister(method.name)
    for n in (method.name, *method.aliases):
        owner = _METHODS.get(n) or _METHODS.get(_ALIASES.get(n, ""))
        if owner is not None:
            raise ValueError(f"method name {n!r} is already taken by method {owner.name!r}; pick another name")
    section = method.section_key
    if section is not None:
        for other in _METHODS.values():
            if other.section_key == section and other.config is not method.config:
                raise ValueError(f"method {method.name!r}: section method.{section} is already method {other.name!r}'s")
    _METHODS[method.name] = method
    _ALIASES.update({a: method.name for a in method.aliases})
    _version += 1
    return method


def unregister(name: str) -> None:
    """Remove a method (by name or alias); tests use it to clean up a method they registered."""
    global _version
    method = get_method(name)
    del _METHODS[method.name]
    for a in method.aliases:
        _ALIASES.pop(a, None)
    _version += 1


def get_method(name: str) -> Method:
    """The method called ``name`` (a canonical name or an alias).

    Raises:
        UnknownMethod: unknown name; the message names the closest known one and lists them all.
    """
    if name in _METHODS:
        return _METHODS[name]
    if name in _ALIASES:
        return _METHODS[_ALIASES[name]]
    known = all_names()
    close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UnknownMethod(
        f"method {name!r} is not registered{hint}; known: {', '.join(names())} "
        f"(aliases: {', '.join(f'{a}={c}' for a, c in _ALIASES.items())})"
    )


def names() -> tuple[str, ...]:
    """Canonical method names, in registration order."""
    return tuple(_METHODS)


def all_names() -> tuple[str, ...]:
    """Canonical names and aliases: what a command line accepts (``--method``, ``dsft train METHOD``)."""
    return (*_METHODS, *_ALIASES)


def registered() -> tuple[Method, ...]:
    """Every registered method, in registration order."""
    return tuple(_METHODS.values())


def version() -> int:
    """A counter that changes whenever the registry does (``finetune.config`` caches ``MethodConfig`` on it)."""
    return _version


def memory_spec(cfg: Config) -> MethodSpec:
    """The memory model's ``MethodSpec`` for a training config: its method and the knobs the method reads from it
    (LoRA rank and targets, quantization bits, virtual tokens). What ``dsft plan`` estimates a YAML with."""
    from ds_configs.memory import MethodSpec

    method = get_method(cfg.method.name)
    return MethodSpec(method.name, **method.memory.knobs(cfg))
