"""The peer of the training benchmark: ``transformers.Trainer`` with its ``deepspeed=`` config, set up the way most
users run SFT today (pad every batch to its longest sample with ``DataCollatorForSeq2Seq``, no packing).

Launched by ``benchmarks/train_throughput.py`` as::

    deepspeed --num_gpus N benchmarks/peer_hf_trainer.py --model DIR --data DIR --ds-config ds.json \\
        --micro-batch 16 --steps 30 --precision bf16 --method full --out peer.json

It measures itself: a ``TrainerCallback`` stamps the wall clock at every ``on_step_end`` (after a CUDA sync) and reads
``state.num_input_tokens_seen``, which the Trainer counts from the ``attention_mask`` of every batch, summed over all
ranks (``include_num_input_tokens_seen="non_padding"``), so padding is never counted as work. Rank 0 writes the
per-step records, the peak memory of the busiest rank and the parameter counts to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

# The data arrives as token ids; tokenizer worker threads would only fight the trainer for the 2 CPU cores of CI.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import TrainerCallback


def build_parser() -> argparse.ArgumentParser:
    """Command-line arguments of the peer run (kept in one function so the unit tests can parse without training)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local model directory (from_pretrained), tokenizer included")
    p.add_argument("--data", required=True, help="a datasets.Dataset saved with save_to_disk (input_ids, labels)")
    p.add_argument("--ds-config", required=True, help="DeepSpeed JSON (may use HF 'auto' values)")
    p.add_argument("--out", required=True, help="JSON file rank 0 writes the measurements to")
    p.add_argument("--micro-batch", type=int, required=True, help="per_device_train_batch_size (samples)")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps (max_steps)")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient_accumulation_steps")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), required=True)
    p.add_argument("--method", choices=("full", "lora"), default="full")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--adam-betas", type=float, nargs=2, default=(0.9, 0.95))
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--attn-implementation", default="sdpa", help="what a typical user gets by default: sdpa")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help="set by the deepspeed launcher")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the arguments; errors name the flag and what to do."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("micro_batch", "steps", "grad_accum"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')}={getattr(args, flag)} must be >= 1")
    if args.precision == "fp16" and not torch.cuda.is_available():
        parser.error("--precision fp16 needs a CUDA GPU (DeepSpeed's fp16 optimizer raises on CPU); use bf16 or fp32")
    if not Path(args.ds_config).is_file():
        parser.error(f"--ds-config {args.ds_config}: no such file")
    return args


def peak_memory_bytes() -> int:
    """Peak memory of this process: CUDA ``max_memory_allocated`` on a GPU, peak RSS (``ru_maxrss``) on CPU."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    # Linux reports ru_maxrss in KiB (macOS in bytes; this benchmark runs on Linux).
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class StepTimer(TrainerCallback):
    """Wall clock and real-token count at the end of every optimizer step.

    The interval between two ``on_step_end`` calls covers everything a step costs (data loading, collation,
    forward, backward, optimizer), like dsft's per-step timing. A CUDA sync first, so the clock sees finished work.
    """

    def __init__(self):
        self.records: list[dict] = []
        self._last: float | None = None
        self._last_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        _sync()
        self._last, self._last_tokens = time.perf_counter(), int(state.num_input_tokens_seen)

    def on_step_end(self, args, state, control, **kwargs):
        _sync()
        now, tokens = time.perf_counter(), int(state.num_input_tokens_seen)
        self.records.append(
            {"step": int(state.global_step), "time_s": now - self._last, "tokens": tokens - self._last_tokens}
        )
        self._last, self._last_tokens = now, tokens


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _max_over_ranks(value: int) -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import deepspeed
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    # Before TrainingArguments: on CPU ranks (use_cpu) the Trainer creates the process group only at train time, but
    # ZeRO-3's zero.Init inside from_pretrained already needs the world size (else "train_batch_size 8 != 4 * 1 * 1").
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    if not torch.cuda.is_available():  # housekeeping only, not timed: do not leave 66 MB per rank in /dev/shm
        from finetune import ops

        ops.unlink_shm_allreduce_buffer()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.precision]
    # TrainingArguments first: with deepspeed= it registers the ZeRO config that from_pretrained consults.
    targs = TrainingArguments(
        output_dir=str(Path(args.out).with_suffix("")) + "_trainer",
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.steps,
        learning_rate=args.lr,
        adam_beta1=args.adam_betas[0],
        adam_beta2=args.adam_betas[1],
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        bf16=args.precision == "bf16",
        fp16=args.precision == "fp16",
        deepspeed=args.ds_config,
        activation_checkpointing=args.gradient_checkpointing,
        include_num_input_tokens_seen="non_padding",
        logging_steps=max(1, args.steps),
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        dataloader_num_workers=0,
        remove_unused_columns=True,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation=args.attn_implementation)
    if args.method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                task_type=TaskType.CAUSAL_LM,
                r=args.lora_r,
                lora_alpha=args.lora_alpha,
                lora_dropout=args.lora_dropout,
                target_modules="all-linear",
                bias="none",
            ),
        )
    dataset = load_from_disk(args.data)
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    timer = StepTimer()
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[timer],
    )
    trainer.train()
    peak = _max_over_ranks(peak_memory_bytes())
    if trainer.is_world_process_zero():
        # ZeRO-3 leaves empty tensors behind; ds_numel is the real size.
        trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
        result = {
            "tool": "hf_trainer",
            "world_size": int(targs.world_size),
            "micro_batch": args.micro_batch,
            "precision": args.precision,
            "method": args.method,
            "peak_memory_bytes": peak,
            "peak_memory_kind": "cuda_max_allocated" if torch.cuda.is_available() else "rss",
            "trainable_params": trainable,
            "records": timer.records,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    # Not part of the timed loop: without it gloo can abort the process at exit ("terminate called without an
    # active exception", pytorch/pytorch#190489), which the launcher reports as a failed run.
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
