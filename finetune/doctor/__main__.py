"""``python -m finetune.doctor``: the same as ``dsft doctor``."""

import sys

from finetune.doctor.cli import main

sys.exit(main())
