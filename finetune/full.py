"""Full fine-tuning: every weight trains (ZeRO shards optimizer state, gradients and, at stage 3, the weights).

    deepspeed --num_gpus 2 finetune/full.py --config finetune/configs/full.yaml \
        model.name_or_path=DIR data.train=PREFIX output_dir=OUT train.max_steps=20

Continued pre-training on plain text or fine-tuning on any converted data; ``OUT/final`` is a complete
``save_pretrained`` model (ZeRO-3 weights gathered first) that ``AutoModelForCausalLM.from_pretrained`` loads.
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by the launcher: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.engine import main

if __name__ == "__main__":
    sys.exit(main(defaults={"method": {"name": "full"}}, methods=("full",)))
