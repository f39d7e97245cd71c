"""Mixtures in the training config and its checks: the typed list form, refusals of bad weights and of sources
converted with different tokenizers (before the model loads), and the per-source evaluation keys."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data_tools.indexed import IndexedDatasetBuilder, loss_mask_prefix
from data_tools.meta import meta_path
from finetune.config import ConfigError, DataSource, load_config, to_dict

BASE = ["model.name_or_path=m", "output_dir=/tmp/out", "data.train=d"]


def _cfg(*overrides):
    cfg = load_config(None, [*BASE, *overrides])
    cfg.validate(1)
    return cfg


def test_the_list_form_loads_typed_and_round_trips_through_config_json():
    cfg = _cfg("data.train=[{path: a, weight: 0.7}, {path: b, weight: 0.3, name: tools}]", "data.eval=[{path: e}]")
    assert cfg.data.train == [DataSource("a", 0.7, None), DataSource("b", 0.3, "tools")]
    assert cfg.data.eval == [DataSource("e", 1.0, None)]
    assert load_config(None, [], to_dict(cfg)).data.train == cfg.data.train  # dsft eval reloads config.json
    assert _cfg("data.train=plain/prefix").data.train == "plain/prefix"  # a string stays valid


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("[{pth: a}]", r"unknown key 'data.train\[0\].pth' \(did you mean 'data.train\[0\].path'\?\)"),
        ("[{path: a}, {path: b, weight: lots}]", r"data.train\[1\].weight='lots': expected a number"),
        ("[{path: a}, {path: b, weight: -0.5}]", r"data.train\[1\].weight=-0.5 must be a finite number >= 0"),
        ("[{path: a, weight: .nan}]", r"data.train\[0\].weight=nan must be a finite number"),
        ("[{path: a, weight: 0}, {path: b, weight: 0}]", "data.train: every weight is 0"),
        ("[{weight: 1}]", r"data.train\[0\].path is empty"),
        ("[{path: x/a}, {path: y/a.jsonl}]", r"data.train\[1\]: the name 'a' is also data.train\[0\]'s"),
        ("{path: a}", "expected a string or a list"),
    ],
)
def test_bad_mixtures_are_config_errors_naming_the_item(value, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(f"data.train={value}")


def _prefix(path, vocab_hash: str, name: str) -> str:
    builder = IndexedDatasetBuilder(str(path), dtype=np.uint16)
    mask = IndexedDatasetBuilder(loss_mask_prefix(path), dtype=np.uint8)
    for n in (5, 7, 9):
        builder.add_document(np.arange(n, dtype=np.uint16) + 3)
        mask.add_document(np.ones(n, dtype=np.uint8))
    builder.finalize()
    mask.finalize()
    meta = {"tokenizer": {"name": name, "vocab_hash": vocab_hash, "vocab_size": 64}}
    meta_path(path).write_text(json.dumps(meta))
    return str(path)


def test_sources_converted_with_different_tokenizers_are_refused_before_the_model_loads(tmp_path, tiny_llama_dir):
    from finetune.preflight import check_before_launch

    a = _prefix(tmp_path / "a", "h1", "tok-one")
    b = _prefix(tmp_path / "b", "h1", "tok-one")
    c = _prefix(tmp_path / "c", "h2", "tok-two")
    common = [f"model.name_or_path={tiny_llama_dir}", f"output_dir={tmp_path / 'out'}"]
    ok = load_config(None, [*common, f"data.train=[{{path: {a}}}, {{path: {b}}}]"])
    check_before_launch(ok)  # same tokenizer: fine
    bad = load_config(None, [*common, f"data.train=[{{path: {a}}}, {{path: {b}}}, {{path: {c}, weight: 2}}]"])
    with pytest.raises(
        ConfigError, match=rf"data.train\[0\]={a} and data.train\[2\]={c} were converted with different"
    ):
        check_before_launch(bad)
    missing = load_config(None, [*common, f"data.train=[{{path: {a}}}, {{path: {tmp_path / 'nope'}}}]"])
    with pytest.raises(ConfigError, match=r"data.train\[1\]="):
        check_before_launch(missing)


def test_check_sources_names_the_mixture_sources_that_disagree(tmp_path, tiny_tokenizer):
    from finetune.data import check_sources

    a = _prefix(tmp_path / "a", "h1", "tok-one")
    c = _prefix(tmp_path / "c", "h2", "tok-two")
    mixture = [{"path": a, "weight": 1.0, "name": "chat"}, {"path": c, "weight": 1.0, "name": "tools"}]
    with pytest.raises(ConfigError, match=r"source 'chat' .* and source 'tools' .* different tokenizers"):
        check_sources([mixture, None], tiny_tokenizer, len(tiny_tokenizer))
    # both agree with each other but not with the run's tokenizer: the per-source check names the source
    c2 = _prefix(tmp_path / "c2", "h1", "tok-one")
    with pytest.raises(ConfigError, match="mixture source 'chat': "):
        check_sources([[{**mixture[0]}, {**mixture[1], "path": c2}]], tiny_tokenizer, len(tiny_tokenizer))


def test_a_list_eval_reports_the_loss_per_source_and_over_all_tokens(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from data_tools.indexed import merge
    from data_tools.loader import build_dataloader
    from finetune.engine import evaluate, evaluate_sources

    a = _prefix(tmp_path / "a", "h", "t")
    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(str(tmp_path / "b"), dtype=np.uint16)
    mask = IndexedDatasetBuilder(loss_mask_prefix(tmp_path / "b"), dtype=np.uint8)
    for n in (6, 11, 4, 8):
        builder.add_document(rng.integers(3, 60, n).astype(np.uint16))
        mask.add_document(np.ones(n, dtype=np.uint8))
    builder.finalize()
    mask.finalize()
    b = str(tmp_path / "b")
    merge([a, b], tmp_path / "ab")
    merge([loss_mask_prefix(a), loss_mask_prefix(b)], loss_mask_prefix(tmp_path / "ab"))

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    cfg = _cfg("data.seq_len=16", "method.name=full")

    def loader(src):
        return build_dataloader(src, seq_len=16, micro_batch_size=2, shuffle=False, drop_last=False, attention="mask")

    ev = evaluate_sources(model, {"chat": loader(a), "tools": loader(b)}, cfg)
    assert {"loss/chat", "loss/tools", "ppl/chat", "tokens/chat", "tokens/tools"} <= set(ev)
    assert ev["loss/chat"] == pytest.approx(evaluate(model, loader(a), cfg)["loss"])
    assert ev["loss/chat"] != pytest.approx(ev["loss/tools"])
    together = evaluate(model, loader(str(tmp_path / "ab")), cfg)  # the same samples as one source
    assert ev["tokens"] == together["tokens"] == ev["tokens/chat"] + ev["tokens/tools"]
    assert ev["loss"] == pytest.approx(together["loss"], rel=1e-5)


def test_the_engine_does_not_pass_source_counts_to_the_model():
    from finetune.engine import _forward_kwargs

    cfg = _cfg("method.name=full")
    batch = {"input_ids": torch.ones(1, 4, dtype=torch.long), "num_real_tokens": 4, "source_counts": torch.tensor([1])}
    kwargs, real = _forward_kwargs(batch, cfg, torch.device("cpu"))
    assert "source_counts" not in kwargs and real == 4 and "source_counts" in batch  # the caller's batch is kept


def test_source_counts_reach_tensorboard_per_source(tmp_path):
    from finetune.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path)
    seen = {}
    logger._tb.add_scalar = lambda tag, value, step: seen.__setitem__(tag, value)
    logger.log({"step": 3, "split": "train", "loss": 1.5, "source_counts": {"chat": 30, "tools": 10}})
    logger.close()
    assert seen == {"train/loss": 1.5, "train/source_counts/chat": 30, "train/source_counts/tools": 10}
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["source_counts"] == {"chat": 30, "tools": 10}


def test_a_mixture_of_raw_data_and_a_prefix_resolves_item_by_item_and_blends(tmp_path, tiny_tokenizer):
    """A raw .jsonl item is converted once (errors name data.train[i]); the result is what build_dataloader takes."""
    from data_tools.loader import build_dataloader
    from finetune.data import resolve_data

    chat = tmp_path / "chat.jsonl"
    turns = [[{"role": "user", "content": f"{i}+1"}, {"role": "assistant", "content": str(i + 1)}] for i in range(12)]
    chat.write_text("".join(json.dumps({"messages": t}) + "\n" for t in turns))
    prefix = _prefix(tmp_path / "plain", "h", "t")
    cfg = load_config(None, [*BASE, f"output_dir={tmp_path / 'out'}", "data.seq_len=64"])
    items = [DataSource(str(chat), 3.0, None), DataSource(prefix, 1.0, "plain")]
    resolved = resolve_data(items, cfg, tiny_tokenizer, "data.train")
    assert [(r["name"], r["weight"]) for r in resolved] == [("chat", 3.0), ("plain", 1.0)]
    assert resolved[0]["path"].startswith(str(tmp_path / "out" / "data_cache")) and resolved[1]["path"] == prefix
    loader = build_dataloader(resolved, seq_len=64, micro_batch_size=1, packing="padding", drop_last=False)
    assert sum(int(b["source_counts"].sum()) for b in loader) == 15  # 12 + 3 units, every position once
    with pytest.raises(ConfigError, match=r"^data.train\[1\]"):
        resolve_data([items[0], DataSource(str(tmp_path / "missing.jsonl"))], cfg, tiny_tokenizer, "data.train")
