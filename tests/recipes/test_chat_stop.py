"""A fine-tuned model stops where training taught it: the demo task trained through the real launcher with tokenizers
shaped like the ones users bring, then greedy generation from ``final/`` with default settings.

* a base model's tokenizer (bos/eos, no chat template): the default template ends every assistant turn with eos, and
  ``final/`` carries that template, so ``apply_chat_template`` works on the result and generation stops at eos;
* a Qwen-style tokenizer whose eos (``<|endoftext|>``) is not its end of turn (``<|im_end|>``): ``final/``'s
  generation config stops on the end-of-turn token the data ends assistant turns with.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from launch.demo import DEMO_DATA, MODEL_SHAPE, read_jsonl, tokenizer_corpus
from tests.recipes.conftest import run_recipe

N_HELD_OUT = 24
STEPS = 150
# The answers are 1-3 digit tokens; a model that learned to stop ends within this many new tokens.
MAX_NEW_TOKENS = 8


def _train(tmp_path: Path, style: str) -> Path:
    from finetune.tiny import build_model, train_tokenizer

    records = read_jsonl(DEMO_DATA / "train.jsonl")
    train_tokenizer(tmp_path / "tok", tokenizer_corpus(records), vocab_size=300, style=style)
    base = build_model(tmp_path / "base", tmp_path / "tok", **MODEL_SHAPE)
    # Raw jsonl straight to training: the engine converts it with the model's tokenizer (and its template or none).
    data = {"train": str(DEMO_DATA / "train.jsonl")}
    overrides = [f"train.max_steps={STEPS}", "train.micro_batch_size=16", "train.grad_accum=1", "train.lr=3e-3"]
    overrides += ["data.packing=padding", "model.attn_implementation=sdpa", "train.log_every=10"]
    run_recipe("sft", base, data, tmp_path / "run", *overrides, "data.seq_len=64", "zero.stage=2")
    return tmp_path / "run" / "final"


def _generate(final: Path) -> tuple[list[list[int]], object]:
    """Greedy continuations of held-out prompts, with final/'s own template and generation config (no overrides)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    outs = []
    for record in read_jsonl(DEMO_DATA / "eval.jsonl")[:N_HELD_OUT]:
        prompt = tok.apply_chat_template(record["messages"][:-1], add_generation_prompt=True, return_dict=True)
        ids = torch.tensor([prompt["input_ids"]])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS)
        outs.append(out[0, ids.shape[1] :].tolist())
    return outs, tok


@pytest.mark.parametrize("style", ["base", "qwen"])
def test_generation_from_final_stops_at_the_trained_end_of_turn(tmp_path, style):
    final = _train(tmp_path, style)
    outs, tok = _generate(final)  # apply_chat_template would raise if final/ had no template
    if style == "base":
        assert tok.bos_token == "<s>" and "eos_token" in tok.chat_template
        stop = tok.eos_token_id  # </s>: the default template trains it at the end of every assistant turn
    else:
        stop = tok.convert_tokens_to_ids("<|im_end|>")
        assert tok.eos_token_id != stop  # eos alone would never stop this model
    from transformers import GenerationConfig

    eos = GenerationConfig.from_pretrained(final).eos_token_id
    assert stop in (eos if isinstance(eos, list) else [eos])
    stopped = [o for o in outs if stop in o and len(o) < MAX_NEW_TOKENS]
    assert len(stopped) == len(outs), f"{len(outs) - len(stopped)} of {len(outs)} did not stop: {outs[:4]}"
    # generate() cut each continuation at the stop token, after an answer made of digits
    for o in outs:
        answer = tok.decode(o[: o.index(stop)]).strip()
        assert answer and all(part.isdigit() for part in answer.split()), answer
