"""Record formats of the converter and how each becomes token ids (+ a loss mask for SFT formats).

Formats (one JSON object per record):

``text``      ``{"text": "..."}`` (key set by ``--text-key``): one document for continued pre-training.
``alpaca``    ``{"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...], "tools"?}``.
              The user turn is ``instruction`` followed by ``"\\n"`` and ``input`` when ``input`` is not empty
              (LLaMA-Factory's convention).
``sharegpt``  ``{"conversations": [{"from": ..., "value": ...}, ...], "system"?, "tools"?}``. Roles: ``human``/``user``
              -> user, ``gpt``/``assistant`` -> assistant, ``system`` -> system, ``function_call`` -> assistant (the
              model emits the call, so it is trained on), ``observation`` -> tool (a tool result, never trained on).
``messages``  ``{"messages": [{"role": ..., "content": ...}, ...], "tools"?}`` (OpenAI style; roles
              system/user/assistant/tool). ``content`` may be a list of parts (OpenAI ``{"type": "text", "text"}``,
              LLaMA-Factory ``{"type": "text"|"reasoning"|"tool_call", "value"}``); ``tool_calls``,
              ``reasoning_content``, ``name`` and ``tool_call_id`` go to the template; ``loss_weight`` 0 on an
              assistant turn leaves it untrained.
``prompt_completion``  ``{"prompt": ..., "completion": ..., "tools"?}`` (TRL's prompt-completion): each a string
              (the user turn / the assistant turn) or a list of messages as in ``messages`` (the prompt's are never
              trained, the completion's assistant turns are). Rendered with the chat template like the others.

``tools`` (a list of schemas, or a JSON string of one as in LLaMA-Factory's sharegpt data) are passed to the chat
template. Fields a format does not read are reported (:attr:`Conversation.ignored`), never dropped silently.

How an SFT record becomes token ids and a loss mask (chat templates, the two masking methods): ``data_tools.encoding``.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

FORMATS = ("text", "alpaca", "sharegpt", "messages", "prompt_completion")
SFT_FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion")
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
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")  # the names HF templates read reasoning under
PART_TYPES = ("text", "reasoning", "tool_call")  # content parts dsft reads; others are refused by name


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
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if text_key in record:
        return "text"
    raise FormatError(
        f"cannot detect the format from keys {sorted(record)}: expected 'conversations' (sharegpt), 'messages', "
        f"'prompt'+'completion' (prompt_completion), 'instruction'+'output' (alpaca) or {text_key!r} (text); "
        "rename fields with --columns new=old, or pass --format (and --text-key for text)"
    )


def required_keys(fmt: str, text_key: str = "text") -> tuple[str, ...]:
    """The top-level keys every record of ``fmt`` must have (a table without one of these columns is refused)."""
    return {
        "text": (text_key,),
        "alpaca": ("instruction", "output"),
        "sharegpt": ("conversations",),
        "messages": ("messages",),
        "prompt_completion": ("prompt", "completion"),
    }[fmt]


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _require(record: dict, key: str, types: type | tuple, what: str) -> Any:
    if key not in record:
        raise BadRecord("missing_key", f'missing key "{key}"')
    value = record[key]
    if not isinstance(value, types):
        raise BadRecord("wrong_type", f'key "{key}" must be {what}, got {_type_name(value)}')
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


class Conversation(NamedTuple):
    """An SFT record, normalised.

    Attributes:
        messages: ``[{"role", "content", ...}]`` with roles system/user/assistant/tool; ``tool_calls``,
            ``reasoning_content``, ``name`` and ``tool_call_id`` are kept for the template when the record has them.
        tools: the tool schemas the template renders (OpenAI form ``{"type": "function", "function": {...}}``), or None.
        trained: per message, whether its tokens are trained (assistant turns whose ``loss_weight`` is not 0).
        ignored: names of the record's fields this format does not read (``id``, ``messages[].weight`` ...).
    """

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    trained: list[bool]
    ignored: tuple[str, ...]


# Fields each format reads; anything else in a record is counted as ignored (nothing is dropped silently).
RECORD_KEYS = {
    "alpaca": ("instruction", "input", "output", "system", "history", "tools"),
    "sharegpt": ("conversations", "system", "tools"),
    "messages": ("messages", "tools"),
    "prompt_completion": ("prompt", "completion", "tools"),
}
SHAREGPT_TURN_KEYS = ("from", "value")
# OpenAI / HF message fields handed to the template, plus LLaMA-Factory's per-message loss_weight (read by dsft).
MESSAGE_KEYS = ("role", "content", "tool_calls", "name", "tool_call_id", "loss_weight", *REASONING_KEYS)


def _alpaca_messages(record: dict) -> list[dict[str, Any]]:
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


def _system_message(record: dict) -> list[dict[str, Any]]:
    """The optional top-level ``system`` string (alpaca, sharegpt) as a leading message; none when absent or blank."""
    system = record.get("system")
    if system is None:
        return []
    if not isinstance(system, str):
        raise BadRecord("wrong_type", f'key "system" must be a string, got {type(system).__name__}')
    return [{"role": "system", "content": system}] if system.strip() else []


def _sharegpt_messages(record: dict, ignored: set[str]) -> list[dict[str, Any]]:
    turns = _require(record, "conversations", list, "a list of {from, value} objects")
    messages = _system_message(record)
    for n, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRecord("wrong_type", f"conversations[{n}] must be an object, got {type(turn).__name__}")
        for key in SHAREGPT_TURN_KEYS:
            if key not in turn:
                raise BadRecord("missing_key", f'missing key "{key}" in conversations[{n}]')
        ignored.update(f"conversations[].{k}" for k in turn if k not in SHAREGPT_TURN_KEYS)
        role, value = turn["from"], turn["value"]
        if not isinstance(value, str):
            raise BadRecord("wrong_type", f"conversations[{n}].value must be a string, got {type(value).__name__}")
        if role not in SHAREGPT_ROLES:
            raise BadRecord(
                "wrong_type", f"conversations[{n}].from is {role!r}; expected one of {sorted(SHAREGPT_ROLES)}"
            )
        messages.append({"role": SHAREGPT_ROLES[role], "content": value})
    return messages


def _content_text(content: Any, where: str, message: dict[str, Any]) -> str:
    """A message's ``content``: a string, null, or a list of parts (OpenAI ``{"type": "text", "text"}``,
    LLaMA-Factory ``{"type": ..., "value"}``). Text parts are joined with a newline (as vLLM does); ``reasoning``
    parts become ``reasoning_content`` and ``tool_call`` parts (a JSON ``{"name", "arguments"}``) ``tool_calls``, so
    the template renders them its own way. Other part types (images, audio ...) are refused by name."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRecord(
            "wrong_type", f"{where}.content must be a string or a list of parts, got {type(content).__name__}"
        )
    texts: list[str] = []
    reasoning: list[str] = []
    for k, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise BadRecord("wrong_type", f'{where}.content[{k}] must be an object with a "type"')
        kind = part["type"]
        value = part.get("text", part.get("value"))
        if kind not in PART_TYPES:
            raise BadRecord(
                "unsupported_content",
                f"{where}.content[{k}] has type {kind!r}: dsft trains text-only models and reads the part types "
                f"{', '.join(PART_TYPES)}; remove the part or the record",
            )
        if not isinstance(value, str):
            raise BadRecord("wrong_type", f'{where}.content[{k}] ({kind}) needs a string "text" or "value"')
        if kind == "text":
            texts.append(value)
        elif kind == "reasoning":
            reasoning.append(value)
        else:
            try:
                call = json.loads(value)
            except json.JSONDecodeError as exc:
                raise BadRecord("wrong_type", f"{where}.content[{k}] (tool_call) is not JSON ({exc.msg})") from exc
            if not (isinstance(call, dict) and isinstance(call.get("name"), str)):
                raise BadRecord("wrong_type", f'{where}.content[{k}] (tool_call) must be {{"name", "arguments"}}')
            fn = {"name": call["name"], "arguments": call.get("arguments", {})}
            message.setdefault("tool_calls", []).append({"type": "function", "function": fn})
    if reasoning:
        message["reasoning_content"] = "\n".join(reasoning)
    return "\n".join(texts)


def _loss_weight(turn: dict, role: str, where: str) -> bool | None:
    """LLaMA-Factory's per-message ``loss_weight``: 0 or 1 on assistant turns (0 = not trained); None if absent."""
    if "loss_weight" not in turn:
        return None
    w = turn["loss_weight"]
    if isinstance(w, bool) or not isinstance(w, int | float) or w not in (0, 1):
        raise BadRecord("wrong_type", f"{where}.loss_weight is {w!r}; expected 0 (not trained) or 1 (trained)")
    if role != "assistant" and w == 1:
        raise BadRecord(
            "wrong_type",
            f"{where}.loss_weight is 1 on a {role} turn; only assistant turns are trained (use 0 or drop it)",
        )
    return bool(w)


def _openai_messages(
    record: dict, ignored: set[str], field: str = "messages"
) -> tuple[list[dict[str, Any]], list[bool | None]]:
    turns = _require(record, field, list, "a list of {role, content} objects")
    messages, weights = [], []
    for n, turn in enumerate(turns):
        where = f"{field}[{n}]"
        if not isinstance(turn, dict):
            raise BadRecord("wrong_type", f"{where} must be an object, got {type(turn).__name__}")
        if "role" not in turn:
            raise BadRecord("missing_key", f'missing key "role" in {where}')
        role = turn["role"]
        if role not in MESSAGE_ROLES:
            raise BadRecord("wrong_type", f"{where}.role is {role!r}; expected one of {list(MESSAGE_ROLES)}")
        if "content" not in turn and not turn.get("tool_calls"):
            raise BadRecord("missing_key", f'missing key "content" in {where}')
        ignored.update(f"{field}[].{k}" for k in turn if k not in MESSAGE_KEYS)
        message: dict[str, Any] = {"role": role}
        for key in ("tool_calls", "name", "tool_call_id", *REASONING_KEYS):
            if turn.get(key) is not None:
                message[key] = turn[key]
        if "tool_calls" in message and not isinstance(message["tool_calls"], list):
            raise BadRecord("wrong_type", f"{where}.tool_calls must be a list")
        message["content"] = _content_text(turn.get("content"), where, message)
        messages.append(message)
        weights.append(_loss_weight(turn, role, where))
    return messages, weights


def _prompt_completion_messages(record: dict, ignored: set[str]) -> tuple[list[dict[str, Any]], list[bool | None]]:
    """TRL's prompt-completion: a string is one user (prompt) or assistant (completion) turn, a list is messages.
    Nothing in the prompt is trained; the completion's assistant turns are, unless their ``loss_weight`` is 0."""
    messages: list[dict[str, Any]] = []
    weights: list[bool | None] = []
    for key, role in (("prompt", "user"), ("completion", "assistant")):
        if key not in record:
            raise BadRecord("missing_key", f'missing key "{key}"')
        value = record[key]
        if isinstance(value, str):
            if not value.strip():
                raise BadRecord("empty", f'empty "{key}"' + (" (nothing to learn)" if key == "completion" else ""))
            part, part_weights = [{"role": role, "content": value}], [None]
        elif isinstance(value, list):
            part, part_weights = _openai_messages(record, ignored, key)
        else:
            raise BadRecord(
                "wrong_type", f'key "{key}" must be a string or a list of messages, got {_type_name(value)}'
            )
        if key == "prompt":  # the prompt is context: never trained, whatever its roles
            part_weights = [False if m["role"] == "assistant" else w for m, w in zip(part, part_weights, strict=True)]
        messages += part
        weights += part_weights
    return messages, weights


def _tools(record: dict) -> list[dict[str, Any]] | None:
    """``tools``: a list of schemas or a JSON string of one (LLaMA-Factory's sharegpt), in OpenAI's function form."""
    tools = record.get("tools")
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as exc:
            raise BadRecord("wrong_type", f'key "tools" is a string but not JSON ({exc.msg})') from exc
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise BadRecord("wrong_type", 'key "tools" must be a list of tool schemas (objects) or a JSON string of one')
    # Bare function schemas ({"name", "parameters"}) get the wrapper HF templates and get_json_schema use.
    return [t if "function" in t or "name" not in t else {"type": "function", "function": t} for t in tools] or None


def record_to_conversation(record: Any, fmt: str) -> Conversation:
    """Normalise an SFT record (see :class:`Conversation`).

    Raises ``BadRecord`` (turned into ``Rejected`` by the encoder) for missing keys, wrong types, unsupported content
    parts, and conversations with no trained non-empty assistant turn (nothing to learn).
    """
    if not isinstance(record, dict):
        raise BadRecord("wrong_type", f"record must be a JSON object, got {type(record).__name__}")
    ignored = {k for k in record if k not in RECORD_KEYS[fmt]}
    weights: list[bool | None] = []
    if fmt == "alpaca":
        messages = _alpaca_messages(record)
    elif fmt == "sharegpt":
        messages = _sharegpt_messages(record, ignored)
    elif fmt == "prompt_completion":
        messages, weights = _prompt_completion_messages(record, ignored)
    else:
        messages, weights = _openai_messages(record, ignored)
    if not messages:
        raise BadRecord("empty", "empty conversation")
    weights = weights or [None] * len(messages)
    trained = [m["role"] == "assistant" and w is not False for m, w in zip(messages, weights, strict=True)]
    if not any(t and (m["content"].strip() or m.get("tool_calls")) for m, t in zip(messages, trained, strict=True)):
        what = "trained (loss_weight 1) " if any(w is not None for w in weights) else ""
        raise BadRecord("empty", f"no non-empty {what}assistant turn (nothing to learn)")
    return Conversation(messages, _tools(record), trained, tuple(sorted(ignored)))


def record_to_messages(record: Any, fmt: str) -> list[dict[str, Any]]:
    """The messages of :func:`record_to_conversation`."""
    return record_to_conversation(record, fmt).messages


def unread_fields(record: Any, text_key: str) -> tuple[str, ...]:
    """Keys of a ``text`` record other than the text (counted as ignored)."""
    return tuple(sorted(k for k in record if k != text_key)) if isinstance(record, dict) else ()


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
