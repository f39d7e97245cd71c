"""How parsed records become token ids (+ a loss mask for SFT formats); the formats themselves: ``data_tools.formats``.

SFT records are rendered with the chat template :func:`data_tools.templates.resolve_chat_template` picks (a
``--chat-template`` file, the tokenizer's own, or the default for base models), with the record's ``tools``. The
loss mask is 1 exactly on what the template emits for each trained assistant turn (its end-of-turn token included)
and 0 on system/user/tool tokens, on the header that opens an assistant turn, and on assistant turns whose
``loss_weight`` is 0. Both methods find character spans in the rendered text; one batched tokenizer call with offsets
maps them to tokens:

* ``generation``: the template marks assistant output with ``{% generation %}`` tags; the spans are the tags'.
* ``prefix``: templates without tags. For assistant turn ``i`` the output starts where the rendering of
  ``messages[:i]`` with the generation prompt ends, and ends where the rendering of ``messages[:i+1]`` ends (layout
  whitespace after the end-of-turn token left out). Templates that rewrite earlier turns once later ones follow
  (Qwen3 strips the reasoning of assistant turns before the last user query) render ``messages[:i+1]`` differently
  from the same turn inside the whole conversation; the turn then ends at the template's end-of-turn marker
  (learned from a probe conversation) after its start, so the mask is what the same template with generation tags
  gives: the turn as rendered in the full conversation.

A record is refused (never silently trimmed) when the template would drop part of it: tools, tool calls or reasoning
the template never reads, or a non-assistant message that does not appear in the rendering.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import numpy as np

from data_tools.formats import (
    FORMATS,
    REASONING_KEYS,
    SFT_FORMATS,
    BadRecord,
    Conversation,
    FormatError,
    parse_json_line,
    record_to_conversation,
    record_to_text,
    unread_fields,
)
from data_tools.templates import ChatTemplate, resolve_chat_template

MASK_METHODS = ("auto", "generation", "prefix")

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")

# Document separators preferred over eos for --append-eod: for chat tokenizers eos is often the end-of-turn token.
EOD_TOKENS = ("<|endoftext|>", "<|end_of_text|>")

# Probe conversations for a template's end-of-turn marker (what follows an assistant's content).
_PROBE_REPLY = "dsft probe reply"
_PROBES = (
    [{"role": "user", "content": "dsft probe question"}, {"role": "assistant", "content": _PROBE_REPLY}],
    [
        {"role": "system", "content": "dsft probe system"},
        {"role": "user", "content": "dsft probe question"},
        {"role": "assistant", "content": _PROBE_REPLY},
    ],
)


class Rejected(NamedTuple):
    """A record that cannot be converted. ``reason`` is a short category counted in the meta; ``message`` says what."""

    reason: str
    message: str


class Encoded(NamedTuple):
    """One converted record.

    Attributes:
        ids: token ids.
        mask: uint8 loss mask of the same length (None for ``text``).
        truncated: the sample was cut to ``max_length``.
        lost: tokens cut off by truncation.
        turn_ends: ids of the last token of every trained assistant turn kept whole (what the model learns to end
            a turn with, so what generation must stop on).
        ignored: the record's fields the format does not read.
    """

    ids: np.ndarray
    mask: np.ndarray | None
    truncated: bool
    lost: int = 0
    turn_ends: tuple[int, ...] = ()
    ignored: tuple[str, ...] = ()


def has_generation_tags(template: str) -> bool:
    """True when a chat template marks assistant text with ``{% generation %}``."""
    return bool(_GENERATION_TAG.search(template))


def eod_token_id(tokenizer) -> int:
    """Token appended by ``--append-eod``: a document separator (``<|endoftext|>``) if the vocab has one, else eos."""
    vocab = tokenizer.get_vocab()
    for token in EOD_TOKENS:
        if token in vocab:
            return int(vocab[token])
    if tokenizer.eos_token_id is None:
        raise FormatError("--append-eod: the tokenizer has neither <|endoftext|> nor an eos token")
    return int(tokenizer.eos_token_id)


def _template_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "this template cannot render this record" (bad input), not a bug of dsft's."""
    from jinja2 import TemplateError

    # raise_exception("roles must alternate") and undefined fields are TemplateErrors; a template doing arithmetic
    # or string operations on a value of the wrong type raises TypeError/ValueError from inside the sandbox.
    return (TemplateError, TypeError, ValueError)


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
        chat_template: a Jinja file to render SFT records with instead of the tokenizer's template.
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
        chat_template: str | None = None,
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
        self._rust_text: bool | None = None  # decided on the first text batch
        self._rust_chat: bool | None = None  # decided on the first batch of rendered conversations
        self.template: ChatTemplate | None = None
        self.mask_method: str | None = None
        if fmt in SFT_FORMATS:
            self.template = resolve_chat_template(tokenizer, chat_template)
            tagged = has_generation_tags(self.template.text)
            if mask_method == "auto":
                mask_method = "generation" if tagged else "prefix"
            if mask_method == "generation" and not tagged:
                raise FormatError("mask_method 'generation' needs a chat template with {% generation %} tags")
            self.mask_method = mask_method
            self._check_compiles()
            text = self.template.text
            # What the template reads: a record carrying a field it never reads would lose it silently.
            self._reads = {
                "tools": "tools" in text,
                "tool_calls": "tool_calls" in text,
                "reasoning": any(k in text for k in REASONING_KEYS),
            }
            self._end_marker: str | None | bool = False  # learned on first need (templates that rewrite turns)

    def _check_compiles(self) -> None:
        from jinja2 import TemplateError
        from transformers.utils.chat_template_utils import _compile_jinja_template

        try:
            _compile_jinja_template(self.template.text)
        except TemplateError as exc:
            where = self.template.path or f"the {self.template.source} chat template"
            raise FormatError(f"{where}: not a valid Jinja template ({exc})") from exc

    def _rust_agrees(self, probe: list[str], add_special_tokens: bool) -> bool:
        """Whether the Rust batch encoder gives ``tokenizer(probe)``'s ids: it then replaces the call, minus its
        Python work per text. A tokenizer whose Python side changes the ids (rare) is caught on the first batch."""
        if not getattr(self.tokenizer, "is_fast", False):
            return False
        rust = self.tokenizer.backend_tokenizer.encode_batch(probe, add_special_tokens=add_special_tokens)
        return [e.ids for e in rust] == self.tokenizer(probe, add_special_tokens=add_special_tokens)["input_ids"]

    # -- text -------------------------------------------------------------------------------------------------------
    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        if self._rust_text is None:
            self._rust_text = self._rust_agrees(texts[:8], add_special_tokens=True)
        if self._rust_text:
            return [e.ids for e in self.tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=True)]
        return self.tokenizer(texts)["input_ids"]

    # -- SFT: rendering ---------------------------------------------------------------------------------------------
    def _render(
        self, messages: list[dict], tools, add_generation_prompt: bool = False, spans: bool = False
    ) -> tuple[str, list[tuple[int, int]]]:
        """The template's text for ``messages`` (and the ``{% generation %}`` spans when ``spans``)."""
        from transformers.utils.chat_template_utils import render_jinja_template

        # apply_chat_template(tokenize=False) does exactly this; calling the renderer gives the spans without a
        # second tokenization, with per-record tools.
        try:
            texts, indices = render_jinja_template(
                conversations=[messages],
                tools=tools,
                chat_template=self.template.text,
                return_assistant_tokens_mask=spans,
                add_generation_prompt=add_generation_prompt,
                **self.tokenizer.special_tokens_map,
            )
        except _template_errors() as exc:  # e.g. a template's raise_exception("roles must alternate")
            raise BadRecord("template", f"the chat template failed: {type(exc).__name__}: {exc}") from exc
        return texts[0], (indices[0] if spans else [])

    def _end_of_turn(self) -> str | None:
        """What the template puts after an assistant's content (``<|im_end|>``, ``<|eot_id|>``), from a probe."""
        if self._end_marker is False:
            self._end_marker = None
            for probe in _PROBES:
                try:
                    text, _ = self._render(probe, None)
                except BadRecord:
                    continue
                k = text.rfind(_PROBE_REPLY)
                if k >= 0 and text[k + len(_PROBE_REPLY) :].strip():
                    self._end_marker = text[k + len(_PROBE_REPLY) :].strip()
                    break
        return self._end_marker  # type: ignore[return-value]

    def _prefix_spans(self, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
        msgs = conv.messages
        full, _ = self._render(msgs, conv.tools)
        spans = []
        for i, trained in enumerate(conv.trained):
            if not trained:
                continue
            before, _ = self._render(msgs[:i], conv.tools, add_generation_prompt=True)
            if not full.startswith(before):
                raise BadRecord(
                    "template",
                    f"the chat template renders the turns before messages[{i}] differently once later turns follow, "
                    "so the assistant tokens cannot be located; use a template with {% generation %} tags around "
                    "each assistant output (--chat-template)",
                )
            start = len(before)
            through, _ = self._render(msgs[: i + 1], conv.tools)
            if through.startswith(before) and full.startswith(through):
                end = len(through)
            else:  # the template rewrites this turn once later turns follow (see the module docstring)
                marker = self._end_of_turn()
                found = full.find(marker, start) if marker else -1
                if found < 0:
                    raise BadRecord(
                        "template",
                        f"the chat template renders messages[{i}] differently once later turns follow and has no "
                        "end-of-turn marker to find it by; use a template with {% generation %} tags (--chat-template)",
                    )
                end = found + len(marker)
            # The newline ChatML puts after <|im_end|> belongs to the layout, not to what the model must emit.
            while end > start and full[end - 1].isspace():
                end -= 1
            spans.append((start, end))
        return full, spans

    def _generation_spans(self, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
        full, blocks = self._render(conv.messages, conv.tools, spans=True)
        if all(conv.trained[i] for i, m in enumerate(conv.messages) if m["role"] == "assistant"):
            return full, [b for b in blocks if b[1] > b[0]]
        turns = [i for i, m in enumerate(conv.messages) if m["role"] == "assistant"]
        if len(blocks) != len(turns):
            raise BadRecord(
                "template",
                f"loss_weight needs one {{% generation %}} block per assistant turn; the template gave {len(blocks)} "
                f"for {len(turns)} turns",
            )
        return full, [b for b, i in zip(blocks, turns, strict=True) if conv.trained[i] and b[1] > b[0]]

    def _check_nothing_dropped(self, conv: Conversation, full: str) -> None:
        carried = {
            "tools": conv.tools is not None,
            "tool_calls": any(m.get("tool_calls") for m in conv.messages),
            "reasoning": any(k in m for m in conv.messages for k in REASONING_KEYS),
        }
        for field, present in carried.items():
            if present and not self._reads[field]:
                raise BadRecord(
                    "dropped_by_template",
                    f"the record has {field} but the chat template never reads them, so they would be dropped; "
                    "pass a template that renders them with --chat-template",
                )
        for i, m in enumerate(conv.messages):
            content = m["content"].strip()
            if m["role"] != "assistant" and content and content not in full:
                raise BadRecord(
                    "dropped_by_template",
                    f"messages[{i}] ({m['role']}) does not appear in the chat template's rendering (the template "
                    "drops or rewrites it); pass a template that renders it with --chat-template",
                )

    def _spans(self, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
        full, spans = (self._prefix_spans if self.mask_method == "prefix" else self._generation_spans)(conv)
        self._check_nothing_dropped(conv, full)
        return full, spans

    def _encode_conversations(self, conversations: list[Conversation]) -> list:
        """``(ids, mask, turn end positions)`` per conversation, or the ``BadRecord`` that explains it."""
        rendered: list[tuple[str, list] | BadRecord] = []
        for conv in conversations:
            try:
                rendered.append(self._spans(conv))
            except BadRecord as bad:
                rendered.append(bad)
        texts = [r[0] for r in rendered if not isinstance(r, BadRecord)]
        # Same call apply_chat_template(tokenize=True) makes: the template already holds the special tokens.
        encodings = self._tokenize_rendered(texts)
        out: list = []
        k = 0
        for r in rendered:
            if isinstance(r, BadRecord):
                out.append(r)
                continue
            enc = encodings[k]
            k += 1
            if isinstance(enc, BadRecord):
                out.append(enc)
                continue
            ids, offsets = enc
            mask = np.zeros(len(ids), dtype=np.uint8)
            ends = []
            for start, end in r[1]:
                hit = np.flatnonzero((offsets[:, 0] < end) & (offsets[:, 1] > start))
                if len(hit):
                    mask[hit] = 1
                    ends.append(int(hit[-1]))
            out.append((ids, mask, ends))
        return out

    def _tokenize_rendered(self, texts: list[str]) -> list:
        """``(ids, offsets)`` per text; a text the tokenizer refuses is a ``BadRecord`` when the input explains it."""
        if not texts:
            return []
        try:
            return self._ids_and_offsets(texts)
        except Exception:  # noqa: BLE001 - retried one by one below to blame the record; unexplained errors re-raise
            return [self._tokenize_one(t) for t in texts]

    def _ids_and_offsets(self, texts: list[str]) -> list[tuple[list[int], np.ndarray]]:
        if self._rust_chat is None:
            # apply_chat_template(tokenize=True) calls tokenizer(text, add_special_tokens=False); the Rust encoder
            # gives the offsets without converting each one to Python (a third of the SFT conversion time).
            self._rust_chat = self._rust_agrees(texts[:8], add_special_tokens=False)
        if self._rust_chat:
            encodings = self.tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
            return [(e.ids, np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2)) for e in encodings]
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return [
            (ids, np.asarray(off, dtype=np.int64).reshape(-1, 2))
            for ids, off in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
        ]

    def _tokenize_one(self, text: str):
        try:
            return self._ids_and_offsets([text])[0]
        except Exception as exc:  # noqa: BLE001 - bad input becomes a BadRecord, anything else is re-raised
            return _unencodable(text, exc)

    # -- common -----------------------------------------------------------------------------------------------------
    def _finish(self, ids, mask, ends=(), ignored: tuple[str, ...] = ()) -> Encoded | Rejected:
        ids = np.asarray(ids, dtype=self.dtype)
        if mask is not None:
            mask = np.asarray(mask, dtype=np.uint8)
        if len(ids) == 0:
            return Rejected("empty", "the sample encodes to no tokens")
        truncated, lost = False, 0
        if self.max_length is not None and len(ids) > self.max_length:
            if self.over_length != "truncate":
                return Rejected(
                    "over_length",
                    f"sample has {len(ids)} tokens, longer than --max-length {self.max_length}; "
                    "raise --max-length or pass --over-length truncate/drop",
                )
            lost = len(ids) - self.max_length
            ids, truncated = ids[: self.max_length], True
            ends = [e for e in ends if e < self.max_length]  # a turn cut in the middle taught no end of turn
            if mask is not None:
                mask = mask[: self.max_length]
                if not mask.any():
                    return Rejected(
                        "over_length",
                        f"truncation to --max-length {self.max_length} removes every assistant token",
                    )
        return Encoded(ids, mask, truncated, lost, tuple(int(ids[e]) for e in ends), ignored)

    def encode_batch(self, records: list[Any]) -> list[Encoded | Rejected]:
        """Encode parsed records, keeping their order; bad records come back as :class:`Rejected`."""
        results: list[Encoded | Rejected | None] = [None] * len(records)
        todo, payloads, ignored = [], [], []
        for n, record in enumerate(records):
            try:
                if self.fmt == "text":
                    payloads.append(record_to_text(record, self.text_key))
                    ignored.append(unread_fields(record, self.text_key))
                else:
                    conv = record_to_conversation(record, self.fmt)
                    payloads.append(conv)
                    ignored.append(conv.ignored)
                todo.append(n)
            except BadRecord as bad:
                results[n] = Rejected(bad.reason, bad.message + _format_hint(record, self.fmt, self.text_key, bad))
        if not todo:
            return results  # type: ignore[return-value]
        if self.fmt == "text":
            encoded = self._encode_text_payloads(payloads)
        else:
            encoded = self._encode_conversations(payloads)
        for n, item, unread in zip(todo, encoded, ignored, strict=True):
            if isinstance(item, BadRecord):
                results[n] = Rejected(item.reason, item.message)
            elif self.fmt == "text":
                results[n] = self._finish([*item, self.eod] if self.eod is not None else item, None, (), unread)
            else:
                results[n] = self._finish(*item, unread)
        return results  # type: ignore[return-value]

    def _encode_text_payloads(self, texts: list[str]) -> list:
        try:
            return self._encode_texts(texts)
        except Exception:  # noqa: BLE001 - one bad record must not hide which one it was: retried per record below
            out = []
            for text in texts:
                try:
                    out.append(self._encode_texts([text])[0])
                except Exception as exc:  # noqa: BLE001 - bad input becomes a BadRecord, anything else re-raises
                    out.append(_unencodable(text, exc))
            return out


def _format_hint(record: Any, fmt: str, text_key: str, bad: BadRecord) -> str:
    """When a record misses the keys of ``fmt`` but fits another format, say so (``format: messages`` on alpaca)."""
    if bad.reason != "missing_key" or not isinstance(record, dict):
        return ""
    from data_tools.formats import detect_format

    try:
        other = detect_format(record, text_key)
    except FormatError:
        return ""
    return f"; the record looks like format {other}: pass --format {other} or auto" if other != fmt else ""


def _unencodable(text: str, exc: Exception) -> BadRecord:
    """The input's fault (a lone UTF-16 surrogate) as a ``BadRecord``; any other tokenizer error is re-raised."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        # JSON allows "\ud800" escapes that decode to half a UTF-16 pair: not text, and tokenizers reject it.
        return BadRecord("bad_encoding", f"contains a lone UTF-16 surrogate ({text[err.start]!r}), not valid text")
    raise exc


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
