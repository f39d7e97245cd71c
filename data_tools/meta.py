"""``{prefix}.meta.json``: what a converted dataset is and which tokenizer produced it.

Training on ids from another tokenizer trains on garbage without any error, so the engine and the loader call
:func:`check_meta_matches_tokenizer` before reading a converted dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

META_VERSION = 1


class MetaError(ValueError):
    """The meta file is missing/unreadable, or the data was converted with another tokenizer."""


def meta_path(prefix: str | os.PathLike) -> Path:
    """Path of the meta file of an output prefix: ``{prefix}.meta.json``."""
    return Path(f"{prefix}.meta.json")


def vocab_hash(tokenizer) -> str:
    """sha256 over the sorted vocabulary (``token<TAB>id`` lines, added tokens included).

    Ids are part of the hash: the same tokens under other ids are another tokenizer for the model.
    """
    # One update over the joined lines: the same digest as one update per line, ~5x faster on a 151k vocabulary.
    lines = "".join(f"{token}\t{idx}\n" for token, idx in sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(lines.encode("utf-8", "surrogatepass")).hexdigest()


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    """Identity of a tokenizer as recorded in the meta.

    Args:
        tokenizer: a Hugging Face tokenizer.

    Returns:
        ``{"name": name_or_path, "vocab_hash": sha256 of the sorted vocab, "vocab_size": len(tokenizer)}``.
    """
    return {
        "name": str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
        "vocab_hash": vocab_hash(tokenizer),
        "vocab_size": len(tokenizer),
    }


def write_meta(prefix: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Write ``{prefix}.meta.json`` atomically (temp file + rename) and return its path."""
    path = meta_path(prefix)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_meta(prefix: str | os.PathLike) -> dict[str, Any]:
    """Load ``{prefix}.meta.json``.

    Raises:
        MetaError: the file is missing or not valid JSON.
    """
    path = meta_path(prefix)
    if not path.is_file():
        raise MetaError(f"{path}: not found; convert the data with python -m data_tools.convert (it writes this file)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MetaError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); re-run the conversion") from exc


def check_meta_matches_tokenizer(
    prefix: str | os.PathLike, tokenizer, missing_ok: bool = False
) -> dict[str, Any] | None:
    """Fail loudly when ``prefix`` was converted with a tokenizer other than ``tokenizer``.

    The vocabulary hash decides; the name may differ (the same tokenizer saved in another folder).

    Args:
        prefix: output prefix of a conversion.
        tokenizer: the tokenizer the training run uses.
        missing_ok: return None instead of raising when there is no meta file (e.g. data converted by Megatron-LM).

    Returns:
        The meta dict (None when missing and ``missing_ok``).

    Raises:
        MetaError: no meta (unless ``missing_ok``), or the data's tokenizer differs.
    """
    if missing_ok and not meta_path(prefix).is_file():
        return None
    meta = read_meta(prefix)
    recorded = meta.get("tokenizer") or {}
    current = tokenizer_fingerprint(tokenizer)
    if recorded.get("vocab_hash") != current["vocab_hash"]:
        raise MetaError(
            f"{meta_path(prefix)}: the data was converted with tokenizer {recorded.get('name')!r} "
            f"(vocab {recorded.get('vocab_size')}, hash {str(recorded.get('vocab_hash'))[:12]}) but this run uses "
            f"{current['name']!r} (vocab {current['vocab_size']}, hash {current['vocab_hash'][:12]}); "
            f"re-convert with --tokenizer {current['name']}"
        )
    return meta
