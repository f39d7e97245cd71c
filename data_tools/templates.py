"""Which chat template renders SFT data, and which tokens end an assistant turn (what a trained model stops on).

The template is, in this order: the file given with ``--chat-template`` (``data.chat_template``), the tokenizer's own,
or :func:`default_chat_template` for tokenizers without one (base models). Whatever is used is recorded in the meta
(:func:`template_meta`) with its full text, so training can store it in ``final/`` and the model is served with the
template it was trained with.

The default keeps the ChatML layout (``<|im_start|>role\\n...``) but ends every assistant turn with the tokenizer's
own eos, under loss, and starts with bos when the tokenizer prepends one: a fine-tuned base model then learns to emit
the token ``generate()`` stops on. When the ChatML markers are not single tokens of the vocabulary (every base model
without them), the model learns them as text; that works, but one warning says so and how to pick another template.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_tools.formats import FormatError

# ChatML with `{% generation %}` around what the assistant emits, tools in the system turn (Qwen's layout) and
# OpenAI-style tool calls; the tiny test tokenizers carry it. ASSISTANT_END is where an assistant turn ends.
_CHATML = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n\\nYou may call one or more of these functions:\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
{{- '\\n</tools><|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if not (tools and loop.first and message.role == 'system') %}
{{- '<|im_start|>' + message.role + '\\n' }}
{%- if message.role == 'assistant' %}
{%- generation %}
{%- if message.reasoning_content %}{{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}{%- endif %}
{{- message.content or '' }}
{%- for call in message.tool_calls or [] %}
{%- set call = call.function or call %}
{{- '\\n<tool_call>\\n{"name": "' + call.name + '", "arguments": ' }}
{{- call.arguments if call.arguments is string else (call.arguments | tojson) }}
{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- ASSISTANT_END }}
{%- endgeneration %}
{%- else %}
{{- message.content + '<|im_end|>' }}
{%- endif %}
{{- '\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""

CHATML_TEMPLATE = _CHATML.replace("ASSISTANT_END", "'<|im_end|>'")
CHATML_MARKERS = ("<|im_start|>", "<|im_end|>")


@dataclass(frozen=True)
class ChatTemplate:
    """The template an SFT conversion renders with.

    Attributes:
        text: the Jinja source.
        source: ``file`` (``--chat-template``), ``tokenizer`` or ``default``.
        path: the file, for ``file``.
        markers: ``default`` only: how this vocabulary tokenizes the ChatML markers, eos and bos.
        warning: set when the default's markers are not single tokens (printed once by the converter).
    """

    text: str
    source: str
    path: str | None = None
    markers: dict[str, Any] | None = None
    warning: str | None = None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def prepends_bos(tokenizer) -> bool:
    """True when ``tokenizer(text)`` starts with bos (Llama-style base tokenizers): the template must then emit it."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def default_chat_template(tokenizer) -> str:
    """ChatML layout whose assistant turns end with the tokenizer's eos (under loss); bos first if it prepends one.

    Raises:
        FormatError: the tokenizer has no eos token, so there is nothing for a trained model to stop on.
    """
    if not tokenizer.eos_token:
        raise FormatError(
            "the tokenizer has no chat template and no eos token, so a trained model would have no token to stop on: "
            "pass a template with --chat-template FILE (data.chat_template) or set an eos token"
        )
    bos = "{{- bos_token }}\n" if prepends_bos(tokenizer) else ""
    return bos + _CHATML.replace("ASSISTANT_END", "eos_token")


def _pieces(tokenizer, text: str) -> list[str]:
    return tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])


def resolve_chat_template(tokenizer, path: str | os.PathLike | None = None) -> ChatTemplate:
    """The template to render SFT records with: ``path``, else the tokenizer's, else :func:`default_chat_template`.

    Raises:
        FormatError: ``path`` cannot be read, or the default cannot be built (no eos).
    """
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise FormatError(f"--chat-template {path}: cannot read it ({exc.strerror or exc})") from exc
        if not text.strip():
            raise FormatError(f"--chat-template {path}: the file is empty")
        return ChatTemplate(text, "file", path=os.path.abspath(path))
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # named templates; "default" is what apply_chat_template uses
        own = own.get("default")
    if own:
        return ChatTemplate(own, "tokenizer")
    markers: dict[str, Any] = {m: _pieces(tokenizer, m) for m in CHATML_MARKERS}
    markers["eos"] = tokenizer.eos_token
    markers["bos"] = tokenizer.bos_token if prepends_bos(tokenizer) else None
    text = default_chat_template(tokenizer)
    split = {m: p for m, p in markers.items() if m in CHATML_MARKERS and len(p) != 1}
    warning = None
    if split:
        shown = "; ".join(f"{m!r} -> {len(p)} tokens {p}" for m, p in split.items())
        warning = (
            f"the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template, so dsft's default is used "
            f"(ChatML layout, every assistant turn ends with eos {tokenizer.eos_token!r}, which is trained and stopped "
            f"on). Its role markers are not tokens of this vocabulary ({shown}): the model learns them as text. "
            "To choose the layout, pass --chat-template FILE (data.chat_template)."
        )
    return ChatTemplate(text, "default", markers=markers, warning=warning)


def template_meta(template: ChatTemplate) -> dict[str, Any]:
    """``meta["chat_template"]``: where the template came from, its text and hash."""
    return {
        "source": template.source,
        "path": template.path,
        "sha256": template.sha256,
        "markers": template.markers,
        "warning": template.warning,
        "template": template.text,
    }


# A token that ends at least this share of assistant turns is a stop token even when it is not a special token.
STOP_SHARE = 0.5


def stop_token_ids(meta: dict[str, Any], tokenizer) -> tuple[list[int], str | None]:
    """Token ids ``generate()`` should stop on for a model trained on the data of ``meta``, and a warning or None.

    The ids that end assistant turns in the data (``meta["turn_end_tokens"]``) that are special tokens or end at least
    :data:`STOP_SHARE` of the turns, then the tokenizer's eos. Text data (no turns) gives the eos alone.
    """
    eos = tokenizer.eos_token_id
    ends = meta.get("turn_end_tokens") or []
    total = sum(e["count"] for e in ends)
    special = set(tokenizer.all_special_ids)
    chosen = [e for e in ends if e["id"] in special or e["count"] >= STOP_SHARE * total]
    ids = [e["id"] for e in chosen]
    if eos is not None and eos not in ids:
        ids.append(eos)
    warning = None
    covered = sum(e["count"] for e in chosen)
    if total and covered < 0.99 * total:
        warning = (
            f"only {covered / total:.1%} of the assistant turns in the data end with a stop token ({ids}); "
            "generation may not stop after the others: check the chat template's end of turn"
        )
    return ids, warning
