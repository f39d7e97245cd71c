"""Build small models and tokenizers locally: for tests, the demo and CPU benchmarks (nothing is downloaded).

Everything is written with ``save_pretrained`` so callers load it back through the real
``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained`` path, exactly like a hub id or local checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from data_tools.templates import CHATML_TEMPLATE

# Tokenizer styles, each shaped like a family users bring (``train_tokenizer(style=...)``):
#   chatml: a chat tokenizer whose eos is its end-of-turn token <|im_end|> (Qwen2.5-Instruct style)
#   qwen:   the same ChatML template, but eos is <|endoftext|>, not the <|im_end|> that ends turns (Qwen2.5 base)
#   base:   a base model's: bos <s> prepended to every encoding, eos </s>, no chat template, no ChatML tokens (Llama)
TOKENIZER_STYLES = ("chatml", "qwen", "base")
_SPECIALS = {
    "chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"],
    "qwen": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"],
    "base": ["<s>", "</s>"],
}

_DEFAULT_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Fine-tuning adapts a pretrained language model to a new task.",
    "DeepSpeed ZeRO partitions optimizer states, gradients and parameters across ranks.",
    "What is 12 plus 30? The answer is 42.",
    "Reverse the word banana: ananab.",
    "Translate to upper case: hello world -> HELLO WORLD.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 + - * / = ?",
]


def train_tokenizer(out_dir: str | Path, texts: Iterable[str] | None = None, vocab_size: int = 512, style="chatml"):
    """Train a byte-level BPE tokenizer (a few seconds) in one of :data:`TOKENIZER_STYLES` and save it to ``out_dir``.

    Returns the loaded ``PreTrainedTokenizerFast``. ``chatml`` (the default): eos ``<|im_end|>`` (end of an
    assistant turn), pad ``<pad>``, ``<|endoftext|>`` the document separator for plain text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if style not in TOKENIZER_STYLES:
        raise ValueError(f"style={style!r}: expected one of {TOKENIZER_STYLES}")
    texts = list(texts) if texts is not None else _DEFAULT_CORPUS * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIALS[style],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if style == "base":
        # Llama's post-processor: tokenizer(text) starts with bos, so a chat template must emit it itself.
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
        kwargs = dict(bos_token="<s>", eos_token="</s>")
    else:
        eos = "<|im_end|>" if style == "chatml" else "<|endoftext|>"
        kwargs = dict(
            eos_token=eos,
            pad_token="<pad>",
            bos_token=None,
            additional_special_tokens=[t for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>") if t != eos],
            chat_template=CHATML_TEMPLATE,
        )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=None, model_max_length=4096, **kwargs)
    fast.padding_side = "right"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def build_model(
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_positions: int = 2048,
    seed: int = 0,
):
    """Random-init a small Llama or GPT-2 sized for the tokenizer in ``tokenizer_dir``; save model + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = len(tokenizer)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            max_position_embeddings=max_positions,
            tie_word_embeddings=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=None,
        )
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_inner=intermediate_size,
            n_positions=max_positions,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.eos_token_id,
        )
    else:
        raise ValueError(f"arch={arch!r}: expected 'llama' or 'gpt2'")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
