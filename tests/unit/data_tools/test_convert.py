import codecs
import hashlib
import json

import numpy as np
import pytest

from data_tools import convert as convert_mod
from data_tools.convert import ConversionError, convert, main
from data_tools.indexed import IndexedDataset
from data_tools.meta import read_meta

ALPACA = [
    {"instruction": "Add 2 and 3", "input": "", "output": "5"},
    {"instruction": "Reverse", "input": "banana", "output": "ananab", "system": "Be exact."},
    {"instruction": "Again", "output": "yes", "history": [["hi", "hello"], ["and?", "done"]]},
]
SHAREGPT = [
    {
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": "weather('Paris')"},
            {"from": "observation", "value": "sunny"},
            {"from": "gpt", "value": "It is sunny."},
        ]
    },
    {"system": "Be short.", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
]
MESSAGES = [
    {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "12 plus 30?"},
            {"role": "assistant", "content": "42"},
            {"role": "user", "content": "Upper case: hello"},
            {"role": "assistant", "content": "HELLO"},
        ]
    }
]
TEXTS = [{"text": f"The quick brown fox number {i} jumps over the lazy dog."} for i in range(12)]


def _write_jsonl(path, records, bom=False, newline="\n"):
    body = newline.join(json.dumps(r) for r in records) + newline
    path.write_bytes((codecs.BOM_UTF8 if bom else b"") + body.encode())
    return path


def _outputs(folder):
    return sorted(p.name for p in folder.rglob("*"))


def _messages_of(record, fmt):
    from data_tools.formats import record_to_messages

    return record_to_messages(record, fmt)


def test_text_round_trip_and_index_layout(tmp_path, tiny_tokenizer_dir, tiny_tokenizer):
    src = _write_jsonl(tmp_path / "t.jsonl", TEXTS)
    res = convert(src, tmp_path / "out" / "t", str(tiny_tokenizer_dir), append_eod=True, progress=False)
    ds = IndexedDataset(tmp_path / "out" / "t")
    eod = tiny_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert ds.dtype == np.uint16 and len(ds) == len(TEXTS)
    for i, rec in enumerate(TEXTS):
        assert ds[i].tolist() == tiny_tokenizer(rec["text"])["input_ids"] + [eod]
    assert (tmp_path / "out" / "t.idx").stat().st_size == 34 + 12 * len(ds) + 8 * (len(ds) + 1)
    assert not (tmp_path / "out" / "t_loss_mask.idx").exists()
    meta = read_meta(tmp_path / "out" / "t")
    assert meta == res.meta
    assert meta["format"] == "text" and meta["dtype"] == "uint16" and meta["vocab_size"] == len(tiny_tokenizer)
    assert meta["counts"]["documents"] == len(TEXTS) and meta["counts"]["tokens"] == ds.num_tokens
    assert meta["eod_token_id"] == eod and meta["has_loss_mask"] is False
    assert meta["sources"][0]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert _outputs(tmp_path / "out") == ["t.bin", "t.idx", "t.meta.json"]  # no temp files left


@pytest.mark.parametrize(("fmt", "records"), [("alpaca", ALPACA), ("sharegpt", SHAREGPT), ("messages", MESSAGES)])
def test_sft_round_trip_tokens_and_masks(tmp_path, tiny_tokenizer_dir, tiny_tokenizer, fmt, records):
    src = _write_jsonl(tmp_path / f"{fmt}.jsonl", records)
    res = convert([src], tmp_path / fmt, tiny_tokenizer, fmt="auto", progress=False)
    assert res.meta["format"] == fmt and res.meta["mask_method"] == "generation"
    ds, mask = IndexedDataset(tmp_path / fmt), IndexedDataset(tmp_path / f"{fmt}_loss_mask")
    assert mask.dtype == np.uint8 and np.array_equal(ds.sizes, mask.sizes) and len(ds) == len(records)
    assert (tmp_path / f"{fmt}_loss_mask.idx").stat().st_size == (tmp_path / f"{fmt}.idx").stat().st_size
    for i, rec in enumerate(records):
        expected = tiny_tokenizer.apply_chat_template(
            _messages_of(rec, fmt), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        assert ds[i].tolist() == expected["input_ids"]
        assert mask[i].tolist() == expected["assistant_masks"]
    assert res.meta["counts"]["masked_tokens"] == int(sum(mask[i].sum() for i in range(len(mask))))


def test_large_vocab_is_int32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # A 151k-entry word-level vocabulary (Qwen-sized) built in a second, saved and loaded by path like a hub id.
    vocab = {f"w{i}": i for i in range(151_000)}
    vocab.update({"[UNK]": 151_000, "<|endoftext|>": 151_001})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="<|endoftext|>").save_pretrained(
        tmp_path / "big_tok"
    )
    src = _write_jsonl(tmp_path / "big.jsonl", [{"text": "w150999 w70000 w3"}, {"text": "w65536 w65535"}])
    res = convert(src, tmp_path / "big", str(tmp_path / "big_tok"), fmt="text", append_eod=True, progress=False)
    ds = IndexedDataset(tmp_path / "big")
    assert ds.dtype == np.int32 and res.meta["dtype"] == "int32" and (tmp_path / "big.idx").read_bytes()[17] == 4
    assert [ds[0].tolist(), ds[1].tolist()] == [[150_999, 70_000, 3, 151_001], [65_536, 65_535, 151_001]]


BAD_CASES = [
    ("malformed_json", "text", [b'{"text": "ok"}', b'{"text": "broken"'], 2, "malformed JSON (Expecting"),
    ("missing_key", "alpaca", [json.dumps(ALPACA[0]).encode(), b'{"instruction": "x"}'], 2, 'missing key "output"'),
    (
        "wrong_type",
        "messages",
        [b'{"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "a"}]}'],
        1,
        "messages[0].content must be a string or a list of parts, got int",
    ),
    ("empty", "text", [b'{"text": "fine"}', b'{"text": "fine"}', b'{"text": ""}'], 3, 'empty text in key "text"'),
    (
        "over_length",
        "text",
        [b'{"text": "' + b"hello world " * 20 + b'"}'],
        1,
        "sample has 42 tokens, longer than --max-length 8",
    ),
    ("bad_encoding", "text", [b'{"text": "caf\xe9"}'], 1, "not valid UTF-8"),
]


@pytest.mark.parametrize(("case", "fmt", "lines", "bad_line", "message"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_input_fails_with_location_and_leaves_nothing(
    tmp_path, tiny_tokenizer_dir, capsys, case, fmt, lines, bad_line, message
):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out"
    argv = ["--input", str(src), "--output-prefix", str(out / "d"), "--tokenizer", str(tiny_tokenizer_dir)]
    argv += ["--format", fmt, "--max-length", "8" if case == "over_length" else "4096"]
    argv += ["--webdataset", str(tmp_path / "wds"), "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"{src}:{bad_line}: {message}" in err
    assert f"(format {fmt}); use --on-error skip to drop bad lines" in err
    assert not out.exists() and not (tmp_path / "wds").exists()


def test_failure_keeps_previous_output_intact(tmp_path, tiny_tokenizer):
    good = _write_jsonl(tmp_path / "good.jsonl", TEXTS[:3])
    convert(good, tmp_path / "d", tiny_tokenizer, progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("d*")}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"text": 1}\n')
    with pytest.raises(ConversionError, match=r"bad.jsonl:2: key \"text\" must be a string"):
        convert(bad, tmp_path / "d", tiny_tokenizer, progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("d*")} == before


def test_on_error_skip_counts_reasons(tmp_path, tiny_tokenizer_dir, capsys):
    src = tmp_path / "mixed.jsonl"
    lines = [
        json.dumps(ALPACA[0]),
        '{"instruction": "x"',  # malformed
        '{"instruction": "x"}',  # missing output
        '{"instruction": "x", "output": ""}',  # empty
        '{"instruction": 3, "output": "y"}',  # wrong type
        "",  # blank line: ignored, not an error
        json.dumps({"instruction": "long " * 40, "output": "y"}),  # over --max-length
        json.dumps(ALPACA[1]),
    ]
    src.write_text("\n".join(lines) + "\n")
    argv = ["--input", str(src), "--output-prefix", str(tmp_path / "s"), "--tokenizer", str(tiny_tokenizer_dir)]
    assert main(argv + ["--on-error", "skip", "--max-length", "60", "--no-progress"]) == 0
    assert "2 documents" in capsys.readouterr().out
    meta = read_meta(tmp_path / "s")
    assert meta["counts"]["documents"] == 2 and meta["counts"]["skipped"] == 5 and meta["counts"]["blank_lines"] == 1
    assert meta["skipped"]["by_reason"] == {
        "empty": 1,
        "malformed_json": 1,
        "missing_key": 1,
        "over_length": 1,
        "wrong_type": 1,
    }
    assert any(e.startswith(f"{src}:3: missing key") for e in meta["skipped"]["examples"])
    assert len(IndexedDataset(tmp_path / "s")) == 2


def test_over_length_truncate_and_drop(tmp_path, tiny_tokenizer):
    src = _write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world " * 30}, {"text": "hi"}])
    res = convert(src, tmp_path / "tr", tiny_tokenizer, max_length=10, over_length="truncate", progress=False)
    ds = IndexedDataset(tmp_path / "tr")
    assert ds.sizes.tolist() == [10, len(tiny_tokenizer("hi")["input_ids"])] and res.meta["counts"]["truncated"] == 1
    assert ds[0].tolist() == tiny_tokenizer("hello world " * 30)["input_ids"][:10]
    # drop: dropped and counted even with the default --on-error fail.
    res = convert(src, tmp_path / "dr", tiny_tokenizer, max_length=10, over_length="drop", progress=False)
    assert len(IndexedDataset(tmp_path / "dr")) == 1 and res.meta["skipped"]["by_reason"] == {"over_length": 1}


def test_two_workers_keep_order(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(convert_mod, "CHUNK_RECORDS", 7)  # many small chunks in flight, finishing out of order
    records = [{"text": f"document {i} " + "fox " * (i % 13)} for i in range(300)]
    records[150] = {"text": ""}
    src = _write_jsonl(tmp_path / "many.jsonl", records)
    res = convert(src, tmp_path / "w2", tiny_tokenizer, workers=2, on_error="skip", progress=False)
    ds = IndexedDataset(tmp_path / "w2")
    kept = [r for i, r in enumerate(records) if i != 150]
    assert len(ds) == len(kept) and res.meta["skipped"]["by_reason"] == {"empty": 1}
    for i, rec in enumerate(kept):
        assert ds[i].tolist() == tiny_tokenizer(rec["text"])["input_ids"]
    with pytest.raises(ConversionError, match=r"many.jsonl:151: empty text"):
        convert(src, tmp_path / "w2f", tiny_tokenizer, workers=2, progress=False)
    assert not list(tmp_path.glob("w2f*"))


def test_bom_crlf_and_json_array_inputs_give_identical_data(tmp_path, tiny_tokenizer):
    plain = _write_jsonl(tmp_path / "plain.jsonl", ALPACA)
    bom_crlf = _write_jsonl(tmp_path / "bom.jsonl", ALPACA, bom=True, newline="\r\n")
    array = tmp_path / "arr.json"
    array.write_bytes(codecs.BOM_UTF8 + json.dumps(ALPACA, indent=2).replace("\n", "\r\n").encode())
    blobs = []
    for src in (plain, bom_crlf, array):
        res = convert(src, tmp_path / src.stem, tiny_tokenizer, progress=False)
        assert res.meta["format"] == "alpaca" and res.meta["counts"]["documents"] == len(ALPACA)
        blobs.append([(tmp_path / f"{src.stem}{suffix}").read_bytes() for suffix in (".bin", ".idx", "_loss_mask.bin")])
    assert blobs[0] == blobs[1] == blobs[2]


def test_json_array_errors_report_the_line(tmp_path, tiny_tokenizer):
    array = tmp_path / "arr.json"
    array.write_text('[\n  {"text": "a"},\n  {"text": 5},\n  {"text": "c"}\n]\n')
    with pytest.raises(ConversionError, match=r"arr.json:3: key \"text\" must be a string"):
        convert(array, tmp_path / "a", tiny_tokenizer, progress=False)
    array.write_text('[\n  {"text": "a"},\n  {"text": "b" oops},\n]\n')
    with pytest.raises(ConversionError, match=r"arr.json:3: malformed JSON"):
        convert(array, tmp_path / "a", tiny_tokenizer, progress=False, on_error="skip")
    assert not list(tmp_path.glob("a.*"))


def test_multiple_inputs_and_format_detection_errors(tmp_path, tiny_tokenizer):
    a = _write_jsonl(tmp_path / "a.jsonl", TEXTS[:2])
    b = _write_jsonl(tmp_path / "b.jsonl", TEXTS[2:5])
    res = convert([a, b], tmp_path / "ab", tiny_tokenizer, progress=False)
    assert len(IndexedDataset(tmp_path / "ab")) == 5 and [s["records"] for s in res.meta["sources"]] == [2, 3]
    odd = _write_jsonl(tmp_path / "odd.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(ConversionError, match=r"odd.jsonl:1: cannot detect the format .* pass --format"):
        convert(odd, tmp_path / "o", tiny_tokenizer, progress=False)
    with pytest.raises(ConversionError, match="input file not found"):
        convert(tmp_path / "missing.jsonl", tmp_path / "m", tiny_tokenizer, progress=False)


def test_auto_detection_looks_past_a_malformed_first_line(tmp_path, tiny_tokenizer):
    src = tmp_path / "m.jsonl"
    src.write_text('{"instruction": oops\n' + json.dumps(ALPACA[0]) + "\n")
    res = convert(src, tmp_path / "m", tiny_tokenizer, on_error="skip", progress=False)
    assert res.meta["format"] == "alpaca" and res.meta["skipped"]["by_reason"] == {"malformed_json": 1}
    with pytest.raises(ConversionError, match=r"m.jsonl:1: malformed JSON .*\(format alpaca\)"):
        convert(src, tmp_path / "m2", tiny_tokenizer, progress=False)


def test_is_conversion_current(tmp_path, tiny_tokenizer):
    from data_tools.convert import is_conversion_current
    from finetune.tiny import train_tokenizer

    src = _write_jsonl(tmp_path / "a.jsonl", ALPACA)
    assert not is_conversion_current(tmp_path / "c", src, tiny_tokenizer)
    convert(src, tmp_path / "c", tiny_tokenizer, max_length=512, over_length="truncate", progress=False)
    assert is_conversion_current(tmp_path / "c", src, tiny_tokenizer, fmt="auto", max_length=512)
    assert is_conversion_current(tmp_path / "c", [src], tiny_tokenizer, fmt="alpaca", over_length="truncate")
    assert not is_conversion_current(tmp_path / "c", src, tiny_tokenizer, max_length=1024)
    assert not is_conversion_current(tmp_path / "c", src, tiny_tokenizer, fmt="messages")
    other = train_tokenizer(tmp_path / "other_tok", ["zebra yak quokka"] * 30)
    assert not is_conversion_current(tmp_path / "c", src, other)
    _write_jsonl(src, ALPACA[:2])  # the raw file changed
    assert not is_conversion_current(tmp_path / "c", src, tiny_tokenizer)
    with pytest.raises(TypeError, match="unknown option"):
        is_conversion_current(tmp_path / "c", src, tiny_tokenizer, workers=2)


@pytest.mark.parametrize("read_bytes", [1, 3, 64])
def test_json_array_parser_across_read_boundaries(tmp_path, tiny_tokenizer, monkeypatch, read_bytes):
    monkeypatch.setattr(convert_mod, "ARRAY_READ_BYTES", read_bytes)
    array = tmp_path / "arr.json"
    # "é" is two UTF-8 bytes (split by 1-byte reads); 12345 must not be read as 12 then 345.
    array.write_bytes(codecs.BOM_UTF8 + '[\r\n {"text": "café au lait"} ,\r\n 12345,\n\n {"text": "b"}\n]  \n'.encode())
    res = convert(array, tmp_path / "a", tiny_tokenizer, fmt="text", on_error="skip", progress=False)
    ds = IndexedDataset(tmp_path / "a")
    assert [ds[0].tolist(), ds[1].tolist()] == [tiny_tokenizer(t)["input_ids"] for t in ("café au lait", "b")]
    assert res.meta["skipped"]["examples"] == [f"{array}:3: record must be a JSON object, got int"]
    assert res.meta["sources"][0]["sha256"] == hashlib.sha256(array.read_bytes()).hexdigest()


def test_truncate_drops_sft_samples_left_without_answer(tmp_path, tiny_tokenizer):
    long_prompt = {"instruction": "word " * 80, "output": "yes"}
    src = _write_jsonl(tmp_path / "a.jsonl", [long_prompt, ALPACA[0]])
    res = convert(src, tmp_path / "a", tiny_tokenizer, max_length=40, over_length="truncate", progress=False)
    assert res.meta["counts"]["documents"] == 1 and res.meta["skipped"]["by_reason"] == {"over_length": 1}
    assert "removes every assistant token" in res.meta["skipped"]["examples"][0]


def test_auto_detection_with_skip_passes_over_unknown_records(tmp_path, tiny_tokenizer):
    src = tmp_path / "g.jsonl"
    src.write_text('12\n{"prompt": "x"}\n' + json.dumps(MESSAGES[0]) + "\n")
    res = convert(src, tmp_path / "g", tiny_tokenizer, on_error="skip", progress=False)
    assert res.meta["format"] == "messages" and res.meta["counts"]["skipped"] == 2
    with pytest.raises(ConversionError, match=r"g.jsonl:1: cannot detect the format from a int record"):
        convert(src, tmp_path / "g2", tiny_tokenizer, progress=False)
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(ConversionError, match="blank.jsonl: no records"):
        convert(tmp_path / "blank.jsonl", tmp_path / "b", tiny_tokenizer, progress=False)
