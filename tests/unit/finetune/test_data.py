"""finetune/data.py: converter options and errors from a training config, what the data loses to length limits, and
the stop tokens / chat template a trained model is served with. One process, no process group."""

from __future__ import annotations

import json

import numpy as np
import pytest

from finetune.config import ConfigError, load_config
from finetune.data import (
    converter_message,
    length_messages,
    length_report,
    resolve_data,
    serving_settings,
    source_meta,
)


def _cfg(tmp_path, *overrides: str):
    return load_config(None, [f"output_dir={tmp_path / 'out'}", "data.train=x", *overrides])


def _chat(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def _write_jsonl(path, rows, broken_line: int | None = None):
    lines = [json.dumps(r) for r in rows]
    if broken_line is not None:
        lines.insert(broken_line - 1, '{"messages": [')
    path.write_text("\n".join(lines) + "\n")
    return path


def _ids(tokenizer, row) -> list[int]:
    return tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=False)


@pytest.mark.parametrize(
    "message,expected",
    [
        (
            "d.jsonl:3: malformed JSON (x) (format messages); use --on-error skip to drop bad lines",
            "d.jsonl:3: malformed JSON (x) (format messages); use data.on_error=skip to drop bad lines",
        ),
        (
            "d.jsonl:1: sample has 300 tokens, longer than --max-length 256; raise --max-length or pass "
            "--over-length truncate/drop",
            "d.jsonl:1: sample has 300 tokens, longer than data.max_length=256; raise data.max_length or pass "
            "data.over_length=truncate/drop",
        ),
        ("--format 'xml': expected auto or one of", "data.format='xml': expected auto or one of"),
        ("--format to pick one", "data.format to pick one"),
        ("pass --chat-template FILE (data.chat_template)", "pass data.chat_template=FILE"),
        ("--chat-template t/x.jinja: cannot read it", "data.chat_template=t/x.jinja: cannot read it"),
    ],
)
def test_converter_messages_name_the_config_keys(message, expected):
    assert converter_message(message, "t/x.jinja") == expected


def test_a_broken_raw_line_is_a_config_error_naming_file_line_and_key(tmp_path, tiny_tokenizer):
    raw = _write_jsonl(tmp_path / "chat.jsonl", [_chat("1+1", "2")] * 3, broken_line=3)
    with pytest.raises(ConfigError) as e:
        resolve_data(str(raw), _cfg(tmp_path), tiny_tokenizer, "data.eval")
    message = str(e.value)
    assert message.startswith(f"data.eval: {raw}:3: malformed JSON"), message
    assert "data.on_error=skip" in message and "--" not in message
    assert not list((tmp_path / "out" / "data_cache").glob("*.idx")), "nothing is left under a final name"


def test_over_length_and_on_error_reach_the_converter_and_the_report(tmp_path, tiny_tokenizer):
    """10 short samples, 4 with long answers, 1 broken line; data.max_length=40 < data.seq_len."""
    long_answer = " ".join(str(i) for i in range(60))
    rows = [_chat(f"{i}+1", str(i + 1)) for i in range(10)] + [_chat(f"count {i}", long_answer) for i in range(4)]
    raw = _write_jsonl(tmp_path / "chat.jsonl", rows, broken_line=5)
    lengths = [len(_ids(tiny_tokenizer, r)) for r in rows]
    assert sum(n > 40 for n in lengths) == 4 and max(lengths[:10]) <= 40

    cfg = _cfg(tmp_path, "data.seq_len=64", "data.max_length=40", "data.on_error=skip")
    prefix = resolve_data(str(raw), cfg, tiny_tokenizer)
    report = length_report("data.train", prefix, source_meta(prefix), cfg)
    assert (report["records"], report["samples"], report["documents"]) == (15, 14, 14)
    assert report["loader_truncated"] == 0
    assert (report["truncated"], report["truncated_tokens"]) == (4, sum(n - 40 for n in lengths if n > 40))
    assert report["skipped"] == 1 and report["skipped_by_reason"] == {"malformed_json": 1}
    assert report["dropped_over_length"] == 0 and report["max_length"] == 40
    lines = length_messages(report, raw=True)
    assert lines[0].startswith("[dsft] data.train: 4 of 14 samples (28.6%) truncated to 40 tokens, ")
    assert "data.over_length=drop" in lines[0]
    assert lines[1] == "[dsft] data.train: 1 of 15 records skipped as unusable (malformed_json: 1; data.on_error=skip)"

    cfg = _cfg(tmp_path, "data.seq_len=64", "data.max_length=40", "data.on_error=skip", "data.over_length=drop")
    dropped = resolve_data(str(raw), cfg, tiny_tokenizer)
    assert dropped != prefix, "data.over_length is part of the cache key"
    report = length_report("data.train", dropped, source_meta(dropped), cfg)
    assert (report["documents"], report["truncated"], report["dropped_over_length"]) == (10, 0, 4)
    assert length_messages(report, raw=True)[0] == (
        "[dsft] data.train: 4 of 14 samples (28.6%) dropped: longer than 40 tokens. "
        "To keep them, raise data.seq_len/data.max_length"
    )


def test_the_loader_part_counts_samples_longer_than_seq_len(tmp_path, tiny_tokenizer):
    """data.max_length above data.seq_len: the converter keeps samples whole, the loader truncates them (mmap and
    WebDataset give the same numbers); text in packed mode is chunked, so it has no loader part."""
    from data_tools.convert import convert

    rows = [_chat(f"count {i}", " ".join(str(j) for j in range(5 * i + 1))) for i in range(12)]
    raw = _write_jsonl(tmp_path / "chat.jsonl", rows)
    lengths = np.array([len(_ids(tiny_tokenizer, r)) for r in rows])
    cfg = _cfg(tmp_path, "data.seq_len=32", "data.max_length=1000")
    expected = (int((lengths > 32).sum()), int((lengths[lengths > 32] - 32).sum()))
    assert expected[0] >= 3
    prefix = resolve_data(str(raw), cfg, tiny_tokenizer)
    report = length_report("data.train", prefix, source_meta(prefix), cfg)
    assert report["truncated"] == 0 and (report["loader_truncated"], report["loader_truncated_tokens"]) == expected
    assert "are longer than data.seq_len=32: the loader truncates them" in length_messages(report, raw=True)[0]
    convert([raw], None, tiny_tokenizer, webdataset_dir=tmp_path / "wds", shard_size=5, progress=False)
    index = str(tmp_path / "wds" / "index.json")
    report = length_report("data.train", index, source_meta(index), cfg)
    assert (report["loader_truncated"], report["loader_truncated_tokens"]) == expected

    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": " ".join(map(str, range(40)))}) + "\n" for _ in range(3)))
    text_prefix = resolve_data(str(text), cfg, tiny_tokenizer)
    assert "loader_truncated" not in length_report("data.train", text_prefix, None, cfg)
    padded = _cfg(tmp_path, "data.seq_len=32", "data.packing=padding")
    assert length_report("data.train", text_prefix, None, padded)["loader_truncated"] == 3


def test_the_chat_template_file_is_used_recorded_and_keyed_by_content(tmp_path, tiny_tokenizer):
    raw = _write_jsonl(tmp_path / "chat.jsonl", [_chat("1+1", "2")] * 3)
    template = tmp_path / "t.jinja"
    template.write_text(tiny_tokenizer.chat_template)
    cfg = _cfg(tmp_path, f"data.chat_template={template}")
    first = resolve_data(str(raw), cfg, tiny_tokenizer)
    meta = source_meta(first)
    assert meta["chat_template"]["source"] == "file" and meta["chat_template"]["template"] == template.read_text()
    template.write_text(tiny_tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> "))
    assert resolve_data(str(raw), cfg, tiny_tokenizer) != first, "an edited template file converts again"
    assert resolve_data(str(raw), _cfg(tmp_path), tiny_tokenizer) != first


def test_stop_ids_when_eos_differs_from_the_end_of_turn(tmp_path, tiny_tokenizer_dir, tiny_llama_dir):
    """A chat tokenizer whose eos (<|endoftext|>) is not its end of turn (<|im_end|>): final/ and merged exports
    stop on both, and keep the template; text data leaves the model's eos alone."""
    import shutil

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from finetune.export import merge_adapter, save_generation_config, set_stop_ids

    tok_dir = tmp_path / "tok"
    shutil.copytree(tiny_tokenizer_dir, tok_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.eos_token = "<|endoftext|>"
    end_of_turn, eos = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    raw = _write_jsonl(tmp_path / "chat.jsonl", [_chat(f"{i}+1", str(i + 1)) for i in range(4)])
    prefix = resolve_data(str(raw), _cfg(tmp_path), tok)
    serving, warning = serving_settings(source_meta(prefix), tok)
    assert serving["stop_token_ids"] == [end_of_turn, eos] and warning is None
    assert serving["chat_template"] == tok.chat_template and serving["chat_template_source"] == "tokenizer"
    assert serving["turn_end_tokens"] == [{"id": end_of_turn, "token": "<|im_end|>", "count": 4}]

    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "1 2 3"}) + "\n")
    text_serving, _ = serving_settings(source_meta(resolve_data(str(text), _cfg(tmp_path), tok)), tok)
    assert text_serving["stop_token_ids"] is None and text_serving["chat_template"] is None
    assert serving_settings(None, tok)[0]["stop_token_ids"] is None  # Megatron data without a meta

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    set_stop_ids(model.generation_config, serving["stop_token_ids"])
    model.save_pretrained(tmp_path / "full")
    assert GenerationConfig.from_pretrained(tmp_path / "full").eos_token_id == [end_of_turn, eos]

    adapter = tmp_path / "adapter"
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(adapter)
    save_generation_config(peft_model, adapter, serving["stop_token_ids"])
    tok.chat_template = serving["chat_template"]
    tok.save_pretrained(adapter)
    assert GenerationConfig.from_pretrained(adapter).eos_token_id == [end_of_turn, eos]
    merged = merge_adapter(adapter, tmp_path / "merged", base=str(tiny_llama_dir))
    assert GenerationConfig.from_pretrained(merged).eos_token_id == [end_of_turn, eos]
    assert AutoTokenizer.from_pretrained(merged).chat_template == serving["chat_template"]


def test_raw_text_is_not_truncated_to_seq_len_unless_asked(tmp_path, tiny_tokenizer):
    """Text documents are cut into rows by the loader without losing a token; only data.max_length truncates them."""
    from data_tools.indexed import IndexedDataset

    doc = "The quick brown fox jumps over the lazy dog. " * 20
    src = _write_jsonl(tmp_path / "corpus.jsonl", [{"text": doc}])
    full = len(tiny_tokenizer(doc)["input_ids"])
    assert full > 64
    prefix = resolve_data(str(src), _cfg(tmp_path, "data.seq_len=16"), tiny_tokenizer)
    assert IndexedDataset(prefix).sizes.tolist() == [full]
    cut = resolve_data(str(src), _cfg(tmp_path, "data.seq_len=16", "data.max_length=64"), tiny_tokenizer)
    assert IndexedDataset(cut).sizes.tolist() == [64]
