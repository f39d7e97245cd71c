"""Prompt tuning: a trainable soft prompt before the input embeddings, base frozen; output an adapter folder.

    deepspeed --num_gpus 2 finetune/prompt_tuning.py --config finetune/configs/prompt_tuning.yaml \
        model.name_or_path=DIR data.train=PREFIX output_dir=OUT train.max_steps=20

Rows are padded, not packed (``data.packing=auto`` picks padding): PEFT prepends the virtual tokens and widens a
2-D attention mask, which a packed row's block-diagonal 4-D mask cannot take. Only a few thousand parameters
train, so the learning rate is ~100x that of full fine-tuning. ``OUT/final`` loads with ``PeftModel.from_pretrained``.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by the launcher: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.engine import main

if __name__ == "__main__":
    sys.exit(main(defaults={"method": {"name": "prompt"}}, methods=("prompt",)))
