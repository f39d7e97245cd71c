"""The ``dsft doctor`` command line: ``--config X.yaml [key=value ...]`` (before training) or ``RUN_DIR`` (after)."""

from __future__ import annotations

import argparse
import os
import sys

from finetune.doctor.after import diagnose_run
from finetune.doctor.before import check_config
from finetune.doctor.model_checks import OVERFIT_STEPS
from finetune.doctor.report import EXIT_USAGE, print_report


def build_parser() -> argparse.ArgumentParser:
    """``dsft doctor`` arguments (the description is the first paragraph of the package docstring)."""
    from finetune import doctor

    p = argparse.ArgumentParser(
        prog="dsft doctor",
        description=doctor.__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  dsft doctor --config finetune/configs/demo.yaml model.name_or_path=demo_out/base_model \\\n"
            "      data.train=demo_out/data/train output_dir=/tmp/doctor_demo\n"
            "  dsft doctor --config finetune/configs/lora.yaml train.lr=1e-4 --json\n"
            "  dsft doctor demo_out/run            # after training: what happened, and the fix\n\n"
            "exit status: 0 no FAIL finding, 1 at least one FAIL, 2 bad invocation"
        ),
    )
    p.add_argument("--config", help="training YAML (before training); a run's config.json works too")
    p.add_argument(
        "args",
        nargs="*",
        metavar="RUN_DIR | key=value",
        help="a run directory (after training), or key=value overrides for --config",
    )
    p.add_argument("--world-size", type=int, default=1, help="ranks the run will use (for the batch plan; default 1)")
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the model checks run (auto: the local GPU if any)",
    )
    p.add_argument(
        "--overfit-steps",
        type=int,
        default=OVERFIT_STEPS,
        help=f"steps of the overfit-one-batch test (default {OVERFIT_STEPS}; 0 skips it)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    return p


def main(argv: list[str] | None = None) -> int:
    """``dsft doctor``: returns 0 (no FAIL), 1 (a FAIL finding) or 2 (bad invocation)."""
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from finetune.config import ConfigError, load_config

    try:
        if args.config:
            bad = [a for a in args.args if "=" not in a]
            if bad:
                raise ConfigError(
                    f"{bad[0]!r}: with --config, give key=value overrides only (a run directory goes without --config)"
                )
            if args.device == "cuda":
                import torch

                if not torch.cuda.is_available():
                    raise ConfigError("--device cuda: no CUDA GPU here; use --device cpu")
            _quiet_libraries()
            cfg = load_config(args.config, args.args)
            report = check_config(cfg, world_size=args.world_size, device=args.device, overfit_steps=args.overfit_steps)
        else:
            if len(args.args) != 1 or "=" in args.args[0]:
                raise ConfigError("give --config X.yaml [key=value ...] (before training) or one RUN_DIR (after)")
            try:
                report = diagnose_run(args.args[0])
            except (FileNotFoundError, ValueError) as e:  # no such directory, a metrics line that is not JSON
                print(f"error: {e}", file=sys.stderr)
                return EXIT_USAGE
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print_report(report, as_json=args.json)
    return report.exit_code


def _quiet_libraries() -> None:
    """Progress bars of every weight load would bury the findings."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
