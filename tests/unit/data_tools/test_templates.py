"""Chat templates as users bring them: base tokenizers without one, templates that rewrite earlier turns (Qwen3-style
reasoning), tools, content parts, loss_weight, and the stop tokens the data teaches."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from data_tools.convert import convert, is_conversion_current
from data_tools.encoding import Encoded, Rejected, SampleEncoder
from data_tools.templates import stop_token_ids

# Qwen3's template, shortened but with its two rewrites: the reasoning of assistant turns before the last user query
# is dropped, and the last turn gets an empty <think></think> when it has none. GEN_OPEN/GEN_CLOSE become
# {% generation %} tags in the reference version (where TRL's qwen3 training template puts them) or nothing.
_QWEN3_STYLE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}
{{- '\\n</tools><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
{%- set index = (messages|length - 1) - loop.index0 %}
{%- if ns.multi_step_tool and message.role == 'user' and not message.content.startswith('<tool_response>') %}
{%- set ns.multi_step_tool = false %}
{%- set ns.last_query_index = index %}
{%- endif %}
{%- endfor %}
{%- for message in messages %}
{%- set content = message.content if message.content is string else '' %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{%- set reasoning_content = '' %}
{%- if message.reasoning_content is string %}
{%- set reasoning_content = message.reasoning_content %}
{%- elif '</think>' in content %}
{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
{%- set content = content.split('</think>')[-1].lstrip('\\n') %}
{%- endif %}
{{- '<|im_start|>assistant\\n' }}GEN_OPEN
{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
{{- '<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
{%- else %}
{{- content }}
{%- endif %}
{%- for tool_call in message.tool_calls or [] %}
{%- set tool_call = tool_call.function or tool_call %}
{{- '\\n<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' + (tool_call.arguments | tojson) + '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>' }}GEN_CLOSE
{{- '\\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""
QWEN3_STYLE = _QWEN3_STYLE.replace("GEN_OPEN", "").replace("GEN_CLOSE", "")
QWEN3_STYLE_TAGGED = _QWEN3_STYLE.replace("GEN_OPEN", "{% generation %}").replace("GEN_CLOSE", "{% endgeneration %}")

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather of a city, in degrees Celsius",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
REASONING_CHAT = {
    "tools": [WEATHER_TOOL],
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2 plus 2?"},
        {"role": "assistant", "content": "<think>\nTwo and two.\n</think>\n\n4"},
        {"role": "user", "content": "And the weather in Paris?"},
        {
            "role": "assistant",
            "reasoning_content": "I need the weather tool.",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": '{"celsius": 21}'},
        {"role": "assistant", "content": "<think>\nIt said 21.\n</think>\n\nIt is 21 degrees in Paris."},
    ],
}


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """A Qwen-style tokenizer: ChatML tokens, eos <|endoftext|> while turns end with <|im_end|>."""
    from finetune.tiny import train_tokenizer

    out = tmp_path_factory.mktemp("qwen_tok")
    train_tokenizer(out, style="qwen")
    return out


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A base model's tokenizer: bos <s> prepended, eos </s>, no chat template, no ChatML tokens."""
    from finetune.tiny import train_tokenizer

    out = tmp_path_factory.mktemp("base_tok")
    train_tokenizer(out, style="base")
    return out


def _with_template(tok_dir, template):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.chat_template = template
    return tok


def _trained_text(tok, e: Encoded) -> list[str]:
    """Decoded runs of trained tokens."""
    runs, run = [], []
    for i, m in zip(e.ids.tolist(), e.mask.tolist(), strict=True):
        if m:
            run.append(i)
        elif run:
            runs.append(tok.decode(run))
            run = []
    return runs + ([tok.decode(run)] if run else [])


def test_qwen3_style_template_masks_equal_the_generation_tagged_template(qwen_dir):
    plain, tagged = _with_template(qwen_dir, QWEN3_STYLE), _with_template(qwen_dir, QWEN3_STYLE_TAGGED)
    enc_plain, enc_tagged = SampleEncoder(plain, "messages"), SampleEncoder(tagged, "messages")
    assert (enc_plain.mask_method, enc_tagged.mask_method) == ("prefix", "generation")
    msgs = REASONING_CHAT["messages"]
    # The rewrite is real: turn 2 rendered as the last turn keeps its reasoning, inside the conversation it does not.
    through = plain.apply_chat_template(msgs[:3], tools=[WEATHER_TOOL], tokenize=False)
    full = plain.apply_chat_template(msgs, tools=[WEATHER_TOOL], tokenize=False)
    assert not full.startswith(through) and "Two and two" in through and "Two and two" not in full

    (a,) = enc_plain.encode_batch([REASONING_CHAT])
    (b,) = enc_tagged.encode_batch([REASONING_CHAT])
    assert isinstance(a, Encoded) and isinstance(b, Encoded)
    assert a.ids.tolist() == b.ids.tolist() and a.mask.tolist() == b.mask.tolist()
    assert _trained_text(plain, a) == [
        "4<|im_end|>",
        '<think>\nI need the weather tool.\n</think>\n\n\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris"}}\n</tool_call><|im_end|>',
        "<think>\nIt said 21.\n</think>\n\nIt is 21 degrees in Paris.<|im_end|>",
    ]
    im_end = plain.convert_tokens_to_ids("<|im_end|>")
    assert a.turn_ends == (im_end, im_end, im_end)
    # The tool schema reaches the rendering, in the system turn (not trained).
    assert "Current weather of a city" in plain.decode(a.ids.tolist())


_WORDS = st.text(alphabet="abcdefgh ijk,.?", min_size=1, max_size=12).map(lambda s: "w" + s.strip())


@st.composite
def _reasoning_conversations(draw):
    messages = [{"role": "system", "content": draw(_WORDS)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 4))):
        messages.append({"role": "user", "content": draw(_WORDS)})
        for _ in range(draw(st.integers(0, 2))):  # tool rounds
            call = {"name": "get_weather", "arguments": {"city": draw(_WORDS)}}
            messages.append({"role": "assistant", "content": "", "tool_calls": [{"function": call}]})
            messages.append({"role": "tool", "content": draw(_WORDS)})
        think = draw(st.one_of(st.none(), _WORDS))
        answer = draw(_WORDS)
        messages.append(
            {"role": "assistant", "content": f"<think>\n{think}\n</think>\n\n{answer}" if think else answer}
        )
    return {"messages": messages, "tools": [WEATHER_TOOL]}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(record=_reasoning_conversations())
def test_qwen3_style_masks_property(qwen_dir, record):
    """Any multi-turn reasoning/tool conversation: the untagged template gives the tagged template's ids and masks."""
    plain, tagged = _with_template(qwen_dir, QWEN3_STYLE), _with_template(qwen_dir, QWEN3_STYLE_TAGGED)
    (a,) = SampleEncoder(plain, "messages").encode_batch([record])
    (b,) = SampleEncoder(tagged, "messages").encode_batch([record])
    assert isinstance(a, Encoded), a
    assert a.ids.tolist() == b.ids.tolist() and a.mask.tolist() == b.mask.tolist()
    assert len(a.turn_ends) == sum(m["role"] == "assistant" for m in record["messages"])


def test_base_tokenizer_default_template_ends_every_turn_with_eos(base_dir, tmp_path, capsys):
    tok = AutoTokenizer.from_pretrained(base_dir)
    assert tok.chat_template is None and tok("x")["input_ids"][0] == tok.bos_token_id
    src = tmp_path / "alpaca.jsonl"
    rows = [{"instruction": f"Add {i} and {i + 1}", "output": str(2 * i + 1)} for i in range(20)]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = convert([src], tmp_path / "d", base_dir, progress=False)
    err = capsys.readouterr().err
    assert err.count("has no chat template") == 1 and "--chat-template" in err  # one warning, not one per record
    ct = res.meta["chat_template"]
    assert ct["source"] == "default" and "eos_token" in ct["template"] and ct["warning"]
    assert ct["markers"]["eos"] == "</s>" and ct["markers"]["bos"] == "<s>" and len(ct["markers"]["<|im_start|>"]) > 1
    from data_tools.indexed import IndexedDataset

    ids, masks = IndexedDataset(str(tmp_path / "d")), IndexedDataset(str(tmp_path / "d_loss_mask"))
    for n in range(len(ids)):
        sample, mask = ids[n].tolist(), masks[n].tolist()
        assert sample[0] == tok.bos_token_id and mask[0] == 0  # bos where the tokenizer wants it, not trained
        last = max(i for i, m in enumerate(mask) if m)  # the last trained token of the sample is eos
        assert sample[last] == tok.eos_token_id
    assert res.meta["turn_end_tokens"] == [{"id": tok.eos_token_id, "token": "</s>", "count": 20}]
    assert stop_token_ids(res.meta, tok) == ([tok.eos_token_id], None)


def test_stop_ids_are_the_turn_end_plus_eos_when_they_differ(qwen_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(qwen_dir)
    src = tmp_path / "m.jsonl"
    src.write_text(json.dumps({"messages": REASONING_CHAT["messages"][1:3]}) + "\n")
    res = convert([src], tmp_path / "d", tok, progress=False)
    im_end, eos = tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id
    assert im_end != eos and res.meta["chat_template"]["source"] == "tokenizer"
    assert stop_token_ids(res.meta, tok) == ([im_end, eos], None)
    # A template whose turns end with ordinary text tokens: stopping on them would be wrong, and a warning says so.
    meta = {"turn_end_tokens": [{"id": 100, "count": 3}, {"id": 101, "count": 3}, {"id": 102, "count": 4}]}
    ids, warning = stop_token_ids(meta, tok)
    assert ids == [eos] and "0.0% of the assistant turns" in warning


def test_tools_reach_the_rendering_and_a_template_that_ignores_them_refuses(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    # LLaMA-Factory's glaive data: sharegpt with tools as a JSON string of bare function schemas.
    record = {
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
            {"from": "observation", "value": '{"celsius": 21}'},
            {"from": "gpt", "value": "It is 21 degrees."},
        ],
        "tools": json.dumps([WEATHER_TOOL]),
    }
    (e,) = SampleEncoder(tok, "sharegpt").encode_batch([record])
    text = tok.decode(e.ids.tolist())
    assert "Current weather of a city" in text and '"required": ["city"]' in text
    assert not any("Current weather" in piece for piece in _trained_text(tok, e))  # the schema is prompt, not target
    tok.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"  # never reads tools
    (r,) = SampleEncoder(tok, "sharegpt").encode_batch([record])
    assert isinstance(r, Rejected) and r.reason == "dropped_by_template" and "tools" in r.message


def test_content_parts_loss_weight_and_refused_parts(tiny_tokenizer):
    record = {  # LLaMA-Factory's newer layout
        "messages": [
            {"role": "user", "content": [{"type": "text", "value": "Say hi."}], "loss_weight": 0.0},
            {"role": "assistant", "content": [{"type": "text", "value": "hello"}], "loss_weight": 0.0},
            {"role": "user", "content": [{"type": "text", "text": "Again,"}, {"type": "text", "text": "louder."}]},
            {"role": "assistant", "content": [{"type": "text", "value": "HELLO"}], "loss_weight": 1.0},
        ]
    }
    (e,) = SampleEncoder(tiny_tokenizer, "messages").encode_batch([record])
    assert _trained_text(tiny_tokenizer, e) == ["HELLO<|im_end|>"]  # the loss_weight 0 turn is not trained
    assert "Again,\nlouder." in tiny_tokenizer.decode(e.ids.tolist())
    image = {"type": "image_url", "image_url": {"url": "x.png"}}
    bad = {"messages": [{"role": "user", "content": [image]}, {"role": "assistant", "content": "a"}]}
    half = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "loss_weight": 0.5}]}
    none = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "loss_weight": 0}]}
    r1, r2, r3 = SampleEncoder(tiny_tokenizer, "messages").encode_batch([bad, half, none])
    assert r1.reason == "unsupported_content" and "'image_url'" in r1.message and "messages[0].content[0]" in r1.message
    assert r2.reason == "wrong_type" and "loss_weight is 0.5" in r2.message
    assert r3.reason == "empty" and "loss_weight 1" in r3.message


def test_ignored_fields_are_counted_and_named_once(tiny_tokenizer_dir, tmp_path, capsys):
    src = tmp_path / "m.jsonl"
    rows = [
        {"id": n, "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 1}]}
        for n in range(5)
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = convert([src], tmp_path / "d", tiny_tokenizer_dir, progress=False)
    assert res.meta["ignored_fields"] == {"id": 5, "messages[].weight": 5}
    err = capsys.readouterr().err
    assert err.count("does not read were ignored") == 1 and "messages[].weight (5 records)" in err


def test_chat_template_file_overrides_and_is_recorded(tiny_tokenizer_dir, tmp_path):
    src = tmp_path / "m.jsonl"
    src.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}))
    template = tmp_path / "mine.jinja"
    template.write_text(
        "{% for m in messages %}{% if m.role == 'assistant' %}A: {% generation %}{{ m.content }}<|endoftext|>"
        "{% endgeneration %}{% else %}Q: {{ m.content }}\n{% endif %}{% endfor %}"
    )
    res = convert([src], tmp_path / "d", tiny_tokenizer_dir, progress=False, chat_template=template)
    ct = res.meta["chat_template"]
    assert ct["source"] == "file" and ct["path"] == str(template) and ct["template"] == template.read_text()
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    assert res.meta["turn_end_tokens"][0]["token"] == "<|endoftext|>"
    assert is_conversion_current(tmp_path / "d", [src], tok, chat_template=template)
    assert not is_conversion_current(tmp_path / "d", [src], tok)  # the tokenizer's own template would be used now
    template.write_text(template.read_text().replace("A: ", "Answer: "))
    assert not is_conversion_current(tmp_path / "d", [src], tok, chat_template=template)


def test_truncation_counts_tokens_lost_and_keeps_only_whole_turn_ends(tiny_tokenizer):
    record = {"messages": REASONING_CHAT["messages"][1:3] * 3}
    full = SampleEncoder(tiny_tokenizer, "messages").encode_batch([record])[0]
    n = len(full.ids) - 2  # cuts into the last turn
    (cut,) = SampleEncoder(tiny_tokenizer, "messages", max_length=n, over_length="truncate").encode_batch([record])
    assert cut.truncated and cut.lost == 2 and len(full.turn_ends) == 3 and len(cut.turn_ends) == 2
    assert np.array_equal(cut.mask, full.mask[:n])
