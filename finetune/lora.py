"""LoRA / QLoRA fine-tuning: freeze the base, train low-rank adapters; output an adapter folder.

    deepspeed --num_gpus 2 finetune/lora.py --config finetune/configs/lora.yaml \
        model.name_or_path=DIR data.train=PREFIX output_dir=OUT train.max_steps=20

QLoRA is the same recipe with ``method.name=qlora`` (4-bit NF4 base, ``method.qlora.bits=8`` for LLM.int8).
The adapter in ``OUT/final`` loads with ``PeftModel.from_pretrained``; ``python -m finetune.export`` merges it.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by the launcher: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.engine import main

if __name__ == "__main__":
    sys.exit(main(defaults={"method": {"name": "lora"}}, methods=("lora", "qlora")))
