"""WebDataset output of a conversion: tar shards written by ``webdataset.ShardWriter`` plus ``index.json``.

Contract read by the loader::

    DIR/shard-000000.tar, shard-000001.tar, ...   one sample = __key__ (9-digit global index),
                                                  input_ids.npy (int32), loss_mask.npy (uint8, same length; SFT only)
    DIR/index.json  {"format": "dsft-webdataset/1",
                     "shards": [{"path": "shard-000000.tar", "samples": N}, ...],   # paths relative to index.json
                     "total_samples": N, "has_loss_mask": bool, "meta": {...same content as meta.json...}}

Shards are written into a hidden temp folder inside DIR and moved into place at :meth:`WebDatasetWriter.close`
(``index.json`` last), so a failed conversion leaves no shard under a final name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

INDEX_FORMAT = "dsft-webdataset/1"
INDEX_NAME = "index.json"
SHARD_PATTERN = "shard-%06d.tar"


class WebDatasetWriter:
    """Streams samples into shards of ``shard_size`` samples each.

    Args:
        out_dir: destination folder (created; previous ``shard-*.tar`` / ``index.json`` there are replaced).
        shard_size: samples per shard.
        has_loss_mask: whether every sample carries a loss mask (SFT formats).
    """

    def __init__(self, out_dir: str | os.PathLike, shard_size: int = 10_000, has_loss_mask: bool = False):
        import webdataset as wds

        if shard_size < 1:
            raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self._created_dir = not self.out_dir.exists()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.has_loss_mask = has_loss_mask
        self._tmp = Path(tempfile.mkdtemp(prefix=".dsft-wds-tmp-", dir=self.out_dir))
        # maxsize is effectively off so that shards split on sample counts only: every rank/worker split is even.
        self._writer = wds.ShardWriter(
            str(self._tmp / SHARD_PATTERN), maxcount=shard_size, maxsize=float(1 << 50), verbose=0
        )
        self._counts: dict[str, int] = {}
        self.total = 0

    def write(self, input_ids: np.ndarray, loss_mask: np.ndarray | None = None) -> None:
        """Append one sample; its key is its global index."""
        if self.has_loss_mask != (loss_mask is not None):
            raise ValueError("loss_mask must be given for every sample exactly when has_loss_mask=True")
        sample = {"__key__": f"{self.total:09d}", "input_ids.npy": np.asarray(input_ids, dtype=np.int32)}
        if loss_mask is not None:
            if len(loss_mask) != len(input_ids):
                raise ValueError(f"loss_mask has {len(loss_mask)} entries for {len(input_ids)} tokens")
            sample["loss_mask.npy"] = np.asarray(loss_mask, dtype=np.uint8)
        self._writer.write(sample)
        self._counts[Path(self._writer.fname).name] = self._writer.count
        self.total += 1

    def close(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Finish the shards, move them into ``out_dir``, write ``index.json``; returns the index."""
        self._writer.close()
        shards = [{"path": name, "samples": n} for name, n in sorted(self._counts.items())]
        index = {
            "format": INDEX_FORMAT,
            "shards": shards,
            "total_samples": self.total,
            "has_loss_mask": self.has_loss_mask,
            "meta": meta,
        }
        # Old outputs go first (index.json before its shards) so no index ever lists a shard of another run.
        (self.out_dir / INDEX_NAME).unlink(missing_ok=True)
        for old in self.out_dir.glob("shard-*.tar"):
            old.unlink()
        for shard in shards:
            os.replace(self._tmp / shard["path"], self.out_dir / shard["path"])
        tmp_index = self._tmp / INDEX_NAME
        tmp_index.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp_index, self.out_dir / INDEX_NAME)
        shutil.rmtree(self._tmp)  # holds at most the empty first shard ShardWriter opens when there are no samples
        return index

    def abort(self) -> None:
        """Drop everything written so far (a failed conversion)."""
        try:
            self._writer.close()
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)
            if self._created_dir and not any(self.out_dir.iterdir()):
                self.out_dir.rmdir()


def read_index(out_dir: str | os.PathLike) -> dict[str, Any]:
    """Load ``DIR/index.json`` and check its format tag."""
    path = Path(out_dir) / INDEX_NAME
    index = json.loads(path.read_text(encoding="utf-8"))
    if index.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path}: format {index.get('format')!r}, expected {INDEX_FORMAT!r}")
    return index
