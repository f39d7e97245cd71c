"""Data that does not fit the model is refused at start with a message that says what to do.

Unit level: ``finetune.preflight.check_training_data``. Recipe level (slow): the real recipe under plain python.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_tools.convert import convert
from data_tools.indexed import IndexedDatasetBuilder
from finetune.preflight import PreflightError, check_training_data
from tests.reliability import _harness as h


def _records(n: int = 64) -> list[dict]:
    rng = random.Random(0)
    return [
        {"instruction": f"What is {a} plus {b}?", "output": f"{a + b}"}
        for a, b in ((rng.randint(0, 50), rng.randint(0, 50)) for _ in range(n))
    ]


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("mismatch") / "train.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    return p


@pytest.fixture(scope="module")
def good_prefix(jsonl, tiny_tokenizer) -> Path:
    prefix = jsonl.parent / "good"
    convert([jsonl], prefix, tiny_tokenizer, progress=False)
    return prefix


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    from finetune.tiny import train_tokenizer

    return train_tokenizer(tmp_path_factory.mktemp("other_tok"), ["completely different corpus 123"] * 50, 300)


@pytest.fixture(scope="module")
def other_tokenizer_prefix(jsonl, other_tokenizer) -> Path:
    prefix = jsonl.parent / "other"
    convert([jsonl], prefix, other_tokenizer, progress=False)
    return prefix


def _webdataset(jsonl: Path, tokenizer, name: str) -> Path:
    convert([jsonl], None, tokenizer, webdataset_dir=jsonl.parent / name, progress=False)
    return jsonl.parent / name / "index.json"


@pytest.fixture(scope="module")
def big_id_prefix(tmp_path_factory, tiny_tokenizer) -> Path:
    prefix = tmp_path_factory.mktemp("bigid") / "data"
    b = IndexedDatasetBuilder(prefix, np.uint16)
    for i in range(20):
        ids = np.arange(1, 30, dtype=np.uint16)
        if i == 13:
            ids[5] = len(tiny_tokenizer) + 7  # one id beyond the model's vocabulary
        b.add_document(ids)
    b.finalize()
    return prefix


def test_good_data_passes(good_prefix, tiny_tokenizer):
    check_training_data(good_prefix, tiny_tokenizer, len(tiny_tokenizer))


def test_data_from_another_tokenizer_is_refused(other_tokenizer_prefix, tiny_tokenizer):
    with pytest.raises(PreflightError, match="re-convert") as e:
        check_training_data(other_tokenizer_prefix, tiny_tokenizer, len(tiny_tokenizer))
    assert str(e.value).startswith(f"{other_tokenizer_prefix}.meta.json: "), e.value


def test_token_id_beyond_vocab_is_refused_naming_the_sequence(big_id_prefix, tiny_tokenizer):
    with pytest.raises(PreflightError, match=r"sequence 13 holds token id \d+, outside") as e:
        check_training_data(big_id_prefix, tiny_tokenizer, len(tiny_tokenizer))
    assert str(e.value).startswith(f"{big_id_prefix}.bin: "), e.value


def test_tokenizer_larger_than_embedding_is_refused(good_prefix, tiny_tokenizer):
    with pytest.raises(PreflightError, match="embedding only 100 rows"):
        check_training_data(good_prefix, tiny_tokenizer, 100)


def test_truncated_mmap_is_refused(good_prefix, tiny_tokenizer, tmp_path):
    import shutil

    for suffix in (".bin", ".idx", ".meta.json", "_loss_mask.bin", "_loss_mask.idx"):
        shutil.copy(f"{good_prefix}{suffix}", tmp_path / f"cut{suffix}")
    binf = tmp_path / "cut.bin"
    with open(binf, "r+b") as f:
        f.truncate(binf.stat().st_size - 10)
    with pytest.raises(PreflightError, match="truncated") as e:
        check_training_data(tmp_path / "cut", tiny_tokenizer, len(tiny_tokenizer))
    assert str(e.value).startswith(f"{binf}: "), e.value


@pytest.mark.parametrize("mask_lengths", [[8] * 9, [8, 8, 8, 7, 8, 8, 8, 8, 8, 8]], ids=["one fewer", "one shorter"])
def test_loss_mask_that_does_not_line_up_is_refused(tiny_tokenizer, tmp_path, mask_lengths):
    prefix = tmp_path / "data"
    tokens, mask = IndexedDatasetBuilder(prefix, np.uint16), IndexedDatasetBuilder(f"{prefix}_loss_mask", np.uint8)
    for _ in range(10):
        tokens.add_document(np.arange(1, 9, dtype=np.uint16))
    for n in mask_lengths:
        mask.add_document(np.ones(n, dtype=np.uint8))
    tokens.finalize()
    mask.finalize()
    with pytest.raises(PreflightError, match="do not line up") as e:
        check_training_data(prefix, tiny_tokenizer, len(tiny_tokenizer))
    assert str(e.value).startswith(f"{prefix}_loss_mask.idx: ") and f"sequences of {prefix}.idx" in str(e.value)
    assert "re-run the conversion" in str(e.value)


def test_webdataset_index_is_checked_against_the_tokenizer(jsonl, tiny_tokenizer, other_tokenizer, tmp_path):
    check_training_data(_webdataset(jsonl, tiny_tokenizer, "wds_good"), tiny_tokenizer, len(tiny_tokenizer))
    other = _webdataset(jsonl, other_tokenizer, "wds_other")
    with pytest.raises(PreflightError, match="re-convert with this model's tokenizer") as e:
        check_training_data(other, tiny_tokenizer, len(tiny_tokenizer))
    assert str(e.value).startswith(f"{other}: shards were converted with tokenizer "), e.value

    index = json.loads((jsonl.parent / "wds_good" / "index.json").read_text())
    index["meta"]["tokenizer"]["vocab_size"] = len(tiny_tokenizer) + 1  # the same vocabulary recorded as larger
    larger = tmp_path / "larger" / "index.json"
    larger.parent.mkdir()
    larger.write_text(json.dumps(index))
    with pytest.raises(PreflightError, match=f"{len(tiny_tokenizer) + 1}-token vocabulary, the model has") as e:
        check_training_data(larger, tiny_tokenizer, len(tiny_tokenizer))
    assert str(e.value).startswith(f"{larger}: "), e.value

    unreadable = tmp_path / "broken" / "index.json"
    unreadable.parent.mkdir()
    unreadable.write_text('{"format": "dsft-webdataset/1", "shards": [')
    with pytest.raises(PreflightError, match="cannot read the WebDataset index") as e:
        check_training_data(unreadable, tiny_tokenizer, len(tiny_tokenizer))
    assert str(e.value).startswith(f"{unreadable}: "), e.value


# -------------------------------------------------------------------------------------------- through the recipe
def _run_recipe(model_dir: Path, data: Path, out: Path) -> subprocess.CompletedProcess:
    args = h.recipe_args(model_dir, str(data), out, "train.max_steps=2")
    return subprocess.run(
        [sys.executable, *args], cwd=h.REPO, env=h._env(), capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_recipe_refuses_data_from_another_tokenizer(tiny_llama_dir, other_tokenizer_prefix, tmp_path):
    proc = _run_recipe(tiny_llama_dir, other_tokenizer_prefix, tmp_path / "out")
    assert proc.returncode != 0
    assert "re-convert" in proc.stderr and "tokenizer" in proc.stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists(), "no step may run on mismatched data"


@pytest.mark.slow
def test_recipe_refuses_truncated_mmap(tiny_llama_dir, good_prefix, tmp_path):
    import shutil

    for suffix in (".bin", ".idx", ".meta.json", "_loss_mask.bin", "_loss_mask.idx"):
        shutil.copy(f"{good_prefix}{suffix}", tmp_path / f"cut{suffix}")
    with open(tmp_path / "cut.bin", "r+b") as f:
        f.truncate((tmp_path / "cut.bin").stat().st_size - 10)
    proc = _run_recipe(tiny_llama_dir, tmp_path / "cut", tmp_path / "out")
    assert proc.returncode != 0 and "truncated" in proc.stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_recipe_refuses_token_id_beyond_vocab(tiny_llama_dir, big_id_prefix, tmp_path):
    proc = _run_recipe(tiny_llama_dir, big_id_prefix, tmp_path / "out")
    assert proc.returncode != 0 and "outside the model's vocabulary" in proc.stderr
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
