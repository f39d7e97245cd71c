"""Hostile input: fuzzed converter input, path traversal in WebDataset shards, pickles posing as weights,
``trust_remote_code`` defaults, and ``torch.load`` without ``weights_only=True`` anywhere in the source tree.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from data_tools.convert import ConversionError, convert, main
from data_tools.indexed import IndexedDataset

REPO = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ["finetune", "data_tools", "ds_configs", "launch", "benchmarks"]

# ------------------------------------------------------------------------------------------- converter fuzzing
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
)
_json = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
)
# Long fields: a short unicode string repeated into tens of kilobytes.
_huge = st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=4), st.integers(2_000, 20_000))
# Mostly plain text so that a good share of files convert (the valid-output branch is checked too), but every shape.
_text = st.text(min_size=1, max_size=40)
_field = st.one_of(_text, _text, _text, _text, _huge, st.just(""), _json)
_turn = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", ""]), "content": _field})
_sharegpt_turn = st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "system", "x"]), "value": _field})
_record = st.one_of(
    _json,
    st.fixed_dictionaries({"text": _text}),
    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": _text}))}),
    st.fixed_dictionaries({"text": _field}),
    st.fixed_dictionaries({"instruction": _field, "output": _field}, optional={"input": _field}),
    st.fixed_dictionaries({"messages": st.one_of(st.lists(_turn, max_size=4), _json)}),
    st.fixed_dictionaries({"conversations": st.one_of(st.lists(_sharegpt_turn, max_size=4), _json)}),
)


@st.composite
def _jsonl_bytes(draw) -> bytes:
    """A jsonl file: mostly JSON records, sometimes garbage, blank lines, invalid UTF-8 or a lone surrogate."""
    lines = []
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["record"] * 12 + ["garbage", "blank", "bad_utf8", "surrogate"]))
        if kind == "record":
            text = json.dumps(draw(_record), ensure_ascii=draw(st.booleans()))
            lines.append(text.encode("utf-8", "surrogatepass"))
        elif kind == "garbage":
            lines.append(draw(st.text(max_size=20)).encode("utf-8", "surrogatepass"))
        elif kind == "blank":
            lines.append(b"")
        elif kind == "bad_utf8":
            lines.append(b'{"text": "\xff\xfe"}')
        else:
            lines.append(json.dumps({"text": "a\ud800b"}, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    return b"\n".join(lines) + draw(st.sampled_from([b"", b"\n", b"\r\n"]))


# Rejections that blame the tokenizer or template, not the record: well-formed content must never get one (the
# encoder lets its own bugs surface instead of hiding them as rejected records).
_ENCODER_REASONS = ("tokenizer", "template", "dropped_by_template")


def _check_one_conversion(data: bytes, fmt: str, on_error: str, max_length, tokenizer, wellformed=False) -> None:
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "in.jsonl"
        src.write_bytes(data)
        prefix = Path(d) / "out"
        try:
            result = convert(
                [src],
                prefix,
                tokenizer,
                fmt=fmt,
                on_error=on_error,
                max_length=max_length,
                over_length="truncate" if max_length else "error",
                progress=False,
            )
        except ConversionError as e:
            # A clean error names the input file (and the line, for a bad record) and leaves no final output.
            assert str(src) in str(e), f"error does not name the input: {e}"
            assert not list(Path(d).glob("out*")), "a failed conversion left output under the final name"
            if wellformed:  # only a record can be to blame: file:LINE: and a reason about the record
                # (with on_error=skip, input whose every record was skipped: "no usable records (skipped: {...})")
                assert re.match(rf"{re.escape(str(src))}(:\d+: |: no usable records)", str(e)), str(e)
                assert not any(f"'{r}'" in str(e) for r in _ENCODER_REASONS), str(e)
                assert "chat template" not in str(e) and "the tokenizer" not in str(e), str(e)
            event("clean error")
            return
        event("valid output")
        ds = IndexedDataset(prefix)
        counts = result.meta["counts"]
        if wellformed:
            blamed = {r: n for r, n in result.meta["skipped"]["by_reason"].items() if r in _ENCODER_REASONS}
            assert not blamed, f"well-formed records rejected by the encoder: {result.meta['skipped']}"
        assert len(ds) == counts["documents"] and ds.num_tokens == counts["tokens"]
        for i in range(len(ds)):
            sample = ds[i]
            assert len(sample) > 0 and int(sample.max()) < len(tokenizer)


# auto and skip more often: a forced format that does not match the record only exercises one error path.
_FORMATS = st.sampled_from(["auto", "auto", "auto", "text", "alpaca", "sharegpt", "messages"])
_ON_ERROR = st.sampled_from(["fail", "skip", "skip"])
_SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}


@settings(max_examples=40, **_SETTINGS)
@given(
    data=_jsonl_bytes(),
    fmt=_FORMATS,
    on_error=_ON_ERROR,
    max_length=st.sampled_from([None, 8]),
)
def test_converter_fuzz_clean_error_or_valid_output(tiny_tokenizer, data, fmt, on_error, max_length):
    _check_one_conversion(data, fmt, on_error, max_length, tiny_tokenizer)


@pytest.mark.slow
@settings(max_examples=1500, **_SETTINGS)
@given(
    data=_jsonl_bytes(),
    fmt=_FORMATS,
    on_error=_ON_ERROR,
    max_length=st.sampled_from([None, 8, 64]),
)
def test_converter_fuzz_many(tiny_tokenizer, data, fmt, on_error, max_length):
    _check_one_conversion(data, fmt, on_error, max_length, tiny_tokenizer)


_unicode_field = st.one_of(_text, _text, _huge, st.just(""))


@st.composite
def _wellformed_jsonl(draw) -> tuple[bytes, str]:
    """Well-formed records of one format with hostile *content*: any unicode, huge and empty fields."""
    fmt = draw(st.sampled_from(["text", "alpaca", "messages", "sharegpt"]))
    one = {
        "text": st.fixed_dictionaries({"text": _unicode_field}),
        "alpaca": st.fixed_dictionaries({"instruction": _unicode_field, "input": _unicode_field, "output": _text}),
        "messages": st.fixed_dictionaries(
            {
                "messages": st.tuples(_unicode_field, _text).map(
                    lambda t: [{"role": "user", "content": t[0]}, {"role": "assistant", "content": t[1]}]
                )
            }
        ),
        "sharegpt": st.fixed_dictionaries(
            {
                "conversations": st.tuples(_unicode_field, _text).map(
                    lambda t: [{"from": "human", "value": t[0]}, {"from": "gpt", "value": t[1]}]
                )
            }
        ),
    }[fmt]
    records = draw(st.lists(one, min_size=1, max_size=4))
    return b"\n".join(json.dumps(r, ensure_ascii=draw(st.booleans())).encode() for r in records) + b"\n", fmt


@settings(max_examples=30, **_SETTINGS)
@given(case=_wellformed_jsonl(), on_error=_ON_ERROR, max_length=st.sampled_from([None, 8]))
def test_converter_fuzz_wellformed_hostile_content(tiny_tokenizer, case, on_error, max_length):
    data, fmt = case
    _check_one_conversion(data, fmt, on_error, max_length, tiny_tokenizer, wellformed=True)


def test_converter_cli_reports_bad_line_without_traceback(tiny_tokenizer_dir, tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "fine"}\n{"text": \n')
    code = main(["--input", str(src), "--output-prefix", str(tmp_path / "o"), "--tokenizer", str(tiny_tokenizer_dir)])
    err = capsys.readouterr().err
    assert code == 1
    assert f"{src}:2" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------- WebDataset traversal
def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _write_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _index(dirpath: Path, shard_path: str, samples: int) -> Path:
    idx = dirpath / "index.json"
    idx.write_text(
        json.dumps(
            {
                "format": "dsft-webdataset/1",
                "shards": [{"path": shard_path, "samples": samples}],
                "total_samples": samples,
                "has_loss_mask": False,
            }
        )
    )
    return idx


def test_webdataset_index_with_shard_outside_its_folder_is_refused(tmp_path):
    from data_tools.loader import build_dataloader

    ds_dir = tmp_path / "ds"
    ds_dir.mkdir()
    _write_tar(tmp_path / "outside.tar", {"000.input_ids.npy": _npy(np.arange(1, 9, dtype=np.int32))})
    idx = _index(ds_dir, "../outside.tar", 1)
    with pytest.raises(ValueError, match=r"outside"):
        build_dataloader(idx, seq_len=8, micro_batch_size=1, packing="padding")


def test_webdataset_member_with_traversal_name_is_refused(tmp_path):
    from data_tools.loader import build_dataloader

    ds_dir = tmp_path / "ds"
    ds_dir.mkdir()
    _write_tar(ds_dir / "shard-000000.tar", {"../../evil.input_ids.npy": _npy(np.arange(1, 9, dtype=np.int32))})
    idx = _index(ds_dir, "shard-000000.tar", 1)
    with pytest.raises(ValueError, match=r"\.\./\.\./evil"):
        loader = build_dataloader(idx, seq_len=8, micro_batch_size=1, packing="padding", shuffle=False)
        next(iter(loader))


# ------------------------------------------------------------------------------------------- weights and code
class _Exploit:
    """Pickles into a call of os.system: loading it with a full unpickler runs a command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_weights_never_execute_code(tiny_llama_dir, tmp_path):
    """A model folder whose only weights are a malicious pickle: dsft refuses it because it loads safetensors only
    (``use_safetensors=True`` in ``load_model``), before any unpickler sees the file; a full unpickle of the same file
    runs the payload, so the marker check can fail."""
    import shutil

    import torch

    from finetune.config import load_config
    from finetune.model import load_model

    model_dir = tmp_path / "evil_model"
    shutil.copytree(tiny_llama_dir, model_dir)
    for f in model_dir.glob("*.safetensors*"):
        f.unlink()
    marker = tmp_path / "pwned"
    weights = model_dir / "pytorch_model.bin"
    torch.save({"model.embed_tokens.weight": _Exploit(marker)}, weights)
    cfg = load_config(overrides=[f"model.name_or_path={model_dir}", "method.name=full"])
    # transformers' words for use_safetensors=True on a folder without model.safetensors. Without that flag it would
    # take the .bin (and refuse it only in torch.load's weights_only unpickler, an UnpicklingError).
    refusal = rf"^Error no file named model\.safetensors found in directory {re.escape(str(model_dir))}\.$"
    with pytest.raises(OSError, match=refusal):
        load_model(cfg, {}, "fp32", "sdpa")
    assert not marker.exists(), "loading weights executed code from a pickle"

    torch.load(weights, weights_only=False)  # the control: the payload is live
    assert marker.exists()


@pytest.mark.parametrize("setting,expected", [(None, False), ("false", False), ("true", True)])
def test_trust_remote_code_reaches_every_from_pretrained(tiny_llama_dir, tmp_path, monkeypatch, setting, expected):
    """``model.trust_remote_code`` (default off) is what the engine passes to every ``from_pretrained`` it calls
    (spied), and no source file hard-codes it on."""
    from tests.engine_probe import LOADERS, run_until_model_load

    overrides = [f"model.trust_remote_code={setting}"] if setting else []
    calls = run_until_model_load(monkeypatch, tmp_path, tiny_llama_dir, *overrides)
    assert sorted({name for name, _, _ in calls}) == sorted(LOADERS), calls
    assert all(path == str(tiny_llama_dir) and value is expected for _, path, value in calls), calls

    offenders = [
        f"{p.relative_to(REPO)}:{i}"
        for d in SOURCE_DIRS
        for p in (REPO / d).rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if "trust_remote_code=True" in line.replace(" ", "")
    ]
    assert not offenders, f"hard-coded trust_remote_code=True at {offenders}"


def _torch_load_calls_without_weights_only(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
        owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else None
        if name == "load" and owner == "torch":
            kw = {k.arg: k.value for k in node.keywords}
            ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
            if not ok:
                bad.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return bad


def test_every_torch_load_uses_weights_only():
    files = [p for d in SOURCE_DIRS if (REPO / d).is_dir() for p in (REPO / d).rglob("*.py")]
    assert files, "no source files found"
    bad = [loc for p in files for loc in _torch_load_calls_without_weights_only(p)]
    assert not bad, f"torch.load without weights_only=True at {bad}"


def test_weights_only_scanner_catches_a_bare_torch_load(tmp_path, monkeypatch):
    """The scanner above must be able to fail."""
    p = REPO / "tests" / "reliability" / "_scan_probe_tmp.py"
    monkeypatch.setattr("tests.reliability.test_hostile_input.REPO", REPO)
    try:
        p.write_text("import torch\nx = torch.load('a.pt')\ny = torch.load('b.pt', weights_only=True)\n")
        assert _torch_load_calls_without_weights_only(p) == ["tests/reliability/_scan_probe_tmp.py:2"]
    finally:
        p.unlink()
