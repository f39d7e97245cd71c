"""Checks that the training data fits the model before any step runs: minutes of GPU time are cheaper to lose at
start than hours into a run, and the errors a mismatch causes later ("index out of range in self", a CUDA
device-side assert, or silently garbage tokens) do not say what is wrong.

    check_training_data(cfg.data.train, tokenizer, model.config.vocab_size)

- data converted with another tokenizer than the model's (the ``.meta.json`` vocabulary hash);
- a token id >= the model's vocabulary (the embedding would be indexed out of range);
- a ``.bin``/``.idx`` truncated or swapped after conversion (sizes disagree with the index);
- a loss mask whose sequences do not line up with the tokens.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

_SCAN_CHUNK = 1 << 24  # tokens per read while scanning for the largest id (32-64 MiB of uint16/int32)


class PreflightError(ValueError):
    """The data cannot train this model; the message names the file and what to do."""


def check_training_data(source: str | os.PathLike, tokenizer, model_vocab_size: int, scan_tokens: bool = True) -> None:
    """Fail with a clear message when ``source`` does not fit the tokenizer and model.

    Args:
        source: An mmap prefix (``P`` for ``P.bin/.idx``) or a WebDataset ``index.json``.
        tokenizer: The tokenizer of the run.
        model_vocab_size: ``model.config.vocab_size`` (rows of the input embedding).
        scan_tokens: Read every token once to find the largest id (sequential, ~1 GB/s; for a WebDataset index only
            the recorded meta is checked). With False only the metadata is checked.

    Raises:
        PreflightError: naming the file and the fix.
    """
    from data_tools.indexed import IndexedDataset, IndexedDatasetError, check_loss_mask_aligned
    from data_tools.meta import MetaError, check_meta_matches_tokenizer, tokenizer_fingerprint

    if len(tokenizer) > model_vocab_size:
        raise PreflightError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only {model_vocab_size} rows "
            f"(model.config.vocab_size): ids >= {model_vocab_size} cannot be embedded; use the tokenizer that "
            "belongs to model.name_or_path or resize the embeddings"
        )
    path = Path(source)
    if path.suffix == ".json":
        _check_webdataset_index(path, tokenizer_fingerprint(tokenizer), model_vocab_size)
        return
    try:
        meta = check_meta_matches_tokenizer(path, tokenizer, missing_ok=True)
    except MetaError as e:
        raise PreflightError(str(e)) from e
    if meta is None:
        logger.warning("%s: no .meta.json (converted by another tool?): cannot check which tokenizer made it", path)
    try:
        ds = IndexedDataset(path)
        check_loss_mask_aligned(path, ds)
    except IndexedDatasetError as e:
        raise PreflightError(str(e)) from e
    if scan_tokens and len(ds):
        _check_max_id(path, ds, model_vocab_size)


def _check_max_id(prefix: Path, ds, vocab: int) -> None:
    tokens = np.memmap(f"{prefix}.bin", mode="r", dtype=ds.dtype)
    for start in range(0, len(tokens), _SCAN_CHUNK):
        chunk = tokens[start : start + _SCAN_CHUNK]
        top = int(chunk.max())
        if top >= vocab or int(chunk.min()) < 0:
            bad = np.flatnonzero((chunk >= vocab) | (chunk < 0))[0] + start
            # pointers are byte offsets of each sequence: find the sequence holding token ``bad``
            seq = int(np.searchsorted(ds.pointers // ds.dtype.itemsize, bad, side="right") - 1)
            raise PreflightError(
                f"{prefix}.bin: sequence {seq} holds token id {int(tokens[bad])}, outside the model's vocabulary "
                f"[0, {vocab}); the data was tokenized for another model: re-convert it with this model's tokenizer"
            )


def _check_webdataset_index(index: Path, current: dict, vocab: int) -> None:
    import json

    try:
        meta = json.loads(index.read_text()).get("meta") or {}
    except (OSError, json.JSONDecodeError) as e:
        raise PreflightError(f"{index}: cannot read the WebDataset index ({e})") from e
    recorded = meta.get("tokenizer") or {}
    if recorded and recorded.get("vocab_hash") != current["vocab_hash"]:
        raise PreflightError(
            f"{index}: shards were converted with tokenizer {recorded.get('name')!r} (vocab "
            f"{recorded.get('vocab_size')}) but this run uses {current['name']!r} (vocab {current['vocab_size']}); "
            "re-convert with this model's tokenizer"
        )
    if recorded.get("vocab_size", 0) > vocab:
        raise PreflightError(
            f"{index}: converted with a {recorded['vocab_size']}-token vocabulary, the model has {vocab} rows"
        )


# ---------------------------------------------------------------------------------------------------------------
# Before launch: what the config, the files and the model's config.json can tell in seconds, before any rank starts.
# `dsft train` runs this before spawning ranks and every recipe runs it before its process group exists, so a typo
# is a one-line `config error:` instead of a traceback from inside a rank 40 s later.

# Model config keys that bound the positions a model can embed, in the order transformers' models use them.
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
# Learned absolute position embeddings: a longer row indexes past the table (GPT-2: IndexError in step 1).
LEARNED_POSITIONS = ("gpt2", "gpt_neo", "gptj", "opt", "bert", "roberta", "xglm", "biogpt", "codegen")


def data_path_problem(path: str, key: str) -> str | None:
    """Why ``path`` (the value of ``data.train``/``data.eval``) is not data the run can read, or None.

    The kinds the loader reads: an mmap prefix (``P`` for ``P.bin``/``P.idx``), a WebDataset ``index.json`` or its
    folder, and raw data that the run converts once (``finetune.data.is_raw``): a ``.jsonl``/``.json``/``.gz``/
    ``.parquet``/``.arrow``/``.csv`` file, a ``save_to_disk`` folder or a folder of shards, or a hub dataset id
    (``namespace/name``; with ``HF_HUB_OFFLINE=1`` it must be in the local cache). Reads folders only, in
    milliseconds: whether the records are usable is the converter's to say.
    """
    from data_tools.sources import SHARD_SUFFIXES, hub_cache_has, is_hub_id, shard_files

    p = Path(path)
    if p.name == "index.json" or (p.is_dir() and (p / "index.json").is_file()):
        return None if (p if p.name == "index.json" else p / "index.json").is_file() else f"{key}={p}: no such file"
    if p.name.lower().endswith(SHARD_SUFFIXES):
        if not p.exists():
            return f"{key}: data file {p} does not exist"
        if not p.is_file():
            return f"{key}={p}: is a directory, expected a {''.join(s for s in p.suffixes)} file"
        return None
    if p.is_dir():
        if (p / "state.json").is_file() or (p / "dataset_dict.json").is_file() or shard_files(p):
            return None
        return (
            f"{key}={p}: a folder with no index.json, state.json or data files; expected an mmap prefix "
            f"(P.bin/.idx), a WebDataset folder (index.json), a save_to_disk folder or a folder of "
            f"{'/'.join('*' + s for s in SHARD_SUFFIXES)} files"
        )
    has_idx, has_bin = Path(f"{p}.idx").exists(), Path(f"{p}.bin").exists()
    if not has_idx and not has_bin and is_hub_id(path):
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false")
        if hub_cache_has(path):
            return None
        if offline:
            return (
                f"{key}={p}: no mmap prefix ({p}.bin/.idx) and no hub dataset {p} in the local cache "
                "(HF_HUB_OFFLINE=1); load the dataset once with network access, or give a path"
            )
        if not p.parent.is_dir():  # "data/train" with a local data/ folder is a prefix that is not converted yet
            return None  # a hub id the ranks will download
    if not has_idx:
        hint = "" if has_bin else " (no .bin either)"
        return (
            f"{key}={p}: expected an mmap prefix ({p}.bin/.idx{hint}), an index.json, a data file "
            "(.jsonl/.json/.gz/.parquet/.arrow/.csv), a datasets folder or a hub dataset id"
        )
    if not Path(f"{p}.bin").exists():
        return f"{key}={p}: {p}.idx exists but {p}.bin does not; re-run the conversion"
    return None


def output_dir_problem(path: str, key: str = "output_dir") -> str | None:
    """Why the run cannot write into ``path``, or None (the nearest existing ancestor must be a writable folder)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        return f"{key}={p} exists and is a file; choose a directory (checkpoints/ and final/ are written inside it)"
    existing = p
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{key}={p}: {existing} is a file, so the directory cannot be created; choose another path"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{key}={p}: {existing} is not writable by this user; choose a directory you can write"
    return None


def read_model_config(name_or_path: str) -> dict | None:
    """The model's ``config.json`` as a dict: from a local folder, or from the local hub cache for a hub id; None when
    it is not on this machine (the ranks will download it). Reads JSON only, never imports transformers."""
    import json

    local = Path(name_or_path).expanduser()
    candidate = local / "config.json" if local.is_dir() else None
    if candidate is None and not local.exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name_or_path, "config.json")
            candidate = Path(cached) if isinstance(cached, str) else None
        except Exception as e:  # an id huggingface_hub rejects (e.g. 'a/b/c') is a path the user mistyped
            logger.debug("not a hub id: %s (%s)", name_or_path, e)
    if candidate is None or not candidate.is_file():
        return None
    try:
        return json.loads(candidate.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PreflightError(f"{candidate}: cannot read the model config ({e})") from e


def position_limit(model_config: dict) -> tuple[int, str] | None:
    """(the longest row the model can embed, why) from its config, or None when it sets no bound."""
    for key in POSITION_KEYS:
        value = model_config.get(key)
        if isinstance(value, int) and value > 0:
            scaling = model_config.get("rope_scaling") or {}
            factor = scaling.get("factor") if isinstance(scaling, dict) else None
            # With rope_scaling.original_max_position_embeddings the config's own value is already the extended one.
            if isinstance(factor, int | float) and factor > 1 and "original_max_position_embeddings" not in scaling:
                return int(value * factor), f"{key}={value} x rope_scaling.factor={factor}"
            return value, f"{key}={value}"
    return None


def check_before_launch(cfg) -> None:
    """Everything about ``cfg`` that the files and the model's ``config.json`` can answer, in seconds.

    Checks: ``output_dir`` can be a directory; ``data.train``/``data.eval`` exist as data the loader reads;
    ``model.name_or_path`` is a model folder or a hub id; ``data.seq_len`` (plus the method's virtual tokens) fits the
    model's positions; custom modelling code needs ``model.trust_remote_code``; an explicit ``method.lora.target_modules``
    names modules of the model.

    Raises:
        ConfigError: ``KEY ...: what is wrong and what to do``.
    """
    from finetune.config import ConfigError

    problems = [output_dir_problem(cfg.output_dir)]
    for key, value in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        if isinstance(value, list):  # a mixture: every item, named data.train[i], then their tokenizers agree
            problems += [data_path_problem(item.path, f"{key}[{i}]") for i, item in enumerate(value)]
            problems.append(_mixture_tokenizer_problem(key, value))
        elif value:
            problems.append(data_path_problem(value, key))
    if cfg.data.cache_dir:
        problems.append(output_dir_problem(cfg.data.cache_dir, "data.cache_dir"))
    for problem in problems:
        if problem:
            raise ConfigError(problem)
    name = cfg.model.name_or_path
    local = Path(name).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise ConfigError(
            f"model.name_or_path={name}: {'no config.json in this folder' if local.is_dir() else 'is a file'}; give "
            "a folder written by save_pretrained (config.json, weights, tokenizer) or a hub id"
        )
    if not local.exists() and (name.startswith(("/", "./", "../", "~")) or name.count("/") > 1):
        raise ConfigError(f"model.name_or_path={name}: no such folder (and not a hub id 'org/name')")
    try:
        model_config = read_model_config(name)
    except PreflightError as e:
        raise ConfigError(f"model.name_or_path={name}: {e}") from e
    if model_config is None:
        return  # a hub id not yet downloaded: the ranks fetch it, and the checks below run in the engine
    if model_config.get("auto_map") and not cfg.model.trust_remote_code:
        raise ConfigError(
            f"model.name_or_path={name} ships its own modelling code (auto_map in config.json): set "
            "model.trust_remote_code=true if you trust that repository"
        )
    _check_positions(cfg, model_config)
    _check_lora_targets(cfg, name)


def _mixture_tokenizer_problem(key: str, items: list) -> str | None:
    """Items of one mixture that are already converted (an mmap prefix with its meta, an index.json) and disagree on
    the tokenizer; raw items are compared after their conversion (``finetune.data.check_sources``)."""
    from data_tools.meta import meta_path
    from finetune.data import is_raw, tokenizer_mismatch

    converted = []
    for i, item in enumerate(items):
        p = Path(item.path)
        src = str(p / "index.json") if p.is_dir() and (p / "index.json").is_file() else item.path
        if not is_raw(item.path) and (src.endswith(".json") or meta_path(src).is_file()):
            converted.append((f"{key}[{i}]={item.path}", src))
    return tokenizer_mismatch(converted)


def _virtual_tokens(cfg) -> int:
    """Virtual tokens the method puts before every row (they take positions too)."""
    section = getattr(cfg.method, cfg.method.name, None)
    return int(getattr(section, "num_virtual_tokens", 0) or 0)


def _check_positions(cfg, model_config: dict) -> None:
    from finetune.config import ConfigError

    limit = position_limit(model_config)
    if limit is None:
        return
    most, why = limit
    virtual = _virtual_tokens(cfg)
    if cfg.data.seq_len + virtual <= most:
        return
    needed = f"data.seq_len={cfg.data.seq_len}" + (
        f" + {virtual} virtual tokens (method.{cfg.method.name})" if virtual else ""
    )
    if model_config.get("model_type") in LEARNED_POSITIONS:
        fix = f"set data.seq_len <= {most - virtual}: its position table has {most} rows"
    else:
        fix = (
            f"set data.seq_len <= {most - virtual}, or extend the model's context first (rope_scaling in its "
            "config.json): positions past it were never trained"
        )
    raise ConfigError(f"{needed} exceeds what {cfg.model.name_or_path} embeds ({why}); {fix}")


def _check_lora_targets(cfg, name: str) -> None:
    """An explicit target list must name modules of the model: PEFT would only say so inside every rank, after the
    launch. The model is built on the meta device (nothing allocated) and matched with PEFT's rule for a list of
    names: a module matches ``t`` when its name is ``t`` or ends with ``.t``."""
    from finetune.config import ConfigError

    targets = cfg.method.lora.target_modules
    if cfg.method.name not in ("lora", "qlora") or isinstance(targets, str):
        return
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(name, trust_remote_code=cfg.model.trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    names = [n for n, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m.__class__.__name__ == "Linear"})
        raise ConfigError(
            f"method.lora.target_modules={targets}: no module of {name} is called {', '.join(missing)} (its linear "
            f"layers: {', '.join(linears)}); use those names or all-linear"
        )
