"""``dsft eval``: loss and perplexity of a trained model on a dataset, and exact match on a prompts file.

The loss is the engine's own evaluation (``finetune.engine.evaluate``: the summed loss of the target tokens, i.e.
the loss-mask tokens of SFT data, over all rows, divided by their count), on rows built by the training loader with
the run's ``data.seq_len`` and packing. Raw ``.jsonl`` is converted as training converts it (``finetune.data
.resolve_data`` with the run's data settings, cached under the run's ``data_cache``). Exact match decodes with
``finetune.generation``, the code ``dsft chat --prompts`` uses, so both give the same answers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

from finetune.chat import add_model_arguments, decoding_from_args, load_from_args
from finetune.config import Config, ConfigError, load_config
from finetune.generation import Decoding, GenerationError, LoadedModel, exact_match, read_prompts

PROG = "dsft eval"
# PEFT type (adapter_config.json) -> method.name, for adapters evaluated without their run's config.json: prefix and
# prompt tuning need padded rows and no position ids (Config.packing, engine._forward_kwargs).
PEFT_METHODS = {"LORA": "lora", "PREFIX_TUNING": "prefix", "P_TUNING": "prefix", "PROMPT_TUNING": "prompt"}

EPILOG = """\
examples:
  # the demo's model on its held-out split: loss/perplexity (as the run's final eval) and exact match
  dsft eval demo_out/run --data demo_out/data/eval --prompts launch/demo_data/eval.jsonl --max-new-tokens 6

  # raw jsonl is converted the way the run's training converted it (cached in the run's data_cache/)
  dsft eval runs/lora --data data/heldout.jsonl --json

--data: an mmap prefix (P for P.bin/P.idx), a WebDataset index.json or a raw .jsonl/.json file.
--prompts: records whose reference is the last assistant turn of "messages", or "answer"/"completion".
"""


def build_parser() -> argparse.ArgumentParser:
    """``dsft eval`` arguments."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.splitlines()[0].split(": ", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    add_model_arguments(p)
    p.add_argument("--data", metavar="PATH", help="dataset for loss/perplexity (mmap prefix, index.json or .jsonl)")
    p.add_argument("--prompts", metavar="IN.jsonl", help="records with reference answers, for exact match")
    p.add_argument("--seq-len", type=int, default=None, help="row length for the loss (default: the run's seq_len)")
    p.add_argument("--answers", metavar="OUT.jsonl", help="write each prompt's answer and whether it matched")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object instead of a table")
    return p


def eval_config(loaded: LoadedModel, seq_len: int | None = None) -> tuple[Config, bool]:
    """The run's config (its ``config.json``) or, for a bare model / adapter, a default one for it; and whether it is
    the run's own. ``output_dir`` is the run dir where it is now (raw data is cached under it, as training does)."""
    run_config = loaded.run_dir / "config.json" if loaded.run_dir else None
    if run_config is not None and run_config.is_file():
        try:
            cfg = load_config(None, [], json.loads(run_config.read_text()))
        except (ValueError, OSError) as e:  # ConfigError is a ValueError; so is a JSONDecodeError
            raise GenerationError(f"{run_config}: cannot read the run's config: {e}") from e
        cfg.output_dir = str(loaded.run_dir)
        own = True
    else:
        cfg, own = Config(), False
        cfg.model.name_or_path = str(loaded.base_dir or loaded.model_dir)
        if loaded.adapter_dir is not None:
            peft_type = json.loads((loaded.adapter_dir / "adapter_config.json").read_text()).get("peft_type", "")
            cfg.method.name = PEFT_METHODS.get(str(peft_type).upper(), "lora")
        positions = getattr(loaded.model.config, "max_position_embeddings", None) or getattr(
            loaded.model.config, "n_positions", None
        )
        cfg.data.seq_len = min(cfg.data.seq_len, positions or cfg.data.seq_len)
    if seq_len is not None:
        cfg.data.seq_len = seq_len
    return cfg, own


def eval_loss(loaded: LoadedModel, data: str, cfg: Config, batch_size: int) -> dict[str, Any]:
    """Mean target-token loss and perplexity of ``loaded`` on ``data``, computed by the engine's ``evaluate``.

    Args:
        loaded: from ``load_for_generation``.
        data: an mmap prefix, a WebDataset ``index.json`` or a raw ``.jsonl``/``.json`` (converted as training does).
        cfg: from :func:`eval_config`: seq_len, packing, data options and the method (prefix/prompt rows).
        batch_size: rows per forward pass.

    Returns:
        ``{"loss", "ppl", "tokens", "source"}`` (``source``: what the loader read, e.g. the converted cache prefix).

    Raises:
        ConfigError: the data is missing, cannot be converted, or was converted with another tokenizer.
    """
    from data_tools.loader import build_dataloader
    from finetune.data import check_sources, resolve_data
    from finetune.engine import evaluate

    tok = loaded.tokenizer
    with tempfile.TemporaryDirectory(prefix="dsft_eval_") as tmp:
        if not cfg.output_dir and not cfg.data.cache_dir:  # no run dir: a conversion lives as long as this command
            cfg.data.cache_dir = tmp
        # the converter's progress lines go to stderr: stdout is the table or the --json object alone
        with contextlib.redirect_stdout(sys.stderr):
            source = resolve_data(data, cfg, tok, "--data")
            check_sources([source], tok, loaded.model.config.vocab_size)
        loader = build_dataloader(
            source,
            seq_len=cfg.data.seq_len,
            micro_batch_size=batch_size,
            seed=cfg.train.seed,
            packing=cfg.packing,
            # a block-diagonal (B, 1, T, T) mask works with every kernel from_pretrained picks (sdpa, eager): packed
            # rows give the same per-token loss as training's varlen kernels, up to float rounding
            attention="mask",
            shuffle=False,
            drop_last=False,  # every sample's targets count once: the exact evaluation the engine runs
            pad_id=tok.pad_token_id,
        )
        try:
            result = evaluate(loaded.model, loader, cfg)
        finally:
            loaded.model.eval()  # evaluate() puts its "engine" back in train mode; generation needs eval mode
    if not result["tokens"]:
        raise ConfigError(f"--data {data}: no token carries loss (is every label masked?)")
    return {**result, "source": source}


def format_table(results: dict[str, Any]) -> str:
    """The small human table ``dsft eval`` prints."""
    rows = [f"{PROG}: {results['model']}"]
    if "loss" in results:
        rows.append(f"  {'loss':<12} {results['loss']:<10.4f} {results['data']} ({results['tokens']:,} target tokens)")
        rows.append(f"  {'perplexity':<12} {results['perplexity']:<10.4f}")
    if "exact_match" in results:
        em, n = results["exact_match"], results["n_prompts"]
        rows.append(f"  {'exact match':<12} {em:<10.1%} {results['prompts']} ({round(em * n)} of {n})")
    return "\n".join(row.rstrip() for row in rows)


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Load the model once, then the loss on ``--data`` and exact match on ``--prompts``."""
    decoding: Decoding = decoding_from_args(args)
    records = read_prompts(args.prompts, args.system, need_reference=True) if args.prompts else None
    if args.data and not (Path(args.data).exists() or Path(f"{args.data}.idx").exists()):
        # before the model loads (minutes for a big one); resolve_data checks the rest of the path
        raise GenerationError(f"--data: {args.data} does not exist (an mmap prefix P needs P.bin and P.idx)")
    loaded = load_from_args(args, tag="eval")
    results: dict[str, Any] = {"model": str(loaded.adapter_dir or loaded.model_dir)}
    if args.data:
        cfg, own = eval_config(loaded, args.seq_len)
        if not own:
            print(
                f"[eval] no run config.json beside {loaded.model_dir}: rows of data.seq_len={cfg.data.seq_len}, "
                f"packing={cfg.packing}",
                file=sys.stderr,
            )
        ev = eval_loss(loaded, args.data, cfg, args.batch_size)
        results.update(
            data=args.data,
            loss=ev["loss"],
            perplexity=math.exp(min(ev["loss"], 50.0)),
            tokens=ev["tokens"],
            seq_len=cfg.data.seq_len,
            packing=cfg.packing,
        )
    if records is not None:
        accuracy, rows = exact_match(loaded, records, decoding)
        results.update(prompts=args.prompts, exact_match=accuracy, n_prompts=len(rows))
        results["decoding"] = {"max_new_tokens": decoding.max_new_tokens, "temperature": decoding.temperature}
        if args.answers:
            Path(args.answers).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return results


def main(argv: list[str] | None = None) -> int:
    """``dsft eval``: 0 ok, 2 bad input (a one-line ``error:`` naming the path)."""
    args = build_parser().parse_args(argv)
    try:
        if not (args.data or args.prompts):
            raise GenerationError(
                "nothing to evaluate: give --data PATH (loss) and/or --prompts IN.jsonl (exact match)"
            )
        results = run_eval(args)
    except (GenerationError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(results, indent=2) if args.json else format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
