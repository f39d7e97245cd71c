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
    from data_tools.indexed import IndexedDataset, IndexedDatasetError
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
        mask_prefix = Path(f"{path}_loss_mask")
        if Path(f"{mask_prefix}.idx").exists():
            mask = IndexedDataset(mask_prefix)
            if len(mask) != len(ds) or not np.array_equal(mask.sizes, ds.sizes):
                raise PreflightError(
                    f"{mask_prefix}.idx: {len(mask)} loss-mask sequences do not line up with the {len(ds)} token "
                    f"sequences of {path}.idx; re-run the conversion"
                )
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
