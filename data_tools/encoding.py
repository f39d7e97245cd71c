"""How parsed records become token ids (+ a loss mask for SFT formats); the formats themselves: ``data_tools.formats``.

SFT formats are rendered through the tokenizer's chat template, or :data:`DEFAULT_CHAT_TEMPLATE` (ChatML) when the
tokenizer has none. The loss mask is 1 exactly on the tokens the template emits for assistant turns (their end-of-turn
token included) and 0 on system/user/tool tokens; every assistant turn of a multi-turn conversation counts. Two ways:

* ``generation``: the template marks assistant text with ``{% generation %}`` tags, so
  ``apply_chat_template(..., return_assistant_tokens_mask=True)`` gives the mask directly (the tiny test tokenizer and
  the default template do).
* ``prefix``: for templates without tags. For each assistant turn ``i``, the text rendered for ``messages[:i]`` with
  the generation prompt and the text rendered for ``messages[:i+1]`` bound the assistant's characters (trailing
  whitespace the template adds after the end-of-turn token is left out); tokens overlapping those characters get 1.
  This needs a template whose rendering of a conversation prefix is a prefix of the full rendering; templates that
  rewrite earlier turns (e.g. strip reasoning from past turns) are rejected with a clear message.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import numpy as np

from data_tools.formats import (
    FORMATS,
    SFT_FORMATS,
    BadRecord,
    FormatError,
    parse_json_line,
    record_to_messages,
    record_to_text,
)

MASK_METHODS = ("auto", "generation", "prefix")

# Used when the tokenizer has no chat template. ChatML (Qwen, many others); finetune.tiny gives its tokenizers this one.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

# Document separators preferred over eos for --append-eod: for chat tokenizers eos is often the end-of-turn token.
EOD_TOKENS = ("<|endoftext|>", "<|end_of_text|>")


class Rejected(NamedTuple):
    """A record that cannot be converted. ``reason`` is a short category counted in the meta; ``message`` says what."""

    reason: str
    message: str


class Encoded(NamedTuple):
    """Token ids of one record, its loss mask (uint8, same length; None for ``text``) and whether it was truncated."""

    ids: np.ndarray
    mask: np.ndarray | None
    truncated: bool


def has_generation_tags(template: str) -> bool:
    """True when a chat template marks assistant text with ``{% generation %}``."""
    return bool(_GENERATION_TAG.search(template))


def chat_template_of(tokenizer) -> tuple[str, bool]:
    """The tokenizer's chat template (a single string), and False; or :data:`DEFAULT_CHAT_TEMPLATE` and True."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates; "default" is what apply_chat_template uses
        template = template.get("default")
    if not template:
        return DEFAULT_CHAT_TEMPLATE, True
    return template, False


def eod_token_id(tokenizer) -> int:
    """Token appended by ``--append-eod``: a document separator (``<|endoftext|>``) if the vocab has one, else eos."""
    vocab = tokenizer.get_vocab()
    for token in EOD_TOKENS:
        if token in vocab:
            return int(vocab[token])
    if tokenizer.eos_token_id is None:
        raise FormatError("--append-eod: the tokenizer has neither <|endoftext|> nor an eos token")
    return int(tokenizer.eos_token_id)


class SampleEncoder:
    """Turns parsed records of one format into :class:`Encoded` (or :class:`Rejected`), a batch at a time.

    Args:
        tokenizer: a Hugging Face tokenizer (fast ones use the Rust batch encoder directly).
        fmt: one of :data:`FORMATS`.
        dtype: numpy dtype of the token ids handed back.
        text_key: key of the text for ``text``.
        append_eod: append :func:`eod_token_id` to each ``text`` document.
        max_length: longest sample in tokens, or None.
        over_length: ``error`` (reject, reason ``over_length``), ``truncate`` (keep the first ``max_length``
            tokens) or ``drop`` (reject, the converter drops it without failing).
        mask_method: ``auto`` (``generation`` if the template has generation tags, else ``prefix``), ``generation``
            or ``prefix``.
    """

    def __init__(
        self,
        tokenizer,
        fmt: str,
        dtype: np.dtype | type = np.int32,
        text_key: str = "text",
        append_eod: bool = False,
        max_length: int | None = None,
        over_length: str = "error",
        mask_method: str = "auto",
    ):
        if fmt not in FORMATS:
            raise FormatError(f"format {fmt!r}: expected one of {FORMATS}")
        if mask_method not in MASK_METHODS:
            raise FormatError(f"mask_method {mask_method!r}: expected one of {MASK_METHODS}")
        if over_length not in ("error", "truncate", "drop"):
            raise FormatError(f"over_length {over_length!r}: expected error, truncate or drop")
        if max_length is not None and max_length < 1:
            raise FormatError(f"max_length must be >= 1, got {max_length}")
        self.tokenizer = tokenizer
        self.fmt = fmt
        self.dtype = np.dtype(dtype)
        self.text_key = text_key
        self.eod = eod_token_id(tokenizer) if append_eod and fmt == "text" else None
        self.max_length = max_length
        self.over_length = over_length
        self.template, self.default_template = chat_template_of(tokenizer)
        if mask_method == "auto":
            mask_method = "generation" if has_generation_tags(self.template) else "prefix"
        if mask_method == "generation" and not has_generation_tags(self.template):
            raise FormatError("mask_method 'generation' needs a chat template with {% generation %} tags")
        self.mask_method = mask_method if fmt in SFT_FORMATS else None
        self._rust_text: bool | None = None  # decided on the first text batch

    # -- text -------------------------------------------------------------------------------------------------------
    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        if self._rust_text is None:
            # The Rust batch encoder without offsets computes what tokenizer(text) does, minus the Python work per
            # call; a tokenizer whose Python side changes the ids (rare) is caught here on the first batch.
            rust = bool(getattr(self.tokenizer, "is_fast", False))
            if rust:
                probe = texts[:8]
                rust_ids = [e.ids for e in self.tokenizer.backend_tokenizer.encode_batch_fast(probe)]
                rust = rust_ids == self.tokenizer(probe)["input_ids"]
            self._rust_text = rust
        if self._rust_text:
            return [e.ids for e in self.tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=True)]
        return self.tokenizer(texts)["input_ids"]

    # -- SFT --------------------------------------------------------------------------------------------------------
    def _render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, chat_template=self.template, add_generation_prompt=add_generation_prompt
        )

    def _generation_masks(self, conversations: list[list[dict]]) -> list[tuple[list[int], list[int]]]:
        out = self.tokenizer.apply_chat_template(
            conversations,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            chat_template=self.template,
        )
        return list(zip(out["input_ids"], out["assistant_masks"], strict=True))

    def _assistant_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        full = self._render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(messages[:i], add_generation_prompt=True)
            through = self._render(messages[: i + 1])
            if not (through.startswith(before) and full.startswith(through)):
                raise BadRecord(
                    "template",
                    f"the chat template does not render messages[:{i + 1}] as a prefix of the conversation, so the "
                    "assistant tokens cannot be located; use a template with {% generation %} tags",
                )
            end = len(through)
            # The newline ChatML puts after <|im_end|> belongs to the layout, not to what the model must emit.
            while end > len(before) and through[end - 1].isspace():
                end -= 1
            spans.append((len(before), end))
        return full, spans

    def _prefix_masks(self, conversations: list[list[dict]]) -> list[tuple[list[int], np.ndarray] | BadRecord]:
        rendered: list[tuple[str, list] | BadRecord] = []
        for messages in conversations:
            try:
                rendered.append(self._assistant_spans(messages))
            except BadRecord as bad:
                rendered.append(bad)
            except Exception as exc:  # noqa: BLE001 - e.g. a template's raise_exception("roles must alternate")
                rendered.append(BadRecord("template", f"the chat template failed: {type(exc).__name__}: {exc}"))
        texts = [r[0] for r in rendered if not isinstance(r, BadRecord)]
        # Same call apply_chat_template(tokenize=True) makes: the template already holds the special tokens.
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True) if texts else None
        out: list = []
        k = 0
        for r in rendered:
            if isinstance(r, BadRecord):
                out.append(r)
                continue
            ids, offsets = enc["input_ids"][k], np.asarray(enc["offset_mapping"][k], dtype=np.int64).reshape(-1, 2)
            k += 1
            mask = np.zeros(len(ids), dtype=np.uint8)
            for start, end in r[1]:
                mask[(offsets[:, 0] < end) & (offsets[:, 1] > start)] = 1
            out.append((ids, mask))
        return out

    def _encode_conversations(self, conversations: list[list[dict]]) -> list:
        if self.mask_method == "prefix":
            return self._prefix_masks(conversations)
        return self._generation_masks(conversations)

    def _encode_payloads(self, payloads: list) -> list:
        """Encode texts or conversations in one batch; if the batch fails, find the records to blame one by one."""
        encode = self._encode_texts if self.fmt == "text" else self._encode_conversations
        try:
            return encode(payloads)
        except Exception:  # noqa: BLE001 - one bad record must not hide which one it was: retried per record below
            out = []
            for payload in payloads:
                try:
                    out.append(encode([payload])[0])
                except Exception as exc:  # noqa: BLE001 - reported for this record as a Rejected with the cause
                    out.append(_unencodable(payload, exc))
            return out

    # -- common -----------------------------------------------------------------------------------------------------
    def _finish(self, ids, mask) -> Encoded | Rejected:
        ids = np.asarray(ids, dtype=self.dtype)
        if mask is not None:
            mask = np.asarray(mask, dtype=np.uint8)
        if len(ids) == 0:
            return Rejected("empty", "the sample encodes to no tokens")
        truncated = False
        if self.max_length is not None and len(ids) > self.max_length:
            if self.over_length != "truncate":
                return Rejected(
                    "over_length",
                    f"sample has {len(ids)} tokens, longer than --max-length {self.max_length}; "
                    "raise --max-length or pass --over-length truncate/drop",
                )
            ids, truncated = ids[: self.max_length], True
            if mask is not None:
                mask = mask[: self.max_length]
                if not mask.any():
                    return Rejected(
                        "over_length",
                        f"truncation to --max-length {self.max_length} removes every assistant token",
                    )
        return Encoded(ids, mask, truncated)

    def encode_batch(self, records: list[Any]) -> list[Encoded | Rejected]:
        """Encode parsed records, keeping their order; bad records come back as :class:`Rejected`."""
        results: list[Encoded | Rejected | None] = [None] * len(records)
        todo, payloads = [], []
        for n, record in enumerate(records):
            try:
                if self.fmt == "text":
                    payloads.append(record_to_text(record, self.text_key))
                else:
                    payloads.append(record_to_messages(record, self.fmt))
                todo.append(n)
            except BadRecord as bad:
                results[n] = Rejected(bad.reason, bad.message)
        if not todo:
            return results  # type: ignore[return-value]
        for n, item in zip(todo, self._encode_payloads(payloads), strict=True):
            if isinstance(item, BadRecord):
                results[n] = Rejected(item.reason, item.message)
            elif self.fmt == "text":
                results[n] = self._finish([*item, self.eod] if self.eod is not None else item, None)
            else:
                results[n] = self._finish(*item)
        return results  # type: ignore[return-value]


def _unencodable(payload: str | list[dict], exc: Exception) -> BadRecord:
    """Why one text/conversation could not be tokenized, in words a user can act on."""
    texts = [payload] if isinstance(payload, str) else [m["content"] for m in payload]
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            # JSON allows "\ud800" escapes that decode to half a UTF-16 pair: not text, and tokenizers reject it.
            return BadRecord("bad_encoding", f"contains a lone UTF-16 surrogate ({text[err.start]!r}), not valid text")
    reason = "tokenizer" if isinstance(payload, str) else "template"
    what = "the tokenizer" if isinstance(payload, str) else "the chat template / tokenizer"
    return BadRecord(reason, f"{what} failed on this record: {type(exc).__name__}: {exc}")


def encode_raw_batch(encoder: SampleEncoder, payloads: list) -> list[Encoded | Rejected]:
    """Parse (``bytes`` jsonl lines; already-parsed objects pass through) and encode a batch, order kept."""
    records, where, results = [], [], [None] * len(payloads)
    for n, payload in enumerate(payloads):
        if isinstance(payload, bytes):
            try:
                payload = parse_json_line(payload)
            except BadRecord as bad:
                results[n] = Rejected(bad.reason, bad.message)
                continue
        records.append(payload)
        where.append(n)
    for n, result in zip(where, encoder.encode_batch(records), strict=True):
        results[n] = result
    return results  # type: ignore[return-value]
