"""The stage / offload / quantized-base rules (ds_configs/rules.py) give the same verdict through every caller: the
training config, the DeepSpeed JSON builder, the memory model and the generator, each in its own key names."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ds_configs import rules
from ds_configs.batch import resolve_batch
from ds_configs.build import make_ds_config
from ds_configs.generate import STRATEGIES, _qlora_refusal
from ds_configs.memory import MethodSpec, estimate, shape_from_numbers
from finetune.config import ConfigError, load_config

BASE = ["model.name_or_path=m", "data.train=d", "output_dir=o", "train.micro_batch_size=1"]
SHAPE = shape_from_numbers(layers=2, hidden=64, vocab=128, intermediate=128)

# stage, offload optimizer, offload params, nvme path, quantized base bits (None: not quantized), expected rule
TABLE = [
    (2, "none", "none", None, None, None),
    (0, "none", "none", None, None, None),
    (3, "cpu", "cpu", None, None, None),
    (3, "nvme", "nvme", "/nvme", None, None),
    (2, "none", "cpu", None, None, "offload_params_needs_stage3"),
    (1, "none", "nvme", "/nvme", None, "offload_params_needs_stage3"),
    (0, "cpu", "none", None, None, "offload_optimizer_needs_stage1"),
    (2, "nvme", "none", "/nvme", None, "nvme_needs_stage3"),
    (3, "nvme", "none", None, None, "nvme_needs_path"),
    (3, "none", "none", None, 4, None),
    (2, "cpu", "none", None, 8, None),
    (3, "none", "none", None, 8, "quantized_8bit_no_stage3"),
    (3, "cpu", "cpu", None, 4, "quantized_no_param_offload"),
    (3, "none", "cpu", None, 8, "quantized_no_param_offload"),
]


def _expected(stage, opt, par, path, bits, rule) -> rules.Violation | None:
    found = rules.check(stage, opt, par, optimizer_nvme_path=path, param_nvme_path=path, quant_bits=bits)
    assert [v.rule for v in found][:1] == ([rule] if rule else []), found
    return found[0] if found else None


@pytest.mark.parametrize("stage,opt,par,path,bits,rule", TABLE)
def test_config_json_memory_and_generator_agree(stage, opt, par, path, bits, rule):
    expected = _expected(stage, opt, par, path, bits, rule)
    method = ["method.name=qlora", f"method.qlora.bits={bits}"] if bits else ["method.name=lora"]
    zero = [f"zero.stage={stage}", f"zero.offload_optimizer={opt}", f"zero.offload_params={par}"]
    cfg = load_config(None, [*BASE, *method, *zero, f"zero.nvme_path={path or 'null'}"])

    # the training config
    if expected is None:
        cfg.validate(world_size=1)
    else:
        with pytest.raises(ConfigError) as e:
            cfg.validate(world_size=1)
        assert str(e.value) == expected.message(
            rules.KeyStyle({**rules.CONFIG_KEYS.keys, "quant_bits": "method.qlora.bits"})
        )
        assert "zero." in str(e.value) or "method.qlora.bits" in str(e.value)

    # the JSON builder: it knows nothing about the method, so it applies the stage/offload/path rules only
    zero_only = _expected(stage, opt, par, path, None, rule if rule and not rule.startswith("quantized") else None)
    build = dict(batch=resolve_batch(world_size=1, micro_batch_size=1), precision="fp32", nvme_path=path)
    if zero_only is None:
        make_ds_config(zero_stage=stage, offload_optimizer=opt, offload_params=par, **build)
    else:
        with pytest.raises(ValueError) as e:
            make_ds_config(zero_stage=stage, offload_optimizer=opt, offload_params=par, **build)
        assert str(e.value) == f"arguments: {zero_only.message(rules.JSON_KEYS)}"
        assert '"zero_optimization.' in str(e.value)

    # the memory model: no NVMe path to check (it estimates bytes, it writes nothing)
    spec = MethodSpec("qlora" if bits else "lora", quant_bits=bits or 4)
    kw = dict(zero_stage=stage, offload_optimizer=opt, offload_params=par, seq_len=16, micro_batch=1)
    if expected is None or expected.rule == "nvme_needs_path":
        assert estimate(SHAPE, spec, **kw).gpu > 0
    else:
        with pytest.raises(ValueError) as e:
            estimate(SHAPE, spec, **kw)
        assert str(e.value) == expected.message(rules.ARGUMENT_KEYS)

    # the generator: it only lists valid stage/offload strategies, and refuses quantized ones with the rule's reason
    if zero_only is not None:
        assert (stage, opt, par) not in {(s, o, p) for _, s, o, p in STRATEGIES}
    elif bits is not None:
        assert _qlora_refusal(SimpleNamespace(method=spec), stage, par) == (expected.reason if expected else None)


def test_every_generator_strategy_passes_the_rules():
    for name, stage, opt, par in STRATEGIES:
        assert not rules.check(stage, opt, par, optimizer_nvme_path="/nvme", param_nvme_path="/nvme"), name


def test_quantized_base_in_fp16_is_refused_by_the_config():
    with pytest.raises(ConfigError, match="method.name=qlora with precision=fp16 is unstable; use precision=bf16"):
        load_config(None, [*BASE, "method.name=qlora", "precision=fp16"]).validate(world_size=1)
    load_config(None, [*BASE, "method.name=lora", "precision=fp16"]).validate(world_size=1)


def test_unsupported_quantized_bits():
    assert [v.rule for v in rules.check(2, quant_bits=3)] == ["quant_bits_unsupported"]
    with pytest.raises(ValueError, match="--quant-bits 3: a quantized"):
        MethodSpec("qlora", quant_bits=3)
    MethodSpec("lora", quant_bits=3)  # not quantized: the knob is unused
