"""``dsft chat``: talk to a fine-tuned model with the chat template and stop tokens it was trained with.

Interactive mode streams each answer as it is generated and keeps the conversation; ``/reset`` starts over,
``/exit`` (or Ctrl-D) quits. Batch mode (``--prompts``) answers a jsonl file, one output line per input record, in
order. Loading, templates, stop tokens and decoding are ``finetune.generation``'s, shared with ``dsft eval`` and the
demo, so a batch-mode answer is the one ``dsft eval`` scores.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

from finetune.generation import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_NEW_TOKENS,
    DEVICE_CHOICES,
    DTYPE_CHOICES,
    Decoding,
    GenerationError,
    LoadedModel,
    generate_answers,
    generate_ids,
    load_for_generation,
    read_prompts,
)

PROG = "dsft chat"
COMMANDS = {"/reset": "forget the conversation (the --system turn stays)", "/exit": "quit (also Ctrl-D)"}

EPILOG = """\
examples:
  # talk to the demo's model (a run dir: its final/ is loaded)
  dsft chat demo_out/run

  # a LoRA run's adapter folder (the base comes from its adapter_config.json), or an adapter on another base
  dsft chat runs/lora/final
  dsft chat path/to/base_model --adapter runs/lora/final

  # batch mode: one answer per line, in order; a trailing assistant turn (or "answer"/"completion") is the reference
  dsft chat demo_out/run --prompts launch/demo_data/eval.jsonl --out answers.jsonl --max-new-tokens 8

prompts file lines: {"messages": [{"role": "user", "content": "..."}], "id": ...} or {"prompt": "...", "answer": "..."}
output lines: {"line": N, "id": ..., "answer": "...", "reference": "...", "exact_match": true}

Decoding is greedy by default (temperature 0): reproducible, and what `dsft eval` scores. Pass --temperature 0.7
--top-p 0.9 for varied replies (--seed makes them repeatable).
"""


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The model, device and decoding options ``dsft chat`` and ``dsft eval`` share."""
    p.add_argument("model", metavar="RUN_DIR|MODEL_DIR", help="a run's output_dir, its final/, a model or adapter")
    p.add_argument("--adapter", metavar="DIR", help="a PEFT adapter folder (or PEFT run dir) to apply onto MODEL_DIR")
    p.add_argument(
        "--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="per answer (default %(default)s)"
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling (default 1.0)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (the default; refuses --temperature > 0)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="prompts per generate call (batch mode)")
    p.add_argument("--system", default=None, help="a system turn put before every conversation that has none")
    p.add_argument("--seed", type=int, default=0, help="seed for sampling (default 0)")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES, help="auto = cuda if available, else cpu")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="auto = float32 on cpu, bf16/fp16 on cuda")


def decoding_from_args(args: argparse.Namespace) -> Decoding:
    """The :class:`Decoding` of the shared options.

    Raises:
        GenerationError: contradictory or out-of-range values.
    """
    if args.greedy and args.temperature > 0:
        raise GenerationError(f"--greedy with --temperature {args.temperature}: pick one (temperature 0 is greedy)")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise GenerationError("--temperature must be >= 0 and --top-p in (0, 1]")
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise GenerationError("--max-new-tokens and --batch-size must be >= 1")
    return Decoding(args.max_new_tokens, args.temperature, args.top_p, args.batch_size)


def load_from_args(args: argparse.Namespace, tag: str = "chat") -> LoadedModel:
    """Load the model of the shared options, seed sampling, say on stderr (lines start ``[tag]``) what was loaded
    and which template and stop tokens are used."""
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file loading bars would bury the one line that says what was loaded
    set_seed(args.seed)
    loaded = load_for_generation(args.model, args.adapter, args.device, args.dtype)
    for line in loaded.describe().splitlines():
        print(f"[{tag}] {line}", file=sys.stderr, flush=True)
    return loaded


def build_parser() -> argparse.ArgumentParser:
    """``dsft chat`` arguments."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.splitlines()[0].split(": ", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    add_model_arguments(p)
    p.add_argument("--prompts", metavar="IN.jsonl", help="batch mode: answer every record of this file")
    p.add_argument("--out", metavar="OUT.jsonl", help="batch mode output (default: stdout)")
    return p


def make_streamer(loaded: LoadedModel):
    """A ``TextStreamer`` that prints new text as it is generated, without the prompt and without stop tokens (a stop
    id that is not a special token would otherwise be printed)."""
    import torch
    from transformers import TextStreamer

    stops = torch.tensor(loaded.stop_ids)

    class StopFilteringStreamer(TextStreamer):
        def put(self, value):
            if self.skip_prompt and self.next_tokens_are_prompt:
                return super().put(value)
            value = value.reshape(-1).cpu()
            value = value[~torch.isin(value, stops)]
            if value.numel():
                super().put(value)

    return StopFilteringStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)


def interactive(loaded: LoadedModel, decoding: Decoding, system: str | None) -> int:
    """Read a message, stream the answer, repeat; the conversation is kept until ``/reset``."""
    if importlib.util.find_spec("readline"):  # line editing and history for input(); absent on some platforms
        import readline  # noqa: F401
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    shown = ", ".join(f"{c} {what}" for c, what in COMMANDS.items())
    print(f"[chat] type a message and press Enter; {shown}", file=sys.stderr, flush=True)
    streamer = make_streamer(loaded)
    while True:
        try:
            text = input(">>> ").strip()
        except EOFError:
            print(flush=True)
            return 0
        if not text:
            continue
        if text == "/exit":
            return 0
        if text == "/reset":
            history = list(start)
            print("(conversation cleared)", flush=True)
            continue
        if text.startswith("/") and " " not in text:  # a typo'd command is not sent to the model as a question
            print(f"(unknown command {text}; commands: {', '.join(COMMANDS)})", flush=True)
            continue
        history.append({"role": "user", "content": text})
        try:
            ids = generate_ids(loaded, [history], decoding, streamer=streamer)[0]
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the session
            history.pop()
            print("\n(interrupted; the question was dropped)", flush=True)
            continue
        history.append({"role": "assistant", "content": loaded.tokenizer.decode(ids, skip_special_tokens=True)})


def batch(loaded: LoadedModel, decoding: Decoding, prompts: str, out: str | None, system: str | None) -> int:
    """Answer every record of ``prompts`` (checked before the model generates anything); write one line each."""
    records = read_prompts(prompts, system)
    t0 = time.time()

    def progress(done: int, total: int) -> None:
        print(f"[chat] {done}/{total} answered ({time.time() - t0:.1f} s)", file=sys.stderr, flush=True)

    answers = generate_answers(loaded, [r.messages for r in records], decoding, progress=progress)
    rows = []
    for r, answer in zip(records, answers, strict=True):
        row = {"line": r.line, **({"id": r.id} if r.id is not None else {}), "answer": answer}
        if r.reference is not None:
            row.update(reference=r.reference, exact_match=answer.strip() == r.reference.strip())
        rows.append(row)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    scored = [row["exact_match"] for row in rows if "exact_match" in row]
    summary = f"[chat] {len(rows)} answers -> {out or 'stdout'}"
    if scored:
        summary += f"; exact match {sum(scored) / len(scored):.1%} on the {len(scored)} records with a reference"
    print(summary, file=sys.stderr, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``dsft chat``: 0 ok, 2 bad input (a one-line ``error:`` naming the path and line)."""
    args = build_parser().parse_args(argv)
    try:
        if args.out and not args.prompts:
            raise GenerationError("--out needs --prompts IN.jsonl (batch mode)")
        decoding = decoding_from_args(args)
        if args.prompts:
            read_prompts(args.prompts, args.system)  # a bad line fails before minutes of model loading
        loaded = load_from_args(args)
        if args.prompts:
            return batch(loaded, decoding, args.prompts, args.out, args.system)
        return interactive(loaded, decoding, args.system)
    except GenerationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
