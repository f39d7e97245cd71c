"""Text conversion without importing transformers first: a local ``tokenizer.json`` loaded with ``tokenizers``.

Why: importing transformers and ``AutoTokenizer.from_pretrained`` cost ~4-8 s of one core before the first token
(transformers pulls in torch through its config modules; measured in ``benchmarks/convert_throughput.py``), which
caps a 50 MB conversion on 2 cores well below 2x a plain ``tokenizer(text)`` loop. ``Tokenizer.from_file`` on a 151k
vocabulary takes ~0.4 s, and the workers can fork right after it.

Ids must stay exactly those of ``AutoTokenizer.from_pretrained(path)(text)``. transformers may rebuild parts of the
backend (a class that updates the post-processor for ``add_bos_token``, special tokens from ``tokenizer_config.json``
missing from ``tokenizer.json``), so :class:`AgreementCheck` loads the transformers tokenizer in a thread while the
workers encode, and compares the serialised backend, the vocabulary, eos and the ids of probe texts (the first texts
of the input and a fixed set). The verdict is cached per tokenizer files and library versions
(``$XDG_CACHE_HOME/dsft/tokenizer-checks``), so only the first conversion with a tokenizer pays for it. When the two
disagree the converter redoes the conversion with the transformers tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from importlib import metadata
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
# Texts that exercise what differs between tokenizer set-ups: special tokens written in text, unicode
# normalisation, leading and repeated whitespace, digits, code.
PROBE_TEXTS = (
    "Hello world",
    "  leading spaces, trailing spaces  ",
    "<|endoftext|><|im_start|>user\nhi<|im_end|></s><s>[INST]",
    "Ünïcödé café naïve 日本語のテキスト 🙂 \u0301e",
    "digits 1234567890 3.14159 -42",
    "def f(x):\n\treturn x ** 2  # comment\n\n\n",
    "",
)


def tokenizer_folder(tokenizer: Any) -> Path | None:
    """The local folder of ``tokenizer`` when it is a path to one holding ``tokenizer.json``, else None."""
    if not isinstance(tokenizer, str | os.PathLike):
        return None
    folder = Path(tokenizer).expanduser()
    return folder if (folder / "tokenizer.json").is_file() else None


class RustTokenizer:
    """The part of ``PreTrainedTokenizerFast`` that text conversion uses, over ``tokenizers.Tokenizer``.

    Args:
        folder: a saved tokenizer (``tokenizer.json``, and ``tokenizer_config.json`` /
            ``special_tokens_map.json`` for eos).
    """

    is_fast = True

    def __init__(self, folder: str | os.PathLike):
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        self.name_or_path = str(folder)
        self.backend_tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        # tokenizer(text) never truncates or pads unless asked; a tokenizer.json may carry either setting.
        self.backend_tokenizer.no_truncation()
        self.backend_tokenizer.no_padding()
        self.eos_token = _special_token(self.folder, "eos_token")
        self.eos_token_id = self.backend_tokenizer.token_to_id(self.eos_token) if self.eos_token else None

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def convert_ids_to_tokens(self, i: int) -> str | None:
        return self.backend_tokenizer.id_to_token(int(i))

    def __call__(self, texts: str | list[str], add_special_tokens: bool = True) -> dict[str, Any]:
        single = isinstance(texts, str)
        encoded = self.backend_tokenizer.encode_batch(
            [texts] if single else texts, add_special_tokens=add_special_tokens
        )
        ids = [e.ids for e in encoded]
        return {"input_ids": ids[0] if single else ids}


def _special_token(folder: Path, name: str) -> str | None:
    for file in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / file
        if path.is_file():
            value = json.loads(path.read_text(encoding="utf-8")).get(name)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                return value
    return None


def _check_key(folder: Path) -> str:
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = folder / name
        h.update(f"{name}\n".encode())
        if path.is_file():
            h.update(hashlib.sha256(path.read_bytes()).digest())
    for package in ("transformers", "tokenizers"):
        h.update(f"{package}={metadata.version(package)}\n".encode())
    return h.hexdigest()


def _cache_dir() -> Path:
    root = os.environ.get("DSFT_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dsft"
    return Path(root) / "tokenizer-checks"


def _backend_config(tokenizer) -> dict:
    """The serialised backend minus what ``tokenizer(text)`` does not use or what means the same either way."""
    config = json.loads(tokenizer.to_str())
    config.pop("truncation", None)
    config.pop("padding", None)
    model = config.get("model") or {}
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):  # transformers writes "", tokenizers None
        if model.get(key) == "":
            model[key] = None
    return config


class AgreementCheck:
    """Whether :class:`RustTokenizer` gives the ids of ``AutoTokenizer.from_pretrained(folder)``; runs in a thread.

    Use: ``check = AgreementCheck(rust)``; ``check.start(probe_texts)`` once the workers have forked (a fork while
    the thread imports transformers could copy a held lock); ``check.result()`` before the output is committed.
    With a cached verdict no thread starts.
    """

    def __init__(self, rust: RustTokenizer):
        self.rust = rust
        self.key = _check_key(rust.folder)
        self.cache_file = _cache_dir() / f"{self.key}.json"
        self._thread: threading.Thread | None = None
        self._verdict: dict[str, Any] | None = None
        self._error: BaseException | None = None
        self.probe: list[str] = []  # input texts compared besides PROBE_TEXTS (set by the converter)
        self.hf_tokenizer = None  # the transformers tokenizer, once loaded (the fallback when they disagree)
        if self.cache_file.is_file():
            try:
                self._verdict = json.loads(self.cache_file.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                self._verdict = None  # an unreadable cache entry is checked again, then rewritten

    @property
    def cached(self) -> bool:
        return self._verdict is not None

    def start(self, probe_texts: list[str]) -> None:
        if self._verdict is not None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, args=(list(probe_texts),), name="dsft-tokenizer-check")
        self._thread.daemon = True
        self._thread.start()

    def _run(self, probe_texts: list[str]) -> None:
        try:
            self._verdict = self.compare(probe_texts)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread by result()
            self._error = exc

    def compare(self, probe_texts: list[str]) -> dict[str, Any]:
        """Load the transformers tokenizer and compare; returns ``{"agrees": bool, "why": str}`` (and caches it)."""
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(self.rust.folder))
        self.hf_tokenizer = hf
        why = ""
        texts = [*PROBE_TEXTS, *probe_texts]
        if not getattr(hf, "is_fast", False):
            why = f"AutoTokenizer loads {type(hf).__name__}, not a fast tokenizer"
        elif len(hf) != len(self.rust) or hf.get_vocab() != self.rust.get_vocab():
            why = f"vocabularies differ ({len(hf)} vs {len(self.rust)} tokens)"
        elif hf.eos_token_id != self.rust.eos_token_id:
            why = f"eos differs ({hf.eos_token_id} vs {self.rust.eos_token_id})"
        elif _backend_config(hf.backend_tokenizer) != _backend_config(self.rust.backend_tokenizer):
            why = "transformers builds another backend than tokenizer.json describes"
        elif hf(texts)["input_ids"] != self.rust(texts)["input_ids"]:
            why = "tokenizer(text) gives other ids than the backend"
        verdict = {"agrees": not why, "why": why, "tokenizer": self.rust.name_or_path, "class": type(hf).__name__}
        # Only a verdict that holds for every input is cached: the probe texts of this input agreed as well.
        try:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_file.with_name(f"{self.cache_file.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(verdict) + "\n", encoding="utf-8")
            os.replace(tmp, self.cache_file)
        except OSError as exc:  # a read-only cache only means the next conversion checks again
            logger.info("cannot cache the tokenizer check in %s (%s)", self.cache_file, exc)
        return verdict

    def result(self) -> dict[str, Any]:
        """The verdict (waits for the thread); re-raises what the thread raised."""
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        if self._verdict is None:  # never started (no input text): check now
            self._verdict = self.compare([])
        return self._verdict
