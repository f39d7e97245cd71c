"""The method registry: aliases resolve everywhere a method is named, every registered method's section loads from
YAML and is described, and a method registered from outside ``finetune/methods/`` is known to the config, the engine's
recipe check and the memory model."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from finetune.config import ConfigError, describe, load_config
from finetune.methods import Method, get_method, memory_spec, names, register, registered, unregister

REPO = Path(__file__).resolve().parents[3]
BASE = ["model.name_or_path=m", "data.train=d", "output_dir=o", "train.micro_batch_size=1"]


@pytest.fixture
def head_method():
    """The test-defined head-only method (tests/recipes/head_method.py), registered for one test."""
    from tests.recipes.head_method import HEAD

    register(HEAD)
    yield HEAD
    unregister(HEAD.name)


def test_builtin_methods_and_their_lr_ranges():
    assert names() == ("full", "lora", "prefix", "prompt", "qlora")
    for m in registered():
        low, high = m.lr_range
        assert 0 < low < high, m.name
    assert get_method("full").lr_range[1] < get_method("lora").lr_range[1] < get_method("prompt").lr_range[1]
    with pytest.raises(ValueError, match="lr_range"):
        Method(name="x", summary="", prepare=lambda m, c: m, memory=get_method("full").memory, lr_range=(1e-3, 1e-4))


@pytest.mark.parametrize(
    "alias,canonical",
    [("ptuning_v2", "prefix"), ("p_tuning_v2", "prefix"), ("prompt_tuning", "prompt"), ("lora", "lora")],
)
def test_aliases_resolve_in_the_registry_the_config_and_the_memory_model(alias, canonical):
    from ds_configs.generate import build_parser
    from ds_configs.memory import MethodSpec

    assert get_method(alias).name == canonical
    cfg = load_config(None, [*BASE, f"method.name={alias}"])
    assert cfg.method.name == canonical  # one spelling from the config on
    assert MethodSpec(alias).name == canonical
    assert build_parser().parse_args(["--method", alias]).method == alias


def test_unknown_names_get_a_suggestion():
    with pytest.raises(ValueError, match="did you mean 'lora'"):
        get_method("lorra")
    with pytest.raises(ConfigError, match=r"method.name='ptuning': .*did you mean 'ptuning_v2'"):
        load_config(None, ["method.name=ptuning"])
    with pytest.raises(ConfigError, match=r"unknown key 'method.prefx' \(did you mean 'method.prefix'\?\)"):
        load_config(None, ["method.prefx.num_virtual_tokens=4"])


def test_engine_main_takes_names_or_aliases(capsys):
    from finetune.engine import main

    argv = ["method.name=prompt", "model.name_or_path=m", "output_dir=o"]
    assert main(methods=("ptuning_v2",), argv=argv) == 2
    err = capsys.readouterr().err
    assert "method.name=prompt is not trained by this recipe" in err and "finetune/prompt_tuning.py" in err
    # an alias of the configured method passes the recipe's check: the next error is validation's (no data.train)
    assert main(methods=("prompt_tuning",), argv=argv) == 2
    assert "data.train is empty" in capsys.readouterr().err


def _other_value(tp, default, choices):
    """A value of type ``tp`` that differs from ``default``, so a load that ignored the YAML would be caught."""
    if choices:
        return next(c for c in choices if c != default)
    if typing.get_origin(tp) in (typing.Union, type(int | str)):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is list:
        return ["q_proj", "v_proj"]
    return {bool: lambda: not default, int: lambda: default + 3, float: lambda: default * 2 + 1}.get(
        tp, lambda: "some text"
    )()


def _section_cases(methods):
    for m in methods:
        if m.config is None:
            continue
        hints = typing.get_type_hints(m.config)
        for f in dataclasses.fields(m.config):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            yield m, f.name, _other_value(hints[f.name], default, f.metadata.get("choices"))


def test_every_registered_section_loads_from_yaml_and_is_described(tmp_path, head_method):
    """Built-in sections and one registered from a test file: each key loads from a YAML file and has help."""
    cases = list(_section_cases(registered()))
    assert {m.name for m, _, _ in cases} == {"lora", "prefix", "prompt", "qlora", "head"}
    described = {key: help_ for key, _, help_ in describe()}
    for m, key, value in cases:
        y = tmp_path / f"{m.name}_{key}.yaml"
        y.write_text(yaml.safe_dump({"method": {"name": m.name, m.section_key: {key: value}}}))
        cfg = load_config(y)
        assert getattr(getattr(cfg.method, m.section_key), key) == value, (m.name, key)
        assert described.get(f"method.{m.section_key}.{key}"), f"method.{m.section_key}.{key}: no describe() help"
    assert "head" in described["method.name"] and "ptuning_v2=prefix" in described["method.name"]


def test_a_registered_method_is_known_everywhere_and_gone_after_unregister(head_method):
    from ds_configs.memory import MethodSpec, estimate, shape_from_numbers

    cfg = load_config(None, [*BASE, "method.name=lm_head", "method.head.train_norm=false"])
    assert cfg.method.name == "head" and cfg.method.head.train_norm is False
    assert not cfg.is_peft and cfg.packing == "packed"
    cfg.validate(world_size=1)
    with pytest.raises(ConfigError, match="method.head.modules is empty"):
        load_config(None, [*BASE, "method.name=head", "method.head.modules=[]"]).validate(world_size=1)
    with pytest.raises(ConfigError, match="did you mean 'method.head.train_norm'"):
        load_config(None, ["method.head.trainnorm=false"])
    shape = shape_from_numbers(layers=2, hidden=64, vocab=128, intermediate=128)
    est = estimate(shape, memory_spec(cfg), zero_stage=0, seq_len=16, micro_batch=1, precision="fp32")
    assert est.trainable == 128 * 64 + 64
    # it trains base weights: the frozen rest is total - trainable at 4 bytes (fp32), and each trainable weight holds
    # fp32 weight + gradient + Adam's fp32 master and moments at ZeRO-0: 4 + 4 + 16 bytes
    assert est.parts_gpu["model_states"] == 24 * est.trainable + 4 * (shape.total_params - est.trainable)
    unregister("head")
    try:
        with pytest.raises(ConfigError, match="unknown key 'method.head'"):
            load_config(None, ["method.head.train_norm=false"])
        with pytest.raises(ValueError, match="not registered"):
            MethodSpec("head")
    finally:
        register(head_method)  # the fixture unregisters it


def test_memory_spec_reads_the_method_knobs_from_the_config():
    spec = memory_spec(load_config(None, ["method.name=lora", "method.lora.r=4", "method.lora.target_modules=q,v"]))
    assert (spec.name, spec.lora_r, spec.lora_targets) == ("lora", 4, ("q", "v"))
    assert memory_spec(load_config(None, ["method.name=qlora", "method.qlora.bits=8"])).base_quant_bits == 8
    assert memory_spec(load_config(None, ["method.name=prompt_tuning"])).virtual_tokens == 16
    assert memory_spec(load_config(None, ["method.name=lora"])).base_quant_bits is None


def test_registering_a_taken_name_or_section_is_refused():
    full = get_method("full")
    with pytest.raises(ValueError, match="already taken by method 'prefix'"):
        register(dataclasses.replace(full, name="ptuning_v2"))
    with pytest.raises(ValueError, match="section method.lora is already method 'lora'"):
        register(dataclasses.replace(full, name="other", config=dataclasses.make_dataclass("C", []), section="lora"))
    assert "other" not in names()


def test_the_generator_and_the_registry_do_not_import_torch():
    code = "import sys, ds_configs.generate, finetune.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
