import hashlib
import json

import pytest
from transformers import AutoTokenizer

from data_tools import meta
from finetune.tiny import train_tokenizer


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    """A tokenizer trained on another corpus: another vocabulary."""
    return train_tokenizer(tmp_path_factory.mktemp("other_tok"), ["zebra yak quokka " * 5, "lorem ipsum dolor"] * 20)


def test_fingerprint_is_the_sorted_vocab_hash(tiny_tokenizer, tiny_tokenizer_dir, tmp_path):
    fp = meta.tokenizer_fingerprint(tiny_tokenizer)
    expected = hashlib.sha256(
        "".join(f"{t}\t{i}\n" for t, i in sorted(tiny_tokenizer.get_vocab().items())).encode()
    ).hexdigest()
    assert fp["vocab_hash"] == expected and fp["vocab_size"] == len(tiny_tokenizer)
    assert fp["name"] == str(tiny_tokenizer_dir)
    # The same tokenizer saved elsewhere: other name, same hash.
    tiny_tokenizer.save_pretrained(tmp_path / "copy")
    assert meta.tokenizer_fingerprint(AutoTokenizer.from_pretrained(tmp_path / "copy"))["vocab_hash"] == expected


def test_check_meta_matches_tokenizer(tiny_tokenizer, other_tokenizer, tmp_path):
    prefix = tmp_path / "data" / "train"
    meta.write_meta(prefix, {"format": "text", "tokenizer": meta.tokenizer_fingerprint(tiny_tokenizer)})
    assert json.loads((tmp_path / "data" / "train.meta.json").read_text())["format"] == "text"
    assert meta.check_meta_matches_tokenizer(prefix, tiny_tokenizer)["format"] == "text"
    with pytest.raises(meta.MetaError, match=r"converted with tokenizer .* re-convert with --tokenizer"):
        meta.check_meta_matches_tokenizer(prefix, other_tokenizer)


def test_missing_or_corrupt_meta(tiny_tokenizer, tmp_path):
    with pytest.raises(meta.MetaError, match="not found; convert the data"):
        meta.check_meta_matches_tokenizer(tmp_path / "none", tiny_tokenizer)
    assert meta.check_meta_matches_tokenizer(tmp_path / "none", tiny_tokenizer, missing_ok=True) is None
    (tmp_path / "bad.meta.json").write_text("{oops")
    with pytest.raises(meta.MetaError, match=r"bad.meta.json:1: not valid JSON"):
        meta.read_meta(tmp_path / "bad")
