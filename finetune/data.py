"""From ``data.train`` / ``data.eval`` to sources the loader can read, checked against the tokenizer and model.

``resolve_data`` converts a raw .jsonl/.json once into a cache (main rank; the others wait) and passes mmap
prefixes and WebDataset indexes through; ``check_sources`` runs ``finetune.preflight`` on the main rank and makes
every rank raise the same ``ConfigError``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from finetune import distributed as dist
from finetune.config import Config, ConfigError


def resolve_data(path: str, cfg: Config, tokenizer) -> str:
    """Turn ``data.train``/``data.eval`` into what the loader reads; convert a raw .jsonl/.json once.

    Raw files are converted on the main rank into ``data.cache_dir`` (default ``output_dir/data_cache``) under a
    name keyed by the file's size/mtime and the tokenizer, while the other ranks wait at a barrier; a later run
    reuses the cache.
    """
    from data_tools.meta import vocab_hash

    p = Path(path)
    if p.name == "index.json":  # WebDataset shards: the loader checks them
        return str(p)
    if p.suffix in (".jsonl", ".json"):
        if not p.exists():
            raise ConfigError(f"data file {p} does not exist")
        st = p.stat()
        key = (
            f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}|{vocab_hash(tokenizer)}|{cfg.data.format}|{cfg.data.seq_len}"
        )
        cache = Path(cfg.data.cache_dir or Path(cfg.output_dir) / "data_cache")
        prefix = cache / f"{p.stem}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
        options = dict(fmt=cfg.data.format, max_length=cfg.data.seq_len, over_length="truncate")
        from data_tools.convert import convert, is_conversion_current

        # The meta is written last by convert(): checking it (not just the .idx) means a conversion killed between
        # its renames is redone instead of trained on.
        if dist.is_main() and not is_conversion_current(prefix, [p], tokenizer, **options):
            cache.mkdir(parents=True, exist_ok=True)
            print(f"[dsft] converting {p} -> {prefix} (once; cached for later runs)", flush=True)
            convert([p], prefix, tokenizer, **options)
        dist.barrier()
        return str(prefix)
    if not Path(f"{p}.idx").exists():
        raise ConfigError(f"data path {p}: expected an mmap prefix ({p}.bin/.idx), an index.json or a .jsonl file")
    return str(p)  # checked against the tokenizer and the model by check_sources


def check_sources(sources: list[str | None], tokenizer, vocab_size: int) -> None:
    """Data vs model checks (tokenizer hash, ids < vocab, intact files) on the main rank; every rank raises."""
    from finetune.preflight import PreflightError, check_training_data

    error = None
    if dist.is_main():
        try:
            for src in filter(None, sources):
                check_training_data(src, tokenizer, vocab_size)
        except PreflightError as e:
            error = str(e)
    error = dist.broadcast_object(error)  # the other ranks would otherwise wait forever in the next collective
    if error:
        raise ConfigError(error)
