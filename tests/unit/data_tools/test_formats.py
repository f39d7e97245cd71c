import json
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from data_tools import formats
from data_tools.encoding import Encoded, Rejected, SampleEncoder
from data_tools.templates import CHATML_TEMPLATE


def without_generation_tags(template: str) -> str:
    """The same template minus its {% generation %} tags: what the prefix method must get the same masks from."""
    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", template)


CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 12 plus 30?"},
    {"role": "assistant", "content": "42."},
    {"role": "user", "content": "Reverse banana."},
    {"role": "assistant", "content": "ananab"},
]


@pytest.fixture(scope="module")
def no_generation_tokenizer(tiny_tokenizer_dir):
    """The tiny tokenizer with the same ChatML template minus {% generation %} tags: exercises the prefix method."""
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.chat_template = without_generation_tags(CHATML_TEMPLATE)
    return tok


@pytest.fixture(scope="module")
def no_template_tokenizer(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    tok.chat_template = None
    return tok


def _masked_pieces(tok, ids, mask) -> list[str]:
    """Decoded runs of consecutive mask==1 tokens."""
    pieces, run = [], []
    for i, m in zip(ids, mask, strict=True):
        if m:
            run.append(int(i))
        elif run:
            pieces.append(tok.decode(run))
            run = []
    if run:
        pieces.append(tok.decode(run))
    return pieces


def test_detect_format():
    assert formats.detect_format({"text": "x"}) == "text"
    assert formats.detect_format({"body": "x"}, text_key="body") == "text"
    assert formats.detect_format({"instruction": "a", "output": "b"}) == "alpaca"
    assert formats.detect_format({"conversations": []}) == "sharegpt"
    assert formats.detect_format({"messages": []}) == "messages"
    assert formats.detect_format({"prompt": "a", "completion": "b"}) == "prompt_completion"
    with pytest.raises(formats.FormatError, match="--columns new=old, or pass --format"):
        formats.detect_format({"question": "a", "answer": "b"})
    with pytest.raises(formats.FormatError, match="JSON object"):
        formats.detect_format([1, 2])


def test_text_matches_tokenizer_and_appends_eod(tiny_tokenizer):
    texts = ["The quick brown fox.", "What is 12 plus 30? The answer is 42."]
    enc = SampleEncoder(tiny_tokenizer, "text", dtype=np.uint16, append_eod=True)
    out = enc.encode_batch([{"text": t} for t in texts])
    eod = tiny_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert enc.eod == eod and enc._rust_text is True  # the Rust batch path is taken and gives the same ids
    for t, e in zip(texts, out, strict=True):
        assert isinstance(e, Encoded) and e.mask is None and e.ids.dtype == np.uint16
        assert e.ids.tolist() == tiny_tokenizer(t)["input_ids"] + [eod]


@pytest.mark.parametrize("method", ["generation", "prefix"])
def test_messages_mask_covers_exactly_assistant_turns(tiny_tokenizer, no_generation_tokenizer, method):
    tok = tiny_tokenizer if method == "generation" else no_generation_tokenizer
    enc = SampleEncoder(tok, "messages")
    assert enc.mask_method == method
    (e,) = enc.encode_batch([{"messages": CONVERSATION}])
    assert e.ids.tolist() == tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
    assert len(e.mask) == len(e.ids) and e.mask.dtype == np.uint8
    # Both assistant turns, each with its end-of-turn token, and nothing else (no "\n", no role header).
    assert _masked_pieces(tiny_tokenizer, e.ids, e.mask) == ["42.<|im_end|>", "ananab<|im_end|>"]


def test_prefix_method_equals_generation_method(tiny_tokenizer, no_generation_tokenizer):
    records = [
        {"messages": CONVERSATION},
        {"instruction": "Add", "input": "2 and 3", "output": "5", "history": [["hi", "hello"]]},
    ]
    for rec, fmt in zip(records, ["messages", "alpaca"], strict=True):
        (a,) = SampleEncoder(tiny_tokenizer, fmt).encode_batch([rec])
        (b,) = SampleEncoder(no_generation_tokenizer, fmt).encode_batch([rec])
        assert a.ids.tolist() == b.ids.tolist() and a.mask.tolist() == b.mask.tolist()


def test_default_template_when_tokenizer_has_none(no_template_tokenizer, tiny_tokenizer):
    enc = SampleEncoder(no_template_tokenizer, "messages")
    assert enc.template.source == "default" and enc.mask_method == "generation"
    (e,) = enc.encode_batch([{"messages": CONVERSATION}])
    assert e.ids.tolist() == tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
    assert _masked_pieces(tiny_tokenizer, e.ids, e.mask) == ["42.<|im_end|>", "ananab<|im_end|>"]


def test_alpaca_rendering(tiny_tokenizer):
    rec = {"system": "Be exact.", "instruction": "Add", "input": "2 and 3", "output": "5", "history": [["hi", "hey"]]}
    assert formats.record_to_messages(rec, "alpaca") == [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hey"},
        {"role": "user", "content": "Add\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    (e,) = SampleEncoder(tiny_tokenizer, "alpaca").encode_batch([rec])
    assert _masked_pieces(tiny_tokenizer, e.ids, e.mask) == ["hey<|im_end|>", "5<|im_end|>"]


def test_sharegpt_roles_function_call_trained_observation_not(tiny_tokenizer):
    rec = {
        "system": "Use tools.",
        "conversations": [
            {"from": "human", "value": "Weather?"},
            {"from": "function_call", "value": "get_weather()"},
            {"from": "observation", "value": "sunny"},
            {"from": "gpt", "value": "Sunny."},
        ],
    }
    msgs = formats.record_to_messages(rec, "sharegpt")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "assistant"]
    (e,) = SampleEncoder(tiny_tokenizer, "sharegpt").encode_batch([rec])
    assert _masked_pieces(tiny_tokenizer, e.ids, e.mask) == ["get_weather()<|im_end|>", "Sunny.<|im_end|>"]


@pytest.mark.parametrize(
    ("fmt", "record", "reason", "message"),
    [
        ("text", {"txt": "a"}, "missing_key", 'missing key "text"'),
        ("text", {"text": 5}, "wrong_type", 'key "text" must be a string, got int'),
        ("text", {"text": "  "}, "empty", "empty text"),
        ("text", [1], "wrong_type", "record must be a JSON object"),
        ("alpaca", {"instruction": "a"}, "missing_key", 'missing key "output"'),
        ("alpaca", {"instruction": "a", "output": ""}, "empty", 'empty "output"'),
        ("alpaca", {"instruction": "a", "output": "b", "input": 3}, "wrong_type", 'key "input" must be a string'),
        ("alpaca", {"instruction": "a", "output": "b", "history": [["x"]]}, "wrong_type", "history[0]"),
        ("sharegpt", {"conversations": "hi"}, "wrong_type", 'key "conversations" must be a list'),
        ("sharegpt", {"conversations": [{"from": "bot", "value": "x"}]}, "wrong_type", "conversations[0].from"),
        ("sharegpt", {"conversations": [{"from": "human"}]}, "missing_key", 'missing key "value" in conversations[0]'),
        ("sharegpt", {"conversations": []}, "empty", "empty conversation"),
        ("messages", {"messages": [{"role": "user", "content": "hi"}]}, "empty", "no non-empty assistant turn"),
        ("messages", {"messages": [{"role": "user", "content": ["x"]}]}, "wrong_type", "messages[0].content"),
        ("messages", {"msgs": []}, "missing_key", 'missing key "messages"'),
    ],
)
def test_bad_records_are_rejected_with_reason(tiny_tokenizer, fmt, record, reason, message):
    (r,) = SampleEncoder(tiny_tokenizer, fmt).encode_batch([record])
    assert isinstance(r, Rejected) and r.reason == reason and message in r.message


def test_over_length_error_truncate_drop(tiny_tokenizer):
    rec = {"messages": CONVERSATION}
    full = SampleEncoder(tiny_tokenizer, "messages").encode_batch([rec])[0]
    n = len(full.ids) - 3
    (err,) = SampleEncoder(tiny_tokenizer, "messages", max_length=n).encode_batch([rec])
    assert err.reason == "over_length" and f"longer than --max-length {n}" in err.message
    (cut,) = SampleEncoder(tiny_tokenizer, "messages", max_length=n, over_length="truncate").encode_batch([rec])
    assert cut.truncated and cut.ids.tolist() == full.ids[:n].tolist() and cut.mask.tolist() == full.mask[:n].tolist()
    (drop,) = SampleEncoder(tiny_tokenizer, "messages", max_length=n, over_length="drop").encode_batch([rec])
    assert drop.reason == "over_length"
    # Truncating away every assistant token leaves nothing to learn: rejected, not kept.
    (none,) = SampleEncoder(tiny_tokenizer, "messages", max_length=5, over_length="truncate").encode_batch([rec])
    assert none.reason == "over_length" and "removes every assistant token" in none.message


def test_prefix_method_rejects_non_prefix_stable_template(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    # Renders only the last message: rendering messages[:i+1] is not a prefix of the whole conversation.
    tok.chat_template = "{{ messages[-1]['content'] }}"
    (r,) = SampleEncoder(tok, "messages").encode_batch([{"messages": CONVERSATION}])
    assert r.reason == "template" and "generation" in r.message


def test_parse_json_line_errors():
    assert formats.parse_json_line(b'{"a": 1}') == {"a": 1}
    with pytest.raises(formats.BadRecord, match="malformed JSON"):
        formats.parse_json_line(b'{"a": 1')
    with pytest.raises(formats.BadRecord, match="not valid UTF-8"):
        formats.parse_json_line(b'{"a": "\xff"}')


_WORDS = st.text(alphabet="abcdefghij klmnop,.?!0123", min_size=1, max_size=30).map(lambda s: "x" + s.rstrip())
_TURN = st.tuples(st.sampled_from(["user", "tool"]), _WORDS, _WORDS)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(system=st.one_of(st.none(), _WORDS), turns=st.lists(_TURN, min_size=1, max_size=4))
def test_masks_property_both_methods_agree_and_cover_assistant_text(
    tiny_tokenizer, no_generation_tokenizer, system, turns
):
    messages = [{"role": "system", "content": system}] if system else []
    for role, prompt, answer in turns:
        messages += [{"role": role, "content": prompt}, {"role": "assistant", "content": answer}]
    (a,) = SampleEncoder(tiny_tokenizer, "messages").encode_batch([{"messages": messages}])
    (b,) = SampleEncoder(no_generation_tokenizer, "messages").encode_batch([{"messages": messages}])
    assert a.ids.tolist() == b.ids.tolist() and a.mask.tolist() == b.mask.tolist()
    assert _masked_pieces(tiny_tokenizer, a.ids, a.mask) == [f"{t[2]}<|im_end|>" for t in turns]


def test_text_falls_back_to_tokenizer_call_when_rust_ids_differ(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    # A tokenizer whose Python __call__ changes the ids (here: prepends an id) must not be bypassed.
    original_call = type(tok).__call__

    class Prepending(type(tok)):
        def __call__(self, text, *args, **kwargs):
            out = original_call(self, text, *args, **kwargs)
            out["input_ids"] = [[7, *ids] for ids in out["input_ids"]]
            return out

    tok.__class__ = Prepending
    enc = SampleEncoder(tok, "text")
    (e,) = enc.encode_batch([{"text": "hello world"}])
    assert enc._rust_text is False and e.ids.tolist() == tok(["hello world"])["input_ids"][0]
    assert e.ids[0] == 7


@pytest.mark.parametrize("with_generation_tags", [True, False])
def test_template_exceptions_become_rejected_records(tiny_tokenizer_dir, with_generation_tags):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('must start with user') }}{% endif %}"
    base = CHATML_TEMPLATE
    if not with_generation_tags:
        base = without_generation_tags(base)
    tok.chat_template = strict + base
    good = {"messages": CONVERSATION[1:3]}
    ok, bad = SampleEncoder(tok, "messages").encode_batch([good, {"messages": CONVERSATION}])
    assert isinstance(ok, Encoded) and _masked_pieces(tok, ok.ids, ok.mask) == ["42.<|im_end|>"]
    assert bad.reason == "template" and "must start with user" in bad.message


@pytest.mark.parametrize("method", ["generation", "prefix"])
def test_lone_surrogate_rejects_only_its_record(tiny_tokenizer, no_generation_tokenizer, method):
    tok = tiny_tokenizer if method == "generation" else no_generation_tokenizer
    bad_text = json.loads('"a\\ud800b"')  # valid JSON, not valid Unicode text
    good = {"messages": CONVERSATION[1:3]}
    bad = {"messages": [{"role": "user", "content": bad_text}, {"role": "assistant", "content": "x"}]}
    ok, rejected = SampleEncoder(tok, "messages").encode_batch([good, bad])
    assert isinstance(ok, Encoded) and rejected.reason == "bad_encoding" and "lone UTF-16 surrogate" in rejected.message
    ok, rejected = SampleEncoder(tok, "text").encode_batch([{"text": "fine"}, {"text": bad_text}])
    assert ok.ids.tolist() == tiny_tokenizer("fine")["input_ids"] and rejected.reason == "bad_encoding"
