"""Raw chat data given straight to training, through the real launcher on CPU: what the data lost to length limits
and bad lines is reported (console, metrics.jsonl, summary.json), the converter's options come from the training
config, a broken line is a config error, and final/ stops where the data taught the model to stop."""

from __future__ import annotations

import json

import numpy as np

from tests.recipes.conftest import launch, metrics, recipe_cmd, run_recipe

LONG_ANSWER = " ".join(str(i) for i in range(40))


def _chat(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def _rows(n_short: int, n_long: int) -> list[dict]:
    short = [_chat(f"What is {i % 10} plus 1?", f"{i % 10 + 1}") for i in range(n_short)]
    return short + [_chat(f"Count {i}", LONG_ANSWER[: 60 + 12 * i]) for i in range(n_long)]


def _write(path, rows, broken_line: int | None = None) -> str:
    lines = [json.dumps(r) for r in rows]
    if broken_line is not None:
        lines.insert(broken_line - 1, '{"messages": [{"role": "user"')
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _lengths(tokenizer, rows) -> np.ndarray:
    return np.array([len(tokenizer.apply_chat_template(r["messages"], return_dict=False)) for r in rows])


def _log(out) -> str:
    return out.parent.joinpath(f"{out.name}.log").read_text()


def test_truncation_and_skips_are_reported_and_final_stops_at_the_end_of_turn(tmp_path, tiny_llama_dir, tiny_tokenizer):
    """SFT on raw .jsonl with long samples and a broken line, data.on_error=skip, data.max_length=64 >
    data.seq_len=48 (the converter truncates to 64, the loader to 48), and a chat template file."""
    rows, eval_rows = _rows(40, 8), _rows(6, 5)
    n, m = _lengths(tiny_tokenizer, rows), np.minimum(_lengths(tiny_tokenizer, rows), 64)
    assert (n > 64).sum() >= 4 and ((m > 48) & (n <= 64)).sum() >= 1, "the data must exercise both limits"
    template = tmp_path / "chat.jinja"
    template.write_text("{#- the test's own template -#}\n" + tiny_tokenizer.chat_template)
    data = {
        "train": _write(tmp_path / "train.jsonl", rows, broken_line=3),
        "eval": _write(tmp_path / "eval.jsonl", eval_rows),
    }
    out = tmp_path / "run"
    overrides = ["data.seq_len=48", "data.max_length=64", "data.on_error=skip", f"data.chat_template={template}"]
    steps = ["train.max_steps=2", "train.micro_batch_size=2", "train.save_every=2"]
    run_recipe("sft", tiny_llama_dir, data, out, *overrides, *steps)

    expected = {
        "records": 49,
        "samples": 48,
        "documents": 48,
        "truncated": int((n > 64).sum()),
        "truncated_tokens": int((n[n > 64] - 64).sum()),
        "dropped_over_length": 0,
        "skipped": 1,
        "skipped_by_reason": {"malformed_json": 1},
        "loader_truncated": int((m > 48).sum()),
        "loader_truncated_tokens": int((m[m > 48] - 48).sum()),
    }
    summary = json.loads((out / "summary.json").read_text())["data"]
    (row,) = [r for r in metrics(out, "data") if r["source"] == "data.train"]
    for reported in (summary["data.train"], row):
        assert {k: reported[k] for k in expected} == expected
    eval_n = _lengths(tiny_tokenizer, eval_rows)
    assert summary["data.eval"]["truncated"] == int((eval_n > 64).sum()) > 0
    log = _log(out)
    t = expected["truncated"]
    assert (
        f"[dsft] data.train: {t} of 48 samples ({t / 48:.1%}) truncated to 64 tokens, "
        f"{expected['truncated_tokens']:,} tokens lost. Set data.over_length=drop" in log
    )
    assert "[dsft] data.train: 1 of 49 records skipped as unusable (malformed_json: 1; data.on_error=skip)" in log
    c = expected["loader_truncated"]
    assert f"[dsft] data.train: {c} of 48 samples ({c / 48:.1%}) are longer than data.seq_len=48" in log
    assert f"{expected['loader_truncated_tokens']:,} tokens lost. Raise data.seq_len" in log

    from transformers import AutoTokenizer, GenerationConfig

    end_of_turn = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    serving = json.loads((out / "serving.json").read_text())
    assert serving["chat_template"] == template.read_text() and serving["chat_template_source"] == "file"
    assert serving["stop_token_ids"] == [end_of_turn]
    ended = 48 - expected["truncated"]  # a truncated sample lost its end of turn
    assert serving["turn_end_tokens"] == [{"id": end_of_turn, "token": "<|im_end|>", "count": ended}]
    from finetune.export import consolidate_zero

    fp32 = consolidate_zero(out / "checkpoints", tmp_path / "fp32")  # serving.json applies to ZeRO exports too
    for exported in (out / "final", fp32):
        assert GenerationConfig.from_pretrained(exported).eos_token_id == [end_of_turn]
        assert AutoTokenizer.from_pretrained(exported).chat_template == template.read_text()


def test_over_length_drop_from_the_config_and_a_peft_final_stops_at_the_end_of_turn(
    tmp_path, tiny_llama_dir, tiny_tokenizer
):
    rows = _rows(40, 6)
    n = _lengths(tiny_tokenizer, rows)
    dropped = int((n > 48).sum())
    assert dropped >= 4
    out = tmp_path / "run"
    data = {"train": _write(tmp_path / "train.jsonl", rows)}
    overrides = ["data.seq_len=48", "data.over_length=drop", "method.name=lora", "train.lr=1e-3"]
    run_recipe("sft", tiny_llama_dir, data, out, *overrides, "train.max_steps=2", nproc=1, launcher="python")

    report = json.loads((out / "summary.json").read_text())["data"]["data.train"]
    assert (report["samples"], report["documents"], report["dropped_over_length"]) == (46, 46 - dropped, dropped)
    assert report["truncated"] == 0 and report["loader_truncated"] == 0
    assert f"[dsft] data.train: {dropped} of 46 samples ({dropped / 46:.1%}) dropped: longer than 48 tokens." in _log(
        out
    )

    from transformers import GenerationConfig

    end_of_turn = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert (out / "final" / "adapter_config.json").exists()
    assert GenerationConfig.from_pretrained(out / "final").eos_token_id == [end_of_turn]


def test_a_broken_raw_line_is_a_config_error_on_every_rank(tmp_path, tiny_llama_dir):
    """2 ranks under the deepspeed launcher: exit 2 with one `config error:` naming file:line and the key that skips
    the line; no traceback, no hang in the other rank."""
    train = _write(tmp_path / "train.jsonl", _rows(8, 0), broken_line=5)
    out = tmp_path / "run"
    proc = launch(recipe_cmd("sft", 2, tiny_llama_dir, {"train": train}, out, "train.max_steps=2"), out)
    assert proc.wait(timeout=300) == 2
    log = _log(out)
    assert f"config error: data.train: {train}:5: malformed JSON" in log, log[-3000:]
    assert "data.on_error=skip" in log and "Traceback" not in log, log[-3000:]
    assert log.count("config error:") == 1
    assert not (out / "metrics.jsonl").exists()
