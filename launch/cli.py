"""``dsft``: one front door over the toolkit's modules. Each subcommand is a module's ``main(argv)``.

    dsft convert --input data/chat.jsonl --output-prefix data/chat --tokenizer MODEL     # jsonl -> mmap
    dsft plan --config finetune/configs/lora.yaml --gpus-per-node 8 --gpu-mem-gib 80 --out planned.yaml
    dsft doctor --config planned.yaml                                                  # will it learn?
    dsft train lora --config planned.yaml --num-gpus 8                                 # check, then launch
    dsft doctor runs/lora                                                              # what happened?
    dsft chat runs/lora                                                                # talk to the result
    dsft eval runs/lora --data data/eval.jsonl --prompts data/eval_prompts.jsonl
    dsft export merge --adapter runs/lora/final --out runs/lora/merged

``dsft CMD --help`` shows each one's options and a runnable example. The modules stay usable on their own
(``python -m data_tools.convert``, ``deepspeed finetune/lora.py --config ...``).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module with main(argv), one line for `dsft --help`). Imported only when run: `dsft --help` and a
# config error from `dsft train` stay fast (no torch import before it is needed).
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("data_tools.convert", "jsonl/json -> Megatron mmap .bin/.idx (+ loss mask) or WebDataset shards"),
    "plan": ("ds_configs.plan", "pick ZeRO stage, offload and batch sizes for your GPUs; write a training YAML"),
    "train": ("launch.train", "check a config in seconds, then run its recipe under the deepspeed launcher"),
    "export": ("finetune.export", "merge a LoRA adapter into its base, or consolidate a ZeRO checkpoint"),
    "chat": ("finetune.chat", "talk to a trained model (interactive, streamed) or answer a prompts file"),
    "eval": ("finetune.evaluate", "loss / perplexity on a dataset and exact match on a prompts file"),
    "doctor": ("finetune.doctor", "before training: will this config learn? after: what went wrong, and the fix"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: dsft COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items()]
    lines += ["", "examples:", *(line for line in __doc__.split("\n\n")[1].splitlines())]
    lines += ["", "dsft COMMAND --help shows its options and a runnable example."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``dsft COMMAND ARGS`` to ``COMMANDS[COMMAND]``'s ``main(ARGS)``; returns its exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"dsft: unknown command {name!r}{hint}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    code = module.main(rest)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
