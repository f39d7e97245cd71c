"""Saves checkpoints back to back until it is killed: the victim of the kill-during-save trials.

    python -m tests.reliability._save_worker MODEL_DIR CKPT_ROOT

World size 1 over gloo, a real DeepSpeed engine (ZeRO-1) on the tiny model, one optimizer step between saves so every
checkpoint differs. After each save returns it prints ``SAVED <step>`` (flushed): a checkpoint announced that way must
survive any later kill.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main(model_dir: str, ckpt_root: str) -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    from finetune import distributed as dist

    dist.init(timeout_s=60)
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
        config={"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1}, "steps_per_print": 10**9},
    )
    vocab = model.config.vocab_size
    print("READY", flush=True)
    step = 0
    while True:
        ids = torch.randint(0, vocab, (2, 16))
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        step += 1
        save_checkpoint(engine, Path(ckpt_root), step, {"k": step}, keep_last=2)
        print(f"SAVED {step}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
