"""finetune.zero3_load: a ZeRO-3 model filled tensor by tensor equals from_pretrained, and what it does not cover
falls back (None) instead of loading something else."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch

from finetune import zero3_load

DS = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "zero_optimization": {"stage": 3}}


def _partitioned(model_dir):
    from transformers import AutoConfig
    from transformers.integrations import HfDeepSpeedConfig

    keep = HfDeepSpeedConfig(DS)  # noqa: F841 - transformers looks it up through a weak reference while building
    config = AutoConfig.from_pretrained(model_dir)
    return zero3_load.load_partitioned(
        model_dir, config, dtype=torch.float32, attn_implementation="sdpa", trust_remote_code=False
    )


def _gathered(model) -> dict[str, torch.Tensor]:
    from deepspeed import zero

    params = list(model.parameters())
    with zero.GatheredParameters(params):
        return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # untied embeddings; tied (lm_head is wte, absent in the file)
def test_partitioned_load_equals_from_pretrained(dist_env, tiny_llama_dir, tiny_gpt2_dir, arch):
    from transformers import AutoModelForCausalLM

    model_dir = tiny_llama_dir if arch == "llama" else tiny_gpt2_dir
    reference = dict(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).named_parameters())
    model = _partitioned(model_dir)
    assert model is not None
    assert all(hasattr(p, "ds_id") for p in model.parameters()), "the model must be ZeRO-3 partitioned"
    got = _gathered(model)
    assert set(got) == set(reference)
    for name, tensor in got.items():
        assert torch.equal(tensor, reference[name].detach()), name
    if arch == "gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight


def test_folders_it_does_not_cover_fall_back(dist_env, tiny_llama_dir, tmp_path):
    empty = tmp_path / "no_weights"
    empty.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", empty / "config.json")
    assert _partitioned(empty) is None  # no safetensors: from_pretrained decides (and refuses .bin)

    renamed = tmp_path / "renamed"
    shutil.copytree(tiny_llama_dir, renamed)
    from safetensors.torch import load_file, save_file

    weights = load_file(renamed / "model.safetensors")
    save_file({f"legacy.{k}": v for k, v in weights.items()}, renamed / "model.safetensors")
    assert _partitioned(renamed) is None  # keys transformers would have to convert: not guessed here


def test_read_tensor_reads_each_dtype_and_refuses_a_truncated_file(tmp_path):
    from safetensors.torch import save_file

    tensors = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "f32": torch.randn(7),
        "i64": torch.arange(4),
        "empty": torch.zeros(0, 3),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)
    index = zero3_load.safetensors_index(tmp_path)
    for name, expected in tensors.items():
        assert torch.equal(zero3_load.read_tensor(*index[name]), expected), name
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    header = json.loads(path.read_bytes()[8 : 8 + n])
    end = max(e["data_offsets"][1] for k, e in header.items() if k != "__metadata__")
    path.write_bytes(path.read_bytes()[: 8 + n + end - 4])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    with pytest.raises(OSError, match="truncated"):
        zero3_load.read_tensor(*index[last])
