import struct

import numpy as np
import pytest

from data_tools import indexed


def _build(prefix, docs, dtype=np.uint16):
    b = indexed.IndexedDatasetBuilder(prefix, dtype)
    for d in docs:
        b.add_document(d)
    b.finalize()
    return indexed.IndexedDataset(prefix)


def test_round_trip_and_idx_size(tmp_path):
    docs = [[1, 2, 3], [4], list(range(100))]
    ds = _build(tmp_path / "d", docs)
    assert [list(ds[i]) for i in range(len(ds))] == docs
    size = (tmp_path / "d.idx").stat().st_size
    assert size == 34 + 12 * 3 + 8 * 4
    raw = (tmp_path / "d.idx").read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00" and struct.unpack("<Q", raw[9:17])[0] == 1 and raw[17] == 8
    assert list(ds.doc_idx) == [0, 1, 2, 3]
    assert ds.num_tokens == 104


def test_large_vocab_uses_int32(tmp_path):
    assert indexed.token_dtype_for_vocab(151_646) == np.int32
    assert indexed.token_dtype_for_vocab(65_536) == np.uint16
    ds = _build(tmp_path / "q", [[151_000, 70_000, 5]], indexed.token_dtype_for_vocab(151_646))
    assert ds.dtype == np.int32 and list(ds[0]) == [151_000, 70_000, 5]
    assert (tmp_path / "q.idx").read_bytes()[17] == 4


def test_id_overflow_rejected(tmp_path):
    b = indexed.IndexedDatasetBuilder(tmp_path / "o", np.uint16)
    with pytest.raises(ValueError, match="out of range"):
        b.add_item([70_000])
    b.abort()
    assert not (tmp_path / "o.bin").exists()


def test_merge(tmp_path):
    _build(tmp_path / "a", [[1, 2], [3]])
    _build(tmp_path / "b", [[4, 5, 6]])
    m = indexed.merge([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    assert [list(m[i]) for i in range(len(m))] == [[1, 2], [3], [4, 5, 6]]
    assert list(m.doc_idx) == [0, 1, 2, 3]


def test_truncated_files_detected(tmp_path):
    _build(tmp_path / "t", [[1, 2, 3], [4, 5]])
    with open(tmp_path / "t.bin", "r+b") as fh:
        fh.truncate(4)
    with pytest.raises(indexed.IndexedDatasetError, match="truncated"):
        indexed.IndexedDataset(tmp_path / "t")
    _build(tmp_path / "u", [[1, 2, 3]])
    with open(tmp_path / "u.idx", "r+b") as fh:
        fh.truncate(40)
    with pytest.raises(indexed.IndexedDatasetError, match="truncated or corrupt"):
        indexed.IndexedDataset(tmp_path / "u")
    with pytest.raises(indexed.IndexedDatasetError, match="not found"):
        indexed.IndexedDataset(tmp_path / "missing")
