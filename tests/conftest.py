"""Shared fixtures: a tiny BPE tokenizer and tiny Llama / GPT-2 models, saved and loaded through from_pretrained.

Built once per test session in a temp dir; nothing is downloaded.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """Directory with a ChatML byte-level BPE tokenizer (vocab 512, eos <|im_end|>, pad <pad>)."""
    from finetune.tiny import train_tokenizer

    out = tmp_path_factory.mktemp("tiny_tokenizer")
    train_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A 2-layer random Llama (hidden 64) + tokenizer, saved with save_pretrained."""
    from finetune.tiny import build_model

    return build_model(tmp_path_factory.mktemp("tiny_llama"), tiny_tokenizer_dir, arch="llama")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tiny_tokenizer_dir):
    """A 2-layer random GPT-2 (hidden 64) + tokenizer, saved with save_pretrained."""
    from finetune.tiny import build_model

    return build_model(tmp_path_factory.mktemp("tiny_gpt2"), tiny_tokenizer_dir, arch="gpt2")


@pytest.fixture(scope="module")
def dist_env():
    """torch.distributed with world size 1 over gloo, as deepspeed.initialize expects (for in-process engines)."""
    import deepspeed
    import torch

    from launch.process import free_port

    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    old = {k: os.environ.get(k) for k in [*env, "MASTER_PORT"]}
    os.environ.update(env, MASTER_PORT=str(free_port()))
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo")
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session", autouse=True)
def _destroy_process_group_at_exit():
    """Some fixtures build in-process DeepSpeed engines (a gloo world of one); tear the group down before pytest
    exits, since gloo can abort a process that exits with a live group (pytorch/pytorch#190489)."""
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
