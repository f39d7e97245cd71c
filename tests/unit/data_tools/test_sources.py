"""Inputs through ``datasets``: every kind gives the tokens of the same records in jsonl; bad inputs fail by name
and leave nothing under the final names; --columns, prompt_completion, the fast tokenizer path and the cache key."""

from __future__ import annotations

import glob
import gzip
import json
import os
import shutil

import numpy as np
import pytest

from data_tools import indexed
from data_tools.convert import ConversionError, convert, is_conversion_current, main
from data_tools.indexed import IndexedDataset
from data_tools.meta import meta_path, vocab_hash

# An empty "input" becomes a null in csv: the alpaca format reads it as no input, so csv agrees with jsonl.
RECORDS = [
    {"instruction": "Add 2 and 3", "input": "", "output": "5"},
    {"instruction": "Reverse", "input": "banana", "output": "ananab"},
    {"instruction": "Name a colour", "input": "", "output": "blue"},
    {"instruction": "Count to three", "input": "slowly", "output": "one, two, three"},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _tokens(prefix) -> list[tuple[list[int], list[int] | None]]:
    ds = IndexedDataset(prefix)
    mask = indexed.check_loss_mask_aligned(prefix, ds)
    return [(ds[i].tolist(), mask[i].tolist() if mask is not None else None) for i in range(len(ds))]


def _nothing_left(folder, name: str) -> None:
    """No final file and no temporary file of the conversion ``name`` in ``folder``."""
    left = sorted(os.path.basename(p) for p in glob.glob(str(folder / f"{name}*")))
    assert left == [], left


def make_hub_cache(root, dataset_id: str, splits: dict[str, list[dict]], monkeypatch) -> None:
    """Put ``dataset_id`` into a fresh ``datasets`` cache the way ``load_dataset`` leaves a hub dataset, offline.

    The json builder prepares the splits; the prepared folder is moved to ``namespace___name/default/...`` with
    its Arrow files named after the dataset, which is where ``load_dataset(id)`` looks when the hub is offline.
    """
    import datasets

    files = {name: str(_jsonl(root / f"{name}.jsonl", rows)) for name, rows in splits.items()}
    builder = datasets.load_dataset_builder("json", data_files=files, cache_dir=str(root / "build"))
    builder.download_and_prepare()
    namespace, name = dataset_id.split("/")
    version_and_hash = os.path.relpath(builder.cache_dir, root / "build").split(os.sep)[2:]
    cache = root / "hf_datasets"
    target = cache / f"{namespace}___{name}" / "default" / os.path.join(*version_and_hash)
    shutil.copytree(builder.cache_dir, target)
    for arrow in glob.glob(str(target / "json-*.arrow")):
        os.rename(arrow, arrow.replace(f"{os.sep}json-", f"{os.sep}{name}-"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _write_kind(kind: str, tmp_path, rows, monkeypatch) -> tuple[list[str], dict]:
    """The records as one input of ``kind``; returns (inputs, extra convert options)."""
    import datasets
    import pyarrow as pa

    if kind == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
        return [str(tmp_path / "d.parquet")], {}
    if kind == "arrow":  # Arrow IPC stream format, as datasets writes it
        table = pa.Table.from_pylist(rows)
        with pa.ipc.new_stream(str(tmp_path / "d.arrow"), table.schema) as writer:
            writer.write_table(table)
        return [str(tmp_path / "d.arrow")], {}
    if kind == "csv":
        datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "d.csv"), index=False)
        return [str(tmp_path / "d.csv")], {}
    if kind in ("jsonl.gz", "json.gz"):
        text = json.dumps(rows) if kind == "json.gz" else "".join(json.dumps(r) + "\n" for r in rows)
        path = tmp_path / f"d.{kind}"
        path.write_bytes(gzip.compress(text.encode()))
        return [str(path)], {}
    if kind == "save_to_disk":
        datasets.DatasetDict(
            {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])}
        ).save_to_disk(str(tmp_path / "saved"))
        return [str(tmp_path / "saved")], {"split": "train"}
    if kind == "shards":
        (tmp_path / "shards").mkdir()
        datasets.Dataset.from_list(rows[:3]).to_parquet(str(tmp_path / "shards" / "part-0.parquet"))
        _jsonl(tmp_path / "shards" / "part-1.jsonl", rows[3:])
        return [str(tmp_path / "shards")], {}
    assert kind == "hub"
    make_hub_cache(tmp_path, "dsft-test/tiny", {"train": rows, "test": rows[:1]}, monkeypatch)
    return ["dsft-test/tiny"], {"split": "train"}


KINDS = ("parquet", "arrow", "csv", "jsonl.gz", "json.gz", "save_to_disk", "shards", "hub")


@pytest.mark.parametrize("kind", KINDS)
def test_each_input_kind_gives_the_tokens_of_the_same_records_in_jsonl(kind, tmp_path, tiny_tokenizer, monkeypatch):
    reference = convert(_jsonl(tmp_path / "ref.jsonl", RECORDS), tmp_path / "ref", tiny_tokenizer, progress=False)
    inputs, extra = _write_kind(kind, tmp_path, RECORDS, monkeypatch)
    res = convert(inputs, tmp_path / "out", tiny_tokenizer, progress=False, **extra)
    assert res.meta["format"] == "alpaca" and res.meta["counts"]["documents"] == len(RECORDS)
    assert _tokens(tmp_path / "out") == _tokens(tmp_path / "ref")
    assert res.meta["counts"]["tokens"] == reference.meta["counts"]["tokens"]
    assert all(s["fingerprint"] for s in res.meta["sources"])
    # The cache check of resolve_data: the same input is current, another split is not.
    assert is_conversion_current(tmp_path / "out", inputs, tiny_tokenizer, **extra)
    if kind in ("save_to_disk", "hub"):
        assert not is_conversion_current(tmp_path / "out", inputs, tiny_tokenizer, split="test")


def _fails(match: str, tmp_path, inputs, tokenizer, **options) -> str:
    with pytest.raises(ConversionError, match=match) as err:
        convert(inputs, tmp_path / "out" / "final", tokenizer, progress=False, **options)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    return str(err.value)


def test_a_missing_column_names_the_file_and_the_flag(tmp_path, tiny_tokenizer):
    import datasets

    path = tmp_path / "qa.parquet"
    datasets.Dataset.from_list([{"question": "2+3?", "answer": "5"}] * 3).to_parquet(str(path))
    message = _fails(r'qa.parquet: no column "instruction"', tmp_path, [path], tiny_tokenizer, fmt="alpaca")
    assert "(columns: question, answer); rename one with --columns instruction=COLUMN" in message
    _fails(r"qa.parquet:1: cannot detect the format .*--columns new=old", tmp_path, [path], tiny_tokenizer)
    _fails(r'--columns prompt=q: no column "q"', tmp_path, [path], tiny_tokenizer, columns="prompt=q")


def test_a_wrong_type_in_one_row_names_file_and_row(tmp_path, tiny_tokenizer):
    import datasets

    rows = [dict(r) for r in RECORDS]
    rows[2]["output"] = None  # a null in one row of a string column
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    _fails(
        r'd.parquet:3: key "output" must be a string, got null \(format alpaca\); use --on-error skip',
        tmp_path,
        [tmp_path / "d.parquet"],
        tiny_tokenizer,
    )
    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"text": "fine"}\n{"text": 5}\n'))
    _fails(r'd.jsonl.gz:2: key "text" must be a string, got int', tmp_path, [gz], tiny_tokenizer, fmt="text")


def test_an_empty_file_is_refused(tmp_path, tiny_tokenizer):
    (tmp_path / "e.csv").write_text("")
    _fails(r"e.csv: empty file \(0 bytes\); nothing to convert", tmp_path, [tmp_path / "e.csv"], tiny_tokenizer)
    (tmp_path / "e.jsonl.gz").write_bytes(gzip.compress(b""))
    _fails(r"e.jsonl.gz: no records; nothing to convert", tmp_path, [tmp_path / "e.jsonl.gz"], tiny_tokenizer)


def test_an_unknown_split_names_the_splits_and_the_flag(tmp_path, tiny_tokenizer, monkeypatch):
    make_hub_cache(tmp_path, "dsft-test/tiny", {"train": RECORDS, "test": RECORDS[:1]}, monkeypatch)
    _fails(
        r"dsft-test/tiny\[validation\]: unknown split 'validation' .*\['train', 'test'\].*; pass --split NAME",
        tmp_path,
        ["dsft-test/tiny"],
        tiny_tokenizer,
        split="validation",
    )
    _fails(r"dsft-test/nope: hub dataset not in the local datasets cache", tmp_path, ["dsft-test/nope"], tiny_tokenizer)
    inputs, _ = _write_kind("save_to_disk", tmp_path, RECORDS, monkeypatch)
    _fails(
        r"saved: no --split, but a save_to_disk DatasetDict has splits \['train', 'test'\]",
        tmp_path,
        inputs,
        tiny_tokenizer,
    )


def test_a_corrupt_parquet_names_the_file(tmp_path, tiny_tokenizer):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1" + b"\x00garbage" * 50)
    _fails(
        r"bad.parquet: cannot read it as parquet \(ArrowInvalid", tmp_path, [tmp_path / "bad.parquet"], tiny_tokenizer
    )


def test_columns_rename_before_detection_and_prompt_completion_is_a_format(tmp_path, tiny_tokenizer):
    import datasets

    qa = [{"question": r["instruction"], "answer": r["output"], "id": n} for n, r in enumerate(RECORDS)]
    datasets.Dataset.from_list(qa).to_parquet(str(tmp_path / "qa.parquet"))
    _jsonl(tmp_path / "qa.jsonl", qa)
    alpaca = [{"instruction": r["instruction"], "output": r["output"]} for r in RECORDS]
    convert(_jsonl(tmp_path / "a.jsonl", alpaca), tmp_path / "alpaca", tiny_tokenizer, progress=False)
    for src, workers in (("qa.parquet", 1), ("qa.jsonl", 2)):  # renames in the reader and in the workers
        res = convert(
            tmp_path / src,
            tmp_path / src,
            tiny_tokenizer,
            columns="prompt=question,completion=answer",
            workers=workers,
            progress=False,
        )
        assert res.meta["format"] == "prompt_completion" and res.meta["columns"] == {
            "prompt": "question",
            "completion": "answer",
        }
        assert res.meta["ignored_fields"] == {"id": len(RECORDS)}
        # A string prompt/completion is one user and one assistant turn: the tokens and mask of alpaca.
        assert _tokens(tmp_path / src) == _tokens(tmp_path / "alpaca")
    conversational = [
        {
            "prompt": [{"role": "user", "content": r["instruction"]}],
            "completion": [{"role": "assistant", "content": r["output"]}],
        }
        for r in RECORDS
    ]
    convert(_jsonl(tmp_path / "pc.jsonl", conversational), tmp_path / "pc", tiny_tokenizer, progress=False)
    assert _tokens(tmp_path / "pc") == _tokens(tmp_path / "alpaca")


def test_nested_nulls_from_arrow_are_absent_keys(tmp_path, tiny_tokenizer):
    """A parquet of messages where only some turns have loss_weight: Arrow fills the others with null."""
    import datasets

    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "loss_weight": 1}]},
        {"messages": [{"role": "user", "content": "yo"}, {"role": "assistant", "content": "hey"}]},
    ]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "m.parquet"))
    convert(_jsonl(tmp_path / "m.jsonl", rows), tmp_path / "ref", tiny_tokenizer, progress=False)
    convert(tmp_path / "m.parquet", tmp_path / "out", tiny_tokenizer, progress=False)
    assert _tokens(tmp_path / "out") == _tokens(tmp_path / "ref")


def test_cli_reads_parquet_with_columns(tmp_path, tiny_tokenizer_dir, capsys):
    import datasets

    datasets.Dataset.from_list([{"body": f"document number {i}"} for i in range(5)]).to_parquet(
        str(tmp_path / "t.parquet")
    )
    argv = ["--input", str(tmp_path / "t.parquet"), "--output-prefix", str(tmp_path / "t"), "--no-progress"]
    assert main([*argv, "--tokenizer", str(tiny_tokenizer_dir), "--columns", "text=body"]) == 0
    assert "5 documents" in capsys.readouterr().out and meta_path(tmp_path / "t").is_file()
    assert main([*argv, "--tokenizer", str(tiny_tokenizer_dir), "--subset", "x"]) == 1
    assert "--subset x applies to hub dataset ids only" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- fast tokenizer path
def test_text_with_a_tokenizer_folder_skips_transformers_and_gives_the_same_ids(
    tmp_path, tiny_tokenizer, tiny_tokenizer_dir, monkeypatch
):
    from data_tools import rust_tokenizer

    monkeypatch.setenv("DSFT_CACHE_DIR", str(tmp_path / "cache"))
    texts = [{"text": t} for t in ("Hello world", "  spaces  ", "<|im_end|> special", "café 日本 123")] * 5
    src = _jsonl(tmp_path / "t.jsonl", texts)
    convert(src, tmp_path / "slow", tiny_tokenizer, append_eod=True, progress=False)  # a loaded tokenizer
    compared = []
    real_compare = rust_tokenizer.AgreementCheck.compare

    def spy(self, probe):
        compared.append(len(probe))
        return real_compare(self, probe)

    monkeypatch.setattr(rust_tokenizer.AgreementCheck, "compare", spy)
    for workers in (2, 1):
        res = convert(
            src, tmp_path / f"fast{workers}", str(tiny_tokenizer_dir), append_eod=True, workers=workers, progress=False
        )
        assert _tokens(tmp_path / f"fast{workers}") == _tokens(tmp_path / "slow")
        assert res.meta["tokenizer"]["vocab_hash"] == vocab_hash(tiny_tokenizer)
    assert compared == [len(texts)]  # checked once (the input's texts); the second run used the cached verdict
    (verdict,) = [json.loads(p.read_text()) for p in (tmp_path / "cache" / "tokenizer-checks").iterdir()]
    assert verdict["agrees"] is True


def test_a_fast_tokenizer_that_disagrees_is_caught_and_the_run_redone(
    tmp_path, tiny_tokenizer_dir, monkeypatch, capsys
):
    """transformers adds a special token from tokenizer_config.json that tokenizer.json lacks: other ids."""
    from transformers import AutoTokenizer

    monkeypatch.setenv("DSFT_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "tok"
    shutil.copytree(tiny_tokenizer_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["extra_special_tokens"] = [*config.get("extra_special_tokens", []), "hello"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    hf = AutoTokenizer.from_pretrained(folder)
    src = _jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}] * 3)
    res = convert(src, tmp_path / "out", str(folder), workers=2, progress=False)
    assert "converting again with the transformers tokenizer" in capsys.readouterr().err
    assert _tokens(tmp_path / "out") == [(hf("hello world")["input_ids"], None)] * 3
    assert res.meta["tokenizer"]["vocab_size"] == len(hf)
    _nothing_left(tmp_path, "out.tmp")


def test_a_large_vocabulary_writes_int32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(70_000)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0")
    res = convert(_jsonl(tmp_path / "t.jsonl", [{"text": "w69999 w5 w65536"}]), tmp_path / "t", tok, progress=False)
    ds = IndexedDataset(tmp_path / "t")
    assert res.meta["dtype"] == "int32" and ds.dtype == np.int32 and ds[0].tolist() == [69999, 5, 65536]


# ------------------------------------------------------------------------------------------- on-disk format
def test_dataset_writer_commits_atomically_and_checks_alignment(tmp_path):
    writer = indexed.DatasetWriter(tmp_path / "d", np.uint16, with_loss_mask=True)
    writer.add(np.array([1, 2, 3]), np.array([0, 1, 1], np.uint8))
    with pytest.raises(ValueError, match="loss mask of 2 values for 3 tokens"):
        writer.add(np.array([1, 2, 3]), np.array([0, 1], np.uint8))
    assert not indexed.exists(tmp_path / "d")
    writer.commit({"has_loss_mask": True})
    assert indexed.is_complete(tmp_path / "d") and _tokens(tmp_path / "d") == [([1, 2, 3], [0, 1, 1])]
    other = indexed.IndexedDatasetBuilder(indexed.loss_mask_prefix(tmp_path / "d"), np.uint8)
    other.add_document([1])
    other.finalize()
    with pytest.raises(indexed.IndexedDatasetError, match="do not line up"):
        indexed.check_loss_mask_aligned(tmp_path / "d")
    aborted = indexed.DatasetWriter(tmp_path / "e", np.uint16, with_loss_mask=False)
    aborted.add([1])
    aborted.abort()
    _nothing_left(tmp_path, "e")


# ------------------------------------------------------------------------------------------- training path
def test_resolve_data_converts_a_parquet_and_a_hub_id_once_and_preflight_knows_the_kinds(
    tmp_path, tiny_tokenizer, monkeypatch
):
    import datasets

    from finetune.config import ConfigError, load_config
    from finetune.data import is_raw, resolve_data
    from finetune.preflight import data_path_problem

    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", "data.train=x"])
    datasets.Dataset.from_list(RECORDS).to_parquet(str(tmp_path / "d.parquet"))
    first = resolve_data(str(tmp_path / "d.parquet"), cfg, tiny_tokenizer)
    mtime = meta_path(first).stat().st_mtime_ns
    assert resolve_data(str(tmp_path / "d.parquet"), cfg, tiny_tokenizer) == first  # cached: not converted again
    assert meta_path(first).stat().st_mtime_ns == mtime
    datasets.Dataset.from_list(RECORDS[:2]).to_parquet(str(tmp_path / "d.parquet"))  # new content: a new cache
    second = resolve_data(str(tmp_path / "d.parquet"), cfg, tiny_tokenizer)
    assert second != first and len(IndexedDataset(second)) == 2

    make_hub_cache(tmp_path, "dsft-test/tiny", {"train": RECORDS, "test": RECORDS[:1]}, monkeypatch)
    assert is_raw("dsft-test/tiny") and data_path_problem("dsft-test/tiny", "data.train") is None
    assert _tokens(resolve_data("dsft-test/tiny", cfg, tiny_tokenizer)) == _tokens(first)
    monkeypatch.setattr(cfg.data, "split", "validation", raising=False)  # until DataConfig has data.split
    with pytest.raises(ConfigError, match=r"data.train: dsft-test/tiny\[validation\]: unknown split .*data.split=NAME"):
        resolve_data("dsft-test/tiny", cfg, tiny_tokenizer)
    assert "no hub dataset dsft-test/nope in the local cache (HF_HUB_OFFLINE=1)" in data_path_problem(
        "dsft-test/nope", "data.train"
    )
    (tmp_path / "empty").mkdir()
    assert "expected an mmap prefix" in data_path_problem(str(tmp_path / "empty"), "data.train")
    assert data_path_problem(str(tmp_path / "d.parquet"), "data.train") is None
    assert "does not exist" in data_path_problem(str(tmp_path / "gone.parquet"), "data.train")
