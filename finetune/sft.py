"""Supervised fine-tuning on chat / instruction data: the loss counts only the assistant's tokens.

    deepspeed --num_gpus 2 finetune/sft.py --config finetune/configs/sft.yaml \
        model.name_or_path=DIR data.train=data/chat.jsonl output_dir=OUT train.max_steps=20

``data.train`` is a raw .jsonl (messages / sharegpt / alpaca, converted once through the chat template) or an mmap
prefix converted from one: its ``_loss_mask`` marks assistant tokens, the loader turns every other position into
label -100, so prompts are context, never targets. Any method works (``method.name=full|lora|qlora|prefix|prompt``;
full by default); the recipe refuses data without a loss mask, because training on it would also learn the prompts.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by the launcher: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.engine import main

if __name__ == "__main__":
    sys.exit(main(defaults={"method": {"name": "full"}}, require_loss_mask=True))
