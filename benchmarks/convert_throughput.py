"""Converter throughput on a generated ≥ 50 MB jsonl corpus, against a plain ``tokenizer(text)`` loop.

    python -m benchmarks.convert_throughput          # or: make bench (all benchmarks)
    DSFT_BENCH_CONVERT_MB=10 python -m benchmarks.convert_throughput   # a quick run while developing

Rows:
* reference: the loop most people write first: read a line, ``json.loads``, ``tokenizer(text)["input_ids"]``, one
  document at a time in one process (nothing written).
* HF tokenizers raw batch: ``backend_tokenizer.encode_batch_fast`` on texts already in memory, 1024 at a time, with
  the Rust thread pool on every core: the ceiling for tokenization alone (no reading, parsing or writing).
* ``data_tools.convert`` with 1 and 2 workers: the whole job (read, parse, encode, write ``.bin/.idx`` + meta).
  With 1 worker the encoding runs in the main process, where the Rust batch encoder may itself use several threads.
* SFT: 10 MB of alpaca records cut from the same corpus, converted with the loss mask, against a loop of one
  ``apply_chat_template(..., return_assistant_tokens_mask=True)`` call per record.

The corpus is deterministic (numpy seed 0): Zipf-distributed pseudo-words in sentences, document lengths
log-normal around ~1 kB, like web text. A byte-level BPE tokenizer (vocab 16k) is trained on a 2 MB sample.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

CORPUS_MB = float(os.environ.get("DSFT_BENCH_CONVERT_MB", "50"))
SFT_MB = float(os.environ.get("DSFT_BENCH_CONVERT_SFT_MB", "10"))
VOCAB_SIZE = 16_000
BATCH = 1024


def generate_corpus(path: Path, megabytes: float, seed: int = 0) -> tuple[int, int]:
    """Write ``megabytes`` of ``{"text": ...}`` lines; returns (documents, bytes)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    letter_p = np.linspace(2.0, 0.2, len(letters))
    letter_p /= letter_p.sum()
    lengths = rng.integers(2, 11, size=20_000)
    words = np.array(["".join(rng.choice(letters, size=n, p=letter_p)) for n in lengths])
    target = int(megabytes * 1e6)
    written = docs = 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < target:
            n_words = np.clip(rng.lognormal(mean=5.0, sigma=0.6, size=512), 10, 3000).astype(int)
            ids = np.minimum(rng.zipf(1.2, size=int(n_words.sum())) - 1, len(words) - 1)
            pieces = words[ids]
            start = 0
            lines = []
            for n in n_words:
                sentence = " ".join(pieces[start : start + n])
                start += n
                # Sentences of ~12 words with punctuation and a capital, so the text is not one endless run.
                text = ". ".join(sentence[i : i + 80].strip().capitalize() for i in range(0, len(sentence), 80)) + "."
                lines.append(json.dumps({"text": text}) + "\n")
            block = "".join(lines)
            fh.write(block)
            written += len(block.encode())
            docs += len(lines)
    return docs, written


def _reference(path: Path, tokenizer) -> tuple[int, int]:
    docs = tokens = 0
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            ids = tokenizer(json.loads(line)["text"])["input_ids"]
            docs += 1
            tokens += len(ids)
    return docs, tokens


def _raw_batch(texts: list[str], tokenizer) -> int:
    tokens = 0
    backend = tokenizer.backend_tokenizer
    for i in range(0, len(texts), BATCH):
        tokens += sum(len(e.ids) for e in backend.encode_batch_fast(texts[i : i + BATCH], add_special_tokens=True))
    return tokens


def generate_alpaca(path: Path, text_corpus: Path, megabytes: float) -> tuple[int, int]:
    """Alpaca records cut from the text corpus (instruction ~1/4, output ~3/4 of a document); returns (docs, bytes)."""
    target = int(megabytes * 1e6)
    docs = written = 0
    with open(text_corpus, encoding="utf-8") as src, open(path, "w", encoding="utf-8") as out:
        for line in src:
            text = json.loads(line)["text"][:2000]
            cut = len(text) // 4
            record = json.dumps({"instruction": text[:cut], "input": "", "output": text[cut:]}) + "\n"
            out.write(record)
            docs += 1
            written += len(record.encode())
            if written >= target:
                break
    return docs, written


def _reference_sft(path: Path, tokenizer) -> tuple[int, int]:
    """One apply_chat_template call per record, with the assistant mask: the plain SFT loop."""
    docs = tokens = 0
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            messages = [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
            out = tokenizer.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            docs += 1
            tokens += len(out["input_ids"])
    return docs, tokens


class _Clock:
    """Wall time and CPU time (user + sys of this process, its threads and its finished worker processes)."""

    @staticmethod
    def _cpu() -> float:
        me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), self._cpu()

    def elapsed(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, self._cpu() - self.cpu


def _row(name: str, clock: _Clock, docs: int, tokens: int, nbytes: int) -> dict:
    seconds, cpu_seconds = clock.elapsed()
    return {
        "method": name,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "docs_per_s": docs / seconds,
        "tokens_per_s": tokens / seconds,
        "mb_per_s": nbytes / 1e6 / seconds,
    }


def _table(rows: list[dict]) -> list[str]:
    ref = next(r for r in rows if r["method"].startswith("reference"))
    lines = [
        "| method | seconds | CPU s | docs/s | tokens/s | MB/s | vs reference |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        r["vs_reference"] = r["tokens_per_s"] / ref["tokens_per_s"]
        lines.append(
            f"| {r['method']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['docs_per_s']:,.0f} "
            f"| {r['tokens_per_s']:,.0f} | {r['mb_per_s']:.1f} | {r['vs_reference']:.2f}× |"
        )
    return lines


def run() -> dict:
    """Run the benchmark; returns ``{"title", "markdown", "data"}`` for ``benchmarks.run``."""
    from transformers import AutoTokenizer

    from data_tools.convert import convert
    from finetune.tiny import train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="dsft-bench-convert-"))
    try:
        corpus = work / "corpus.jsonl"
        t0 = time.perf_counter()
        n_docs, n_bytes = generate_corpus(corpus, CORPUS_MB)
        sft_docs, sft_bytes = generate_alpaca(work / "alpaca.jsonl", corpus, SFT_MB)
        gen_s = time.perf_counter() - t0
        sample = []
        with open(corpus, encoding="utf-8") as fh:
            size = 0
            for line in fh:
                sample.append(json.loads(line)["text"])
                size += len(line)
                if size > 2_000_000:
                    break
        train_tokenizer(work / "tok", sample, vocab_size=VOCAB_SIZE)
        tokenizer = AutoTokenizer.from_pretrained(work / "tok")

        def timed_convert(src: Path, fmt: str, workers: int, nbytes: int) -> tuple[dict, int]:
            clock = _Clock()
            res = convert(src, work / f"out_{fmt}{workers}", tokenizer, fmt=fmt, workers=workers, progress=False)
            name = f"data_tools.convert, {workers} worker{'s' if workers > 1 else ''}"
            c = res.meta["counts"]
            return _row(name, clock, c["documents"], c["tokens"], nbytes), c["tokens"]

        # Converter runs first: forking after the Rust thread pool has been used makes tokenizers drop to one thread.
        text_rows, sft_rows = [], []
        for workers in (2, 1):
            r, text_tokens = timed_convert(corpus, "text", workers, n_bytes)
            text_rows.append(r)
            r, sft_tokens = timed_convert(work / "alpaca.jsonl", "alpaca", workers, sft_bytes)
            sft_rows.append(r)

        clock = _Clock()
        ref_docs, ref_tokens = _reference(corpus, tokenizer)
        text_rows.append(_row("reference: tokenizer(text) loop", clock, ref_docs, ref_tokens, n_bytes))
        assert ref_tokens == text_tokens, "converter and reference disagree on the token count"
        clock = _Clock()
        docs, tokens = _reference_sft(work / "alpaca.jsonl", tokenizer)
        sft_rows.append(_row("reference: apply_chat_template loop", clock, docs, tokens, sft_bytes))
        assert tokens == sft_tokens, "converter and reference disagree on the SFT token count"

        with open(corpus, encoding="utf-8") as fh:
            texts = [json.loads(line)["text"] for line in fh]
        clock = _Clock()
        raw_tokens = _raw_batch(texts, tokenizer)
        text_rows.append(_row("HF tokenizers encode_batch_fast (in memory)", clock, len(texts), raw_tokens, n_bytes))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    lines = [
        f"Text: {n_bytes / 1e6:.1f} MB jsonl, {n_docs:,} documents, {ref_tokens:,} tokens (byte-level BPE, vocab "
        f"{len(tokenizer):,}); corpora generated in {gen_s:.1f}s; {os.cpu_count()} cores. Reference = one process, "
        "one document per call, reading and json.loads included. CPU s = user + sys of the process, its threads "
        "and its workers: on a shared machine it is the load-independent figure (quiet: wall ≈ CPU s / busy cores).",
        "",
        *_table(text_rows),
        "",
        f"SFT (alpaca, ChatML template, loss mask): {sft_bytes / 1e6:.1f} MB, {sft_docs:,} records.",
        "",
        *_table(sft_rows),
    ]
    return {
        "title": "jsonl → mmap conversion throughput",
        "markdown": "\n".join(lines),
        "data": {
            "text": {"corpus_bytes": n_bytes, "documents": n_docs, "tokens": ref_tokens, "rows": text_rows},
            "sft": {"corpus_bytes": sft_bytes, "documents": sft_docs, "rows": sft_rows},
        },
    }


if __name__ == "__main__":
    result = run()
    print(f"## {result['title']}\n\n{result['markdown']}")
