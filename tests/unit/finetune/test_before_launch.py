"""``finetune.preflight.check_before_launch``: what the config, the files and the model's config.json can answer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.config import ConfigError, load_config
from finetune.preflight import check_before_launch, data_path_problem, output_dir_problem, position_limit


def _cfg(tmp_path: Path, model: str, *overrides: str):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    return load_config(
        None, [f"model.name_or_path={model}", f"data.train={data}", f"output_dir={tmp_path / 'o'}", *overrides]
    )


def test_position_limit_reads_rope_scaling():
    assert position_limit({"max_position_embeddings": 4096}) == (4096, "max_position_embeddings=4096")
    scaled = {"max_position_embeddings": 32768, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    assert position_limit(scaled)[0] == 131072
    # Llama 3.1 style: the config's value is already the extended one
    llama31 = {
        "max_position_embeddings": 131072,
        "rope_scaling": {"factor": 8.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    }
    assert position_limit(llama31)[0] == 131072
    assert position_limit({"n_positions": 1024})[0] == 1024
    assert position_limit({"hidden_size": 8}) is None


def test_data_kinds(tmp_path):
    (tmp_path / "p.bin").write_bytes(b"")
    (tmp_path / "p.idx").write_bytes(b"")
    assert data_path_problem(str(tmp_path / "p"), "data.train") is None
    (tmp_path / "q.idx").write_bytes(b"")
    assert "q.bin does not; re-run the conversion" in data_path_problem(str(tmp_path / "q"), "data.train")
    wds = tmp_path / "shards"
    wds.mkdir()
    assert "expected an mmap prefix" in data_path_problem(str(wds), "data.eval")
    (wds / "index.json").write_text("{}")
    assert data_path_problem(str(wds), "data.eval") is None
    assert data_path_problem(str(wds / "index.json"), "data.eval") is None
    assert data_path_problem(str(tmp_path / "none" / "index.json"), "data.eval").endswith("no such file")
    assert "is a directory" in data_path_problem(str(_mkdir(tmp_path / "x.jsonl")), "data.train")


def _mkdir(p: Path) -> Path:
    p.mkdir()
    return p


def test_output_dir_under_a_file_or_unwritable(tmp_path):
    f = tmp_path / "f"
    f.write_text("")
    assert "is a file, so the directory cannot be created" in output_dir_problem(str(f / "run"))
    assert output_dir_problem(str(tmp_path / "new" / "deeper")) is None


def test_model_folder_without_config(tmp_path):
    empty = _mkdir(tmp_path / "model")
    with pytest.raises(ConfigError, match=r"model.name_or_path=.*no config.json in this folder"):
        check_before_launch(_cfg(tmp_path, str(empty)))
    with pytest.raises(ConfigError, match="no such folder"):
        check_before_launch(_cfg(tmp_path, str(tmp_path / "typo")))


def _fill_hub_cache(cache: Path, repo: str, config: dict) -> None:
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<rev>/config.json}."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps(config))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0" * 40)


def test_hub_id_checked_from_the_local_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    _fill_hub_cache(cache, "acme/tiny", {"model_type": "llama", "max_position_embeddings": 512})
    with pytest.raises(ConfigError, match=r"data.seq_len=1024 exceeds what acme/tiny embeds"):
        check_before_launch(_cfg(tmp_path, "acme/tiny", "data.seq_len=1024"))
    check_before_launch(_cfg(tmp_path, "acme/tiny", "data.seq_len=512"))
    check_before_launch(_cfg(tmp_path, "acme/not-downloaded", "data.seq_len=99999"))  # nothing to check offline
    _fill_hub_cache(cache, "acme/custom", {"model_type": "mine", "auto_map": {"AutoConfig": "x.Y"}})
    with pytest.raises(ConfigError, match="model.trust_remote_code=true"):
        check_before_launch(_cfg(tmp_path, "acme/custom"))
