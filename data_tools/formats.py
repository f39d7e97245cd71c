"""Record formats of the converter and how each becomes token ids (+ a loss mask for SFT formats).

Formats (one JSON object per record):

``text``      ``{"text": "..."}`` (key set by ``--text-key``): one document for continued pre-training.
``alpaca``    ``{"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}``.
              The user turn is ``instruction`` followed by ``"\\n"`` and ``input`` when ``input`` is not empty
              (LLaMA-Factory's convention).
``sharegpt``  ``{"conversations": [{"from": ..., "value": ...}, ...], "system"?}``. Roles: ``human``/``user`` ->
              user, ``gpt``/``assistant`` -> assistant, ``system`` -> system, ``function_call`` -> assistant (the
              model emits the call, so it is trained on), ``observation`` -> tool (a tool result, never trained on).
``messages``  ``{"messages": [{"role": ..., "content": ...}, ...]}`` (OpenAI style; roles system/user/assistant/tool).

How an SFT record becomes token ids and a loss mask (chat templates, the two masking methods): ``data_tools.encoding``.
"""

from __future__ import annotations

import json
from typing import Any

FORMATS = ("text", "alpaca", "sharegpt", "messages")
SFT_FORMATS = ("alpaca", "sharegpt", "messages")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}
MESSAGE_ROLES = ("system", "user", "assistant", "tool")


class FormatError(ValueError):
    """The format cannot be determined or the tokenizer cannot render it (a problem of the whole run, not a line)."""


def detect_format(record: Any, text_key: str = "text") -> str:
    """Guess the format from one record's keys.

    Args:
        record: the first parsed record of the input.
        text_key: key holding the text for the ``text`` format.

    Returns:
        One of :data:`FORMATS`.

    Raises:
        FormatError: the record is not an object or has none of the known keys.
    """
    if not isinstance(record, dict):
        raise FormatError(f"cannot detect the format from a {type(record).__name__} record; expected a JSON object")
    if "conversations" in record:
        return "sharegpt"
    if "messages" in record:
        return "messages"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if text_key in record:
        return "text"
    raise FormatError(
        f"cannot detect the format from keys {sorted(record)}: expected 'conversations' (sharegpt), 'messages', "
        f"'instruction'+'output' (alpaca) or {text_key!r} (text); pass --format (and --text-key for text)"
    )


def _require(record: dict, key: str, types: type | tuple, what: str) -> Any:
    if key not in record:
        raise BadRecord("missing_key", f'missing key "{key}"')
    value = record[key]
    if not isinstance(value, types):
        raise BadRecord("wrong_type", f'key "{key}" must be {what}, got {type(value).__name__}')
    return value


class BadRecord(Exception):
    """One record is unusable (``reason`` as in :class:`Rejected`); :class:`SampleEncoder` turns it into a Rejected."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason, self.message = reason, message


def record_to_text(record: Any, text_key: str = "text") -> str:
    """The document text of a ``text`` record; raises ``BadRecord`` (caught by the encoder) when it is unusable."""
    if not isinstance(record, dict):
        raise BadRecord("wrong_type", f"record must be a JSON object, got {type(record).__name__}")
    text = _require(record, text_key, str, "a string")
    if not text.strip():
        raise BadRecord("empty", f'empty text in key "{text_key}"')
    return text


def _alpaca_messages(record: dict) -> list[dict[str, str]]:
    instruction = _require(record, "instruction", str, "a string")
    output = _require(record, "output", str, "a string")
    extra = record.get("input", "")
    if extra is None:
        extra = ""
    if not isinstance(extra, str):
        raise BadRecord("wrong_type", f'key "input" must be a string, got {type(extra).__name__}')
    user = f"{instruction}\n{extra}" if extra.strip() else instruction
    if not user.strip():
        raise BadRecord("empty", 'empty "instruction" and "input"')
    if not output.strip():
        raise BadRecord("empty", 'empty "output" (nothing to learn)')
    messages = _system_message(record)
    history = record.get("history") or []
    if not isinstance(history, list):
        raise BadRecord(
            "wrong_type", f'key "history" must be a list of [user, assistant] pairs, got {type(history).__name__}'
        )
    for n, pair in enumerate(history):
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise BadRecord("wrong_type", f"history[{n}] must be a [user, assistant] pair of strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return messages


def _system_message(record: dict) -> list[dict[str, str]]:
    """The optional top-level ``system`` string (alpaca, sharegpt) as a leading message; none when absent or blank."""
    system = record.get("system")
    if system is None:
        return []
    if not isinstance(system, str):
        raise BadRecord("wrong_type", f'key "system" must be a string, got {type(system).__name__}')
    return [{"role": "system", "content": system}] if system.strip() else []


def _sharegpt_messages(record: dict) -> list[dict[str, str]]:
    turns = _require(record, "conversations", list, "a list of {from, value} objects")
    messages = _system_message(record)
    for n, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRecord("wrong_type", f"conversations[{n}] must be an object, got {type(turn).__name__}")
        for key in ("from", "value"):
            if key not in turn:
                raise BadRecord("missing_key", f'missing key "{key}" in conversations[{n}]')
        role, value = turn["from"], turn["value"]
        if not isinstance(value, str):
            raise BadRecord("wrong_type", f"conversations[{n}].value must be a string, got {type(value).__name__}")
        if role not in SHAREGPT_ROLES:
            raise BadRecord(
                "wrong_type", f"conversations[{n}].from is {role!r}; expected one of {sorted(SHAREGPT_ROLES)}"
            )
        messages.append({"role": SHAREGPT_ROLES[role], "content": value})
    return messages


def _openai_messages(record: dict) -> list[dict[str, str]]:
    turns = _require(record, "messages", list, "a list of {role, content} objects")
    messages = []
    for n, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRecord("wrong_type", f"messages[{n}] must be an object, got {type(turn).__name__}")
        for key in ("role", "content"):
            if key not in turn:
                raise BadRecord("missing_key", f'missing key "{key}" in messages[{n}]')
        role, content = turn["role"], turn["content"]
        if role not in MESSAGE_ROLES:
            raise BadRecord("wrong_type", f"messages[{n}].role is {role!r}; expected one of {list(MESSAGE_ROLES)}")
        if not isinstance(content, str):
            raise BadRecord("wrong_type", f"messages[{n}].content must be a string, got {type(content).__name__}")
        messages.append({"role": role, "content": content})
    return messages


_TO_MESSAGES = {"alpaca": _alpaca_messages, "sharegpt": _sharegpt_messages, "messages": _openai_messages}


def record_to_messages(record: Any, fmt: str) -> list[dict[str, str]]:
    """Normalise an SFT record to ``[{"role", "content"}, ...]`` (roles system/user/assistant/tool).

    Raises ``BadRecord`` (turned into :class:`Rejected` by :class:`SampleEncoder`) for missing keys, wrong types, and
    conversations with no non-empty assistant turn (nothing to learn).
    """
    if not isinstance(record, dict):
        raise BadRecord("wrong_type", f"record must be a JSON object, got {type(record).__name__}")
    messages = _TO_MESSAGES[fmt](record)
    if not messages:
        raise BadRecord("empty", "empty conversation")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise BadRecord("empty", "no non-empty assistant turn (nothing to learn)")
    return messages


def parse_json_line(raw: bytes) -> Any:
    """Decode one jsonl line (UTF-8, BOM and CR already handled by the reader); raises ``BadRecord`` when unusable."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRecord(
            "bad_encoding", f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
        ) from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRecord("malformed_json", f"malformed JSON ({exc.msg} at column {exc.colno})") from exc
