"""``dsft train METHOD --config X.yaml [launcher flags] [--dry-run] [key=value ...]``: check, then launch the recipe.

Examples::

    dsft train lora --config finetune/configs/lora.yaml --num-gpus 8 model.name_or_path=Qwen/Qwen2.5-7B \\
        data.train=data/chat.jsonl output_dir=runs/lora
    dsft train full --config planned.yaml --hostfile hosts --master-addr 10.0.0.1      # a `dsft plan` YAML, as is
    dsft train sft --config finetune/configs/sft.yaml --num-gpus 2 --dry-run          # print the deepspeed command

METHOD sets ``method.name`` (``full``, ``lora``, ``qlora``, ``prefix``/``ptuning_v2``, ``prompt``/``prompt_tuning``);
``sft`` runs the chat/instruction recipe with the config's method. Before any rank starts, the config is loaded,
validated for the world size the launcher flags give, and checked against the files and the model's ``config.json``
(``finetune.preflight.check_before_launch``): a mistake is one ``config error: KEY ...`` line in seconds, exit 2.
Then the ``deepspeed`` command that ``python -m launch.run`` would build runs the recipe script with the same
arguments, so ``deepspeed finetune/lora.py --config ...`` typed by hand trains the same way.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from launch.run import LaunchError, add_launcher_arguments, build_command, run_or_show

FINETUNE_DIR = Path(__file__).resolve().parent.parent / "finetune"
SFT = "sft"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dsft train",
        description="Check a training config in seconds, then run its recipe under the deepspeed launcher.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument(
        "method", help=f"full, lora, qlora, prefix, prompt (or an alias: ptuning_v2, prompt_tuning), or {SFT}"
    )
    p.add_argument("--config", help="the training YAML (finetune/configs/*.yaml, or one written by dsft plan)")
    add_launcher_arguments(p)
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-4")
    return p


def recipe_for(method: str) -> tuple[str, list[str]]:
    """(recipe script path, leading overrides) for ``dsft train METHOD``: the registry names the method's recipe
    (``Method.recipe``); a registered method without one trains through ``sft.py``, which takes any method.

    Raises:
        LaunchError: an unknown method, with the known names.
    """
    if method == SFT:
        return str(FINETUNE_DIR / "sft.py"), []
    from finetune.methods import get_method

    try:
        m = get_method(method)
    except ValueError as e:
        raise LaunchError(f"METHOD {method!r}: {e}; or {SFT}") from None
    return str(FINETUNE_DIR / (m.recipe or "sft.py")), [f"method.name={m.name}"]


def world_size_of(cmd: Sequence[str]) -> int:
    """How many ranks the ``deepspeed`` command starts: hosts (from ``--hostfile``, cut by ``--num_nodes``) × slots
    (``--num_gpus`` when given), else this machine's GPUs (1 on a CPU box, where deepspeed starts one rank)."""
    args = list(cmd)

    def flag(name: str) -> str | None:
        return args[args.index(name) + 1] if name in args else None

    num_gpus = int(flag("--num_gpus")) if flag("--num_gpus") else None
    hostfile = flag("--hostfile")
    if hostfile:
        # deepspeed's own parser, so the count is what its launcher will start
        from deepspeed.launcher.runner import fetch_hostfile

        try:
            slots = list(fetch_hostfile(hostfile).values())
        except ValueError as e:
            raise LaunchError(f"--hostfile {hostfile}: {e}") from e
        if flag("--num_nodes"):
            slots = slots[: int(flag("--num_nodes"))]
        return sum(num_gpus if num_gpus else s for s in slots)
    if num_gpus:
        return num_gpus
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return max(1, len([d for d in visible.split(",") if d.strip()]))
    import torch

    return max(1, torch.cuda.device_count())


def main(argv: Sequence[str] | None = None) -> int:
    """``dsft train``: 0 after a successful run (or ``--dry-run``), 2 for a config or launcher error before launch,
    else the launcher's exit status."""
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    from finetune.config import ConfigError, load_config
    from finetune.preflight import check_before_launch

    try:
        script, leading = recipe_for(args.method)
        script_args = (["--config", args.config] if args.config else []) + leading + list(args.overrides)
        cmd = build_command(argparse.Namespace(**{**vars(args), "script": script, "script_args": script_args}))
        world = world_size_of(cmd)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, leading + list(args.overrides))
        cfg.validate(world)
        check_before_launch(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    return run_or_show(cmd, args.dry_run, f"dsft train: {world} rank(s)")


if __name__ == "__main__":
    sys.exit(main())
