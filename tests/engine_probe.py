"""Run ``finetune.engine.run`` in the test process up to the model load, to see what the engine has set up by then:
the arguments of its ``from_pretrained`` calls and process-wide settings such as TF32.

Cheap (a few seconds, no DeepSpeed engine, no step) and the real code path: config, process group, precision,
tokenizer, model config, attention choice, data, DeepSpeed config, then ``load_model``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

# Every from_pretrained of the engine that may run a repo's code: the tokenizer and the model config in engine.run,
# the model in finetune.model.load_model.
LOADERS = ("AutoTokenizer", "AutoConfig", "AutoModelForCausalLM")


class ModelLoadReached(Exception):
    """Raised by the model spy: the test needs the engine up to the model load, not DeepSpeed or a training step."""


def world_of_one_env(monkeypatch) -> None:
    """The environment of a one-rank job, set through ``monkeypatch`` so that it is undone after the test: the
    variables ``dist.init`` would set for a plain ``python`` run, and the NCCL ones ``engine.run`` adds."""
    from finetune.watchdog import nccl_env_defaults
    from tests.reliability._harness import free_port

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    for key, value in nccl_env_defaults(os.environ).items():
        monkeypatch.setenv(key, value)


def run_until_model_load(
    monkeypatch, tmp_path: Path, model_dir, *overrides: str, on_model_load: Callable[[], None] | None = None
) -> list[tuple[str, str, object]]:
    """``engine.run`` of a full fine-tune on 8 tiny samples in this process (a world of one: gloo on CPU, NCCL on a
    GPU), stopped when it calls ``AutoModelForCausalLM.from_pretrained``.

    Args:
        monkeypatch: pytest's; the spies and the environment the engine sets are undone with it.
        tmp_path: for the data and the output directory.
        model_dir: the base model.
        overrides: more ``key=value`` config overrides.
        on_model_load: called at the model load, before the spy stops the run.

    Returns:
        ``(loader, path, trust_remote_code)`` of each from_pretrained call of :data:`LOADERS`, in order
        (``"not passed"`` where the keyword is missing).
    """
    import transformers

    from finetune import engine
    from finetune.config import load_config
    from tests.recipes.conftest import write_counting_data

    calls = []

    def spy(name):
        real = getattr(transformers, name).from_pretrained  # a bound classmethod

        def from_pretrained(path, *args, **kwargs):
            calls.append((name, str(path), kwargs.get("trust_remote_code", "not passed")))
            if name == "AutoModelForCausalLM":
                if on_model_load is not None:
                    on_model_load()
                raise ModelLoadReached
            return real(path, *args, **kwargs)

        return from_pretrained

    for name in LOADERS:
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", spy(name))
    world_of_one_env(monkeypatch)
    cfg = load_config(
        overrides=[
            f"model.name_or_path={model_dir}",
            f"data.train={write_counting_data(tmp_path / 'train', 8, 0)}",
            "data.seq_len=64",
            f"output_dir={tmp_path / 'out'}",
            "method.name=full",
            "train.micro_batch_size=1",
            "train.grad_accum=1",
            "train.global_batch=null",
            *overrides,
        ]
    )
    try:
        engine.run(cfg)
    except ModelLoadReached:
        return calls
    raise AssertionError(f"engine.run returned without loading the model; from_pretrained calls: {calls}")
