"""Recipe script for the test-defined ``head`` method: register it (the one call), then the shared engine.

deepspeed --num_gpus 2 tests/recipes/head_method_script.py --config finetune/configs/full.yaml method.name=head ...
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by the launcher: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from finetune.engine import main
from finetune.methods import register
from tests.recipes.head_method import HEAD

if __name__ == "__main__":
    register(HEAD)
    sys.exit(main(defaults={"method": {"name": "head"}}, methods=("lm_head",)))
