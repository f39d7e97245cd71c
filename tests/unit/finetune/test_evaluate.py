"""``dsft eval`` (``finetune.evaluate``) on the tiny Llama: the loss counts only loss-mask tokens, raw jsonl is
converted as training converts it, exact match scores chat's answers, and bad input exits 2.

The equality with a real run's final eval loss is tested on the demo's run in ``tests/recipes/test_demo.py``."""

from __future__ import annotations

import json
import math

import pytest

from finetune import evaluate, generation

RECORDS = [
    {"messages": [{"role": "user", "content": "Add: 3 6 + 1 9"}, {"role": "assistant", "content": "5 5"}]},
    {"messages": [{"role": "user", "content": "What is 12 plus 30?"}, {"role": "assistant", "content": "42"}]},
    {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse banana"}]
        + [{"role": "assistant", "content": "ananab"}]
    },
    {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "The quick brown fox."}]},
]


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return path


def _masked_loss_by_hand(model_dir, prefix: str) -> tuple[float, int]:
    """Sum of next-token losses over the loss-mask tokens, sample by sample, straight from the converted files."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from data_tools.convert import LOSS_MASK_SUFFIX
    from data_tools.indexed import IndexedDataset

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids, masks = IndexedDataset(prefix), IndexedDataset(prefix + LOSS_MASK_SUFFIX)
    total, count = 0.0, 0
    for i in range(len(ids)):
        tokens = torch.from_numpy(np.asarray(ids[i], dtype=np.int64))
        mask = torch.from_numpy(np.asarray(masks[i]).astype(bool))
        assert 0 < int(mask.sum()) < len(tokens), "the record has prompt tokens and answer tokens"
        with torch.no_grad():
            logits = model(tokens[None]).logits[0]
        target = mask[1:]  # position t predicts token t+1: a target where token t+1 is under the mask
        total += float(F.cross_entropy(logits[:-1][target], tokens[1:][target], reduction="sum"))
        count += int(target.sum())
    return total / count, count


def test_loss_counts_only_loss_mask_tokens_of_raw_jsonl(tiny_llama_dir, data_file, capsys):
    """Raw jsonl is converted (as training would), and the loss is over the assistant tokens only."""
    from transformers import AutoTokenizer

    from data_tools.convert import convert

    assert evaluate.main([str(tiny_llama_dir), "--data", str(data_file), "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    prefix = str(data_file.parent / "by_hand")
    convert([data_file], prefix, AutoTokenizer.from_pretrained(tiny_llama_dir), fmt="messages", progress=False)
    loss, count = _masked_loss_by_hand(tiny_llama_dir, prefix)
    assert out["tokens"] == count
    assert out["loss"] == pytest.approx(loss, abs=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
    # the same through the converted prefix itself (mmap data is read as is)
    assert evaluate.main([str(tiny_llama_dir), "--data", prefix, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(loss, abs=1e-5)


def test_exact_match_scores_the_answers_chat_gives(tiny_llama_dir, tmp_path, capsys):
    loaded = generation.load_for_generation(tiny_llama_dir, device="cpu")
    convs = [[{"role": "user", "content": q}] for q in ("hello", "What is 1?", "Add: 1 2 + 3 4", "Reverse it")]
    decoding = generation.Decoding(max_new_tokens=6)
    answers = generation.generate_answers(loaded, convs, decoding)
    # references: the model's own answers for two records (+ whitespace, stripped by the scorer), wrong for two
    rows = [{"prompt": convs[0][0]["content"], "answer": f"  {answers[0]}\n"}]
    rows.append({"messages": [*convs[1], {"role": "assistant", "content": answers[1]}]})
    rows.append({"prompt": convs[2][0]["content"], "completion": "not this"})
    rows.append({"messages": [*convs[3], {"role": "assistant", "content": answers[3] + "x"}]})
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    answers_file = tmp_path / "answers.jsonl"
    argv = [str(tiny_llama_dir), "--prompts", str(prompts), "--max-new-tokens", "6", "--answers", str(answers_file)]
    assert evaluate.main(argv) == 0
    table = capsys.readouterr().out
    assert "exact match  50.0%" in table and "(2 of 4)" in table
    scored = [json.loads(line) for line in answers_file.read_text().splitlines()]
    assert [r["ok"] for r in scored] == [True, True, False, False]
    assert [r["got"] for r in scored] == [a.strip() for a in answers]


def test_bad_input_exits_2(tiny_llama_dir, tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert evaluate.main([str(tiny_llama_dir), "--data", str(missing)]) == 2
    # said before the model is loaded
    assert (
        capsys.readouterr().err.strip()
        == f"error: --data: {missing} does not exist (an mmap prefix P needs P.bin and P.idx)"
    )
    no_ref = tmp_path / "p.jsonl"
    no_ref.write_text(json.dumps({"prompt": "hi"}) + "\n")
    assert evaluate.main([str(tiny_llama_dir), "--prompts", str(no_ref)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {no_ref}:1: no reference answer")
    assert evaluate.main([str(tiny_llama_dir)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps({"prompt": "hi", "answer": "x"}) + "\n")
    assert evaluate.main([str(tmp_path), "--prompts", str(ok)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path}: not a model directory")
