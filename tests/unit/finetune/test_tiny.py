from transformers import AutoModelForCausalLM, AutoTokenizer


def test_tiny_llama_loads_through_from_pretrained(tiny_llama_dir):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tok)
    ids = tok("What is 1 plus 2?", return_tensors="pt").input_ids
    assert model(ids).logits.shape == (1, ids.shape[1], len(tok))


def test_tiny_gpt2_loads(tiny_gpt2_dir):
    assert AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).config.model_type == "gpt2"


def test_tokenizer_chat_template_marks_assistant(tiny_tokenizer):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    out = tiny_tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assistant = tiny_tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert assistant == "hello<|im_end|>"
    assert tiny_tokenizer.eos_token == "<|im_end|>" and tiny_tokenizer.pad_token == "<pad>"
