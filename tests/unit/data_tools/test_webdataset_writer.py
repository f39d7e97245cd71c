import json

import numpy as np
import pytest
import webdataset as wds

from data_tools.convert import ConversionError, convert
from data_tools.indexed import IndexedDataset
from data_tools.webdataset_writer import INDEX_FORMAT, WebDatasetWriter, read_index


def _read_shards(folder, index):
    urls = [str(folder / s["path"]) for s in index["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False).decode())


def test_sft_conversion_shards_read_back_with_webdataset(tmp_path, tiny_tokenizer):
    records = [
        {"instruction": f"Add {i} and {i}", "input": "", "output": str(2 * i), "system": "Be exact."} for i in range(23)
    ]
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    # Two workers: the SFT path through worker processes too.
    res = convert(
        src, tmp_path / "a", tiny_tokenizer, webdataset_dir=tmp_path / "wds", shard_size=10, workers=2, progress=False
    )
    index = read_index(tmp_path / "wds")
    assert index["format"] == INDEX_FORMAT and index["has_loss_mask"] is True and index["total_samples"] == 23
    assert index["shards"] == [
        {"path": "shard-000000.tar", "samples": 10},
        {"path": "shard-000001.tar", "samples": 10},
        {"path": "shard-000002.tar", "samples": 3},
    ]
    assert index["meta"] == res.meta
    assert sorted(p.name for p in (tmp_path / "wds").iterdir()) == ["index.json"] + [s["path"] for s in index["shards"]]
    samples = _read_shards(tmp_path / "wds", index)
    ds, mask = IndexedDataset(tmp_path / "a"), IndexedDataset(tmp_path / "a_loss_mask")
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(23)]
    for i, s in enumerate(samples):
        assert s["input_ids.npy"].dtype == np.int32 and s["loss_mask.npy"].dtype == np.uint8
        assert s["input_ids.npy"].tolist() == ds[i].tolist() and s["loss_mask.npy"].tolist() == mask[i].tolist()


def test_webdataset_only_text_output(tmp_path, tiny_tokenizer):
    src = tmp_path / "t.jsonl"
    src.write_text("".join(json.dumps({"text": f"fox {i}"}) + "\n" for i in range(5)))
    res = convert(src, None, tiny_tokenizer, webdataset_dir=tmp_path / "w", progress=False, append_eod=True)
    assert res.output_prefix is None and not list(tmp_path.glob("*.bin"))
    index = read_index(tmp_path / "w")
    assert index["has_loss_mask"] is False and index["shards"] == [{"path": "shard-000000.tar", "samples": 5}]
    samples = _read_shards(tmp_path / "w", index)
    eod = tiny_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert [s["input_ids.npy"].tolist() for s in samples] == [
        tiny_tokenizer(f"fox {i}")["input_ids"] + [eod] for i in range(5)
    ]
    assert all("loss_mask.npy" not in s for s in samples)


def test_rerun_replaces_old_shards_and_failure_leaves_them(tmp_path, tiny_tokenizer):
    src = tmp_path / "t.jsonl"
    src.write_text("".join(json.dumps({"text": f"fox {i}"}) + "\n" for i in range(6)))
    convert(src, None, tiny_tokenizer, webdataset_dir=tmp_path / "w", shard_size=2, progress=False)
    assert len(read_index(tmp_path / "w")["shards"]) == 3
    convert(src, None, tiny_tokenizer, webdataset_dir=tmp_path / "w", shard_size=4, progress=False)
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["index.json", "shard-000000.tar", "shard-000001.tar"]
    before = {p.name: p.read_bytes() for p in (tmp_path / "w").iterdir()}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": null}\n')
    with pytest.raises(ConversionError, match="bad.jsonl:2"):
        convert(bad, None, tiny_tokenizer, webdataset_dir=tmp_path / "w", shard_size=1, progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "w").iterdir()} == before


def test_writer_checks_mask_presence_and_length(tmp_path):
    w = WebDatasetWriter(tmp_path / "new", shard_size=2, has_loss_mask=True)
    with pytest.raises(ValueError, match="loss_mask must be given"):
        w.write(np.array([1, 2]))
    with pytest.raises(ValueError, match="1 entries for 2 tokens"):
        w.write(np.array([1, 2]), np.array([1], dtype=np.uint8))
    w.abort()
    assert not (tmp_path / "new").exists()
