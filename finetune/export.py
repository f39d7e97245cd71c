"""Turn training outputs into plain Hugging Face models (``dsft export``, also ``python -m finetune.export``).

    # LoRA/QLoRA adapter + its base -> one merged model that from_pretrained loads without PEFT
    dsft export merge --adapter runs/lora/final --out runs/lora/merged
    # a DeepSpeed ZeRO checkpoint (any stage, any world size) -> fp32 weights (full model or PEFT adapter)
    dsft export zero --checkpoint runs/full/checkpoints --out runs/full/step_weights
    # a checkpoint -> its DeepSpeed universal copy (step_XXXXXXXX.universal, loadable on any world size / ZeRO stage)
    dsft export universal --checkpoint runs/full/checkpoints --workers 4

``zero`` consolidates the per-rank fp32 optimizer partitions with DeepSpeed's ``zero_to_fp32`` (the master weights,
more precise than the 16-bit ``final/``), then writes them like ``final/``: a ``save_pretrained`` model for full
fine-tuning, an adapter folder for PEFT methods. The run's ``config.json`` (next to ``checkpoints/``) says which.

Every export stops where training taught the model to stop and keeps the chat template the data was rendered with:
``final/`` gets them from the engine, ``merge`` from the adapter folder (its ``generation_config.json`` and
tokenizer), ``zero`` from the run's ``serving.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch

from finetune.checkpoint import CheckpointError

SERVING_FILE = "serving.json"  # output_dir/serving.json: the chat template and stop token ids of the run's data


def read_serving(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's ``serving.json`` (written by the engine), or None for runs from before it existed."""
    path = Path(run_dir) / SERVING_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def set_stop_ids(generation_config, stop_ids: list[int] | None) -> None:
    """``generation_config.eos_token_id = stop_ids``: ``generate()`` stops on any of them. None leaves it alone
    (text data: the model's own eos)."""
    if stop_ids:
        generation_config.eos_token_id = list(stop_ids)


def save_for_serving(model, out_dir: str | Path, stop_ids: list[int] | None, peft: bool, state_dict=None) -> None:
    """``save_pretrained`` (safetensors) so that ``generate()`` stops on ``stop_ids``: a full model carries them in its
    own generation config, a PEFT adapter folder in a ``generation_config.json`` beside it."""
    if peft:
        model.save_pretrained(out_dir, safe_serialization=True)
        save_generation_config(model, out_dir, stop_ids)
    else:
        set_stop_ids(model.generation_config, stop_ids)
        model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)


def save_generation_config(model, out_dir: str | Path, stop_ids: list[int] | None) -> None:
    """Write ``model``'s generation config with ``stop_ids`` into ``out_dir``, for adapter folders:
    ``PeftModel.save_pretrained`` writes none, and a base model's own would stop on its eos only."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not stop_ids or getattr(base, "generation_config", None) is None:
        return
    config = copy.deepcopy(base.generation_config)
    set_stop_ids(config, stop_ids)
    config.save_pretrained(out_dir)


def merge_adapter(
    adapter_dir: str | Path, out_dir: str | Path, base: str | None = None, dtype: str = "float32"
) -> Path:
    """Merge a LoRA adapter into its base model and ``save_pretrained`` the result (safetensors) with the tokenizer.

    Args:
        adapter_dir: a PEFT adapter folder (``output_dir/final`` of a LoRA/QLoRA run).
        out_dir: where the merged model goes.
        base: base model id/path; default: ``base_model_name_or_path`` recorded in the adapter config.
        dtype: dtype of the merged weights (float32, bfloat16, float16). A QLoRA base is loaded unquantized.

    Returns:
        ``out_dir``.
    """
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    peft_cfg = PeftConfig.from_pretrained(adapter_dir)
    if peft_cfg.peft_type.value not in ("LORA",):
        raise ValueError(
            f"{adapter_dir}: a {peft_cfg.peft_type.value} adapter cannot be merged into the weights (only LoRA can); "
            "load it with PeftModel.from_pretrained instead"
        )
    base = base or peft_cfg.base_model_name_or_path
    # safetensors only, as training loads it: a pickled .bin base is refused, never unpickled
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype), use_safetensors=True)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    if (adapter_dir / "generation_config.json").exists():  # the stop ids of the training data (engine.save_final)
        set_stop_ids(merged.generation_config, GenerationConfig.from_pretrained(adapter_dir).eos_token_id)
    merged.save_pretrained(out_dir, safe_serialization=True)
    # the adapter folder's tokenizer carries the chat template the training data was rendered with
    tok_src = adapter_dir if (adapter_dir / "tokenizer_config.json").exists() else base
    AutoTokenizer.from_pretrained(tok_src).save_pretrained(out_dir)
    return out_dir


def consolidate_zero(checkpoint: str | Path, out_dir: str | Path, run_config: str | Path | None = None) -> Path:
    """Consolidate a ZeRO checkpoint to fp32 and save it as an HF model (full) or PEFT adapter (other methods).

    Args:
        checkpoint: a ``step_XXXXXXXX`` directory, or the ``checkpoints`` root (its newest complete checkpoint).
        out_dir: output directory.
        run_config: the run's ``config.json``; default: ``<checkpoint root>/../config.json``. The ``serving.json``
            beside it gives the chat template and the stop token ids.

    Returns:
        ``out_dir``.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from finetune.checkpoint import find_latest_checkpoint
    from finetune.config import load_config
    from finetune.methods import get_method
    from finetune.model import load_tokenizer

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    step_dir = checkpoint if (checkpoint / "manifest.json").exists() else find_latest_checkpoint(checkpoint)
    if step_dir is None:
        raise FileNotFoundError(f"{checkpoint}: no complete checkpoint (step_*/manifest.json) found")
    run_config = Path(run_config) if run_config else step_dir.parent.parent / "config.json"
    if not run_config.exists():
        raise FileNotFoundError(f"{run_config}: the run's config.json is needed to rebuild the model; pass --config")
    cfg = load_config(None, [], json.loads(run_config.read_text()))
    state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        cfg.model.name_or_path,
        dtype=torch.float32,
        trust_remote_code=cfg.model.trust_remote_code,
        use_safetensors=True,
    )
    if cfg.is_peft:
        cfg.model.gradient_checkpointing = False
        method = get_method(cfg.method.name)
        # a quantized method rebuilds its adapters on the unquantized base (QLoRA: export_as="lora")
        model = get_method(method.export_as or method.name).prepare(model, cfg)
    missing, unexpected = model.load_state_dict(state, strict=not cfg.is_peft)
    if unexpected:
        raise ValueError(f"{step_dir}: {len(unexpected)} checkpoint tensors fit no parameter, e.g. {unexpected[:3]}")
    serving = read_serving(run_config.parent) or {}
    tokenizer = load_tokenizer(cfg)
    if serving.get("chat_template"):
        tokenizer.chat_template = serving["chat_template"]
    save_for_serving(model, out_dir, serving.get("stop_token_ids"), peft=cfg.is_peft)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def convert_universal(checkpoint: str | Path, workers: int = 1) -> Path:
    """``dsft export universal``: the universal copy of ``checkpoint`` (a ``step_*`` dir, or the newest verified one
    under a checkpoints root), written atomically next to it (:func:`finetune.checkpoint.convert_to_universal`)."""
    from finetune.checkpoint import MANIFEST_NAME, convert_to_universal, find_latest_checkpoint

    checkpoint = Path(checkpoint)
    step_dir = checkpoint if (checkpoint / MANIFEST_NAME).exists() else find_latest_checkpoint(checkpoint)
    if step_dir is None:
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no complete checkpoint (step_*/manifest.json) there")
    if workers < 1:
        raise ValueError(f"--workers {workers}: expected >= 1")
    return convert_to_universal(step_dir, workers=workers)


def main(argv: list[str] | None = None) -> int:
    """``dsft-export merge|zero ...``."""
    parser = argparse.ArgumentParser(
        prog="dsft export",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[1],
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("merge", help="merge a LoRA adapter into its base model")
    m.add_argument("--adapter", required=True, help="adapter folder (output_dir/final)")
    m.add_argument("--out", required=True, help="output directory for the merged model")
    m.add_argument("--base", default=None, help="base model (default: the one recorded in the adapter)")
    m.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    z = sub.add_parser("zero", help="consolidate a ZeRO checkpoint to fp32 HF weights / adapter")
    z.add_argument("--checkpoint", required=True, help="step_XXXXXXXX directory or the checkpoints root")
    z.add_argument("--out", required=True, help="output directory")
    z.add_argument("--config", default=None, help="the run's config.json (default: next to checkpoints/)")
    u = sub.add_parser(
        "universal",
        help="convert a checkpoint to a DeepSpeed universal checkpoint next to it (a resume on another world size "
        "or ZeRO stage does this by itself, once)",
    )
    u.add_argument("--checkpoint", required=True, help="step_XXXXXXXX directory or the checkpoints root (newest)")
    u.add_argument("--workers", type=int, default=1, help="processes for ds_to_universal's extract and merge passes")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "merge":
            out = merge_adapter(args.adapter, args.out, args.base, args.dtype)
        elif args.cmd == "universal":
            out = convert_universal(args.checkpoint, args.workers)
        else:
            out = consolidate_zero(args.checkpoint, args.out, args.config)
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        print(f"dsft-export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
