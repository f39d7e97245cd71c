"""The one training loop behind every recipe: setup, train, evaluate, checkpoint, save.

    cfg = load_config("finetune/configs/lora.yaml", sys.argv[1:])
    summary = engine.run(cfg)

Read top to bottom: ``run`` sets up (process group, precision, data, model, DeepSpeed), resumes, loops over
optimizer steps (``_train_step``), evaluates (``evaluate``), checkpoints (``finetune.checkpoint``) and writes
``output_dir/final`` (``save_final``). Each optimizer step consumes ``grad_accum`` micro-batches per rank.

Loss normalization: every micro-batch's loss is its summed token loss divided by (target tokens of the whole
global batch) / (world_size x grad_accum), so after DeepSpeed's 1/grad_accum scaling and its mean over ranks the
gradient is exactly that of the mean loss over all target tokens of the step. The curve is then independent of how
rows are split over ranks and micro-batches (1 rank x 4 accumulation == 2 ranks x 2), and rows with more target
tokens weigh more, as they would in one big batch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch

from data_tools.indexed import has_loss_mask, loss_mask_prefix
from finetune import distributed as dist
from finetune import ops
from finetune.checkpoint import (
    CheckpointError,
    check_resume_settings,
    find_resume_checkpoint,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from finetune.config import Config, ConfigError, to_dict
from finetune.data import check_sources, report_lengths, resolve_data, serving_settings, source_meta, source_paths
from finetune.export import SERVING_FILE, save_for_serving
from finetune.methods import get_method
from finetune.metrics import MetricsLogger, flops_per_token, matmul_params, memory_stats, mfu, peak_flops_per_gpu
from finetune.tiled_loss import install as install_tiled_loss
from finetune.tiled_loss import summed_loss

logger = logging.getLogger(__name__)

EXIT_BAD_STEPS = 3  # exit code when training aborts after train.max_bad_steps non-finite steps in a row
EXIT_SAVE_FAILED = 4  # exit code when a checkpoint save fails with train.on_save_error=stop


class TrainingAborted(RuntimeError):
    """Training stopped with a diagnosis (non-finite losses, empty data ...)."""


def lr_factor(step: int, total: int, warmup: int, kind: str, min_ratio: float) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based): linear warmup, then cosine/linear/constant."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * shape


def run(cfg: Config, require_loss_mask: bool = False) -> dict:
    """Train according to ``cfg`` on every rank of the launcher; returns a summary (main rank: also summary.json).

    Args:
        cfg: the validated config.
        require_loss_mask: SFT: refuse mmap data without a ``_loss_mask`` (the loss would count prompt tokens).
    """
    import deepspeed

    from data_tools.loader import build_dataloader
    from ds_configs import make_ds_config, resolve_precision
    from finetune.attention import resolve_attention
    from finetune.model import load_model, load_tokenizer, param_groups
    from finetune.watchdog import apply_nccl_env_defaults

    apply_nccl_env_defaults()  # before NCCL reads them: a dead peer's error must reach Python (watchdog.py)
    dist.init(cfg.train.collective_timeout_s)
    plan = cfg.validate(dist.world_size())
    cuda = torch.cuda.is_available()
    precision = resolve_precision(cfg.precision, torch.cuda.get_device_capability() if cuda else None)
    if cuda:  # TF32 only affects fp32 matmuls on Ampere+; bf16/fp16 math is unchanged
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
    from transformers import set_seed

    set_seed(cfg.train.seed)  # the same on every rank: PEFT adapters start identical, dropout is reproducible
    out = Path(cfg.output_dir)
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    tokenizer = load_tokenizer(cfg)
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    # The kernel depends on the architecture (flex support, attention dropout) and the precision (flash-attn and
    # dsft_varlen run bf16/fp16 only), so it is chosen once both are known.
    try:
        hf_attn, loader_attn = resolve_attention(
            cfg.model.attn_implementation, "cuda" if cuda else "cpu", config=model_config, precision=precision
        )
    except ValueError as e:  # a forced kernel this model, precision or machine cannot run
        raise ConfigError(f"model.attn_implementation={cfg.model.attn_implementation}: {e}") from e
    common = dict(
        seq_len=cfg.data.seq_len,
        micro_batch_size=plan.micro_batch_size,
        rank=dist.rank(),
        world_size=dist.world_size(),
        seed=cfg.train.seed,
        packing=cfg.packing,
        attention=loader_attn,
        num_workers=cfg.data.loader_workers(cuda),
        pin_memory=cuda,
        # padded batches: at most seq_len/64 distinct lengths for flex's compile cache, full tensor-core tiles
        pad_multiple=64 if cuda else 1,
        pad_id=tokenizer.pad_token_id,
    )
    train_src = resolve_data(cfg.data.train, cfg, tokenizer, "data.train")  # a path, or a mixture's list
    for src in source_paths(train_src):
        if require_loss_mask and not src.endswith(".json") and not has_loss_mask(src):
            raise ConfigError(
                f"data.train={cfg.data.train}: no loss mask ({loss_mask_prefix(src)}.idx), so the loss would count "
                "prompt tokens too; convert chat/instruction data (data.format=messages|alpaca|sharegpt) or use "
                "full.py for text"
            )
    eval_src = resolve_data(cfg.data.eval, cfg, tokenizer, "data.eval") if cfg.data.eval else None
    check_sources([train_src, eval_src], tokenizer, model_config.vocab_size)
    # Serve the model as its data taught it: the chat template the data was rendered with goes into final/'s
    # tokenizer, and generate() stops on the tokens its assistant turns end with (a mixture: its first source's).
    serving, stop_warning = serving_settings(source_meta(source_paths(train_src)[0]), tokenizer)
    if serving["chat_template"]:
        tokenizer.chat_template = serving["chat_template"]
    data_reports = {}
    if dist.is_main():
        (out / SERVING_FILE).write_text(json.dumps(serving, indent=2))
        if stop_warning:
            print(f"[dsft] WARNING {stop_warning}", flush=True)
        data_reports = report_lengths(cfg, {"data.train": train_src, "data.eval": eval_src})
    # The train order is cut into optimizer steps of the global batch, each rank taking its slice: the same batches on
    # any world size (resume on fewer or more GPUs continues the same run). Evaluation is one pass, a micro step each.
    try:
        loader = build_dataloader(train_src, shuffle=True, drop_last=True, global_batch=plan.global_batch, **common)
    except ValueError as e:  # e.g. less data than one optimizer step: a config problem, not a traceback
        raise ConfigError(f"data.train={cfg.data.train}: {e}") from e
    names = loader.source_names  # a mixture's sources (batches carry source_counts), None for one source
    drawn = [0] * len(names or [])  # samples drawn per source since step 0, all ranks (restored on resume)
    eval_loader = None
    if eval_src:  # a list data.eval: one exact loader per source (loss per source, then all tokens pooled)
        eval_loader = (
            {it["name"]: build_dataloader(it["path"], shuffle=False, drop_last=False, **common) for it in eval_src}
            if isinstance(eval_src, list)
            else build_dataloader(eval_src, shuffle=False, drop_last=False, **common)
        )
    if len(loader) < plan.grad_accum:
        raise TrainingAborted(
            f"data.train gives {len(loader)} micro-batches per rank per epoch, fewer than train.grad_accum="
            f"{plan.grad_accum}: use more data, a smaller train.micro_batch_size or fewer ranks"
        )
    total_steps = cfg.train.max_steps or max(1, int(cfg.train.epochs * len(loader)) // plan.grad_accum)
    warmup = int(cfg.train.warmup * total_steps) if cfg.train.warmup < 1 else int(cfg.train.warmup)

    hidden = getattr(model_config, "hidden_size", None)
    offloading = cfg.zero.offload_optimizer != "none"
    optimizer = {
        "type": "AdamW",
        "params": {"lr": cfg.train.lr, "betas": cfg.train.adam_betas, "eps": 1e-8, "weight_decay": 0.0},
    }
    if not offloading:
        # torch.optim.AdamW instead of DeepSpeed's FusedAdam, which JIT-compiles a CUDA extension (needs nvcc) and
        # does not exist on CPU; with offload DeepSpeed requires (and compiles) its fast DeepSpeedCPUAdam.
        optimizer["params"]["torch_adam"] = True
    ckpt_root = out / "checkpoints"
    resume_from = _resume_path(cfg, ckpt_root)
    resume = None
    if resume_from is not None:
        # Before the DeepSpeed config: another world size or ZeRO stage than at save means a universal checkpoint,
        # and DeepSpeed reads checkpoint.load_universal when the engine is built.
        try:
            resume = resolve_resume(
                resume_from,
                cfg.zero.stage,
                partitions_optimizer=cfg.zero.stage > 0 or precision == "bf16",  # bf16 ZeRO-0: BF16_Optimizer shards
                nvme_optimizer=cfg.zero.offload_optimizer == "nvme",
            )
        except CheckpointError as e:
            raise ConfigError(f"train.resume: {e}") from e
    ds_config = make_ds_config(
        zero_stage=cfg.zero.stage,
        batch=plan,
        precision=precision,
        offload_optimizer=cfg.zero.offload_optimizer,
        offload_params=cfg.zero.offload_params,
        nvme_path=cfg.zero.nvme_path,
        gradient_clipping=cfg.train.max_grad_norm,
        optimizer=optimizer,
        user_config=cfg.deepspeed,
        hidden_size=hidden,
        load_universal=resume is not None and resume.universal,
    )
    if ds_config.get("bf16", {}).get("enabled"):
        ds_config["bf16"]["check_grad_overflow"] = True  # ZeRO-1/2 then skip a step whose grad norm is inf/NaN
    if dist.is_main():
        (out / "ds_config.json").write_text(json.dumps(ds_config, indent=2))

    nvme = "nvme" in (cfg.zero.offload_optimizer, cfg.zero.offload_params)
    needed = (["CPUAdamBuilder"] if offloading else []) + (["AsyncIOBuilder"] if nvme else [])
    if missing := ops.unavailable(needed):
        hint = "install libaio (apt-get install libaio-dev)" if nvme else "check that a C++ compiler and ninja work"
        raise ConfigError(
            f"zero.offload_optimizer={cfg.zero.offload_optimizer} zero.offload_params={cfg.zero.offload_params} "
            f"need DeepSpeed's {', '.join(missing)} op, which cannot be built here: {hint}, or offload less"
        )
    ops.build(needed)  # before the model: a missing op or a slow first compile shows up before a big load
    model = load_model(cfg, ds_config, precision, hf_attn)
    tiled_head = install_tiled_loss(
        model, mode=cfg.train.tiled_loss, tokens_per_micro_batch=plan.micro_batch_size * cfg.data.seq_len
    )
    if tiled_head is not None and dist.is_main():
        print(f"[dsft] tiled loss: the head and the loss in tiles of {tiled_head.tile} tokens", flush=True)
    fpt = flops_per_token(*matmul_params(model))  # the benchmarks' convention: 4 per frozen weight, 6 per trainable
    peak = peak_flops_per_gpu(precision, cfg.tf32)

    def schedule(opt):
        return torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, total_steps, warmup, cfg.train.lr_scheduler, cfg.train.min_lr_ratio)
        )

    engine, _, _, _ = deepspeed.initialize(
        # DeepSpeed binds cuda:LOCAL_RANK unless told the device: wrong where a task sees only its own GPU
        args=SimpleNamespace(device_rank=dist.cuda_index()) if cuda else None,
        model=model,
        model_parameters=param_groups(model, cfg.train.weight_decay),
        config=ds_config,
        lr_scheduler=schedule,
    )
    skip_non_finite_steps(engine)

    step, bad_streak = 0, 0
    data_order = {
        "data.seq_len": cfg.data.seq_len,
        "data.packing": cfg.packing,
        "train.global_batch": plan.global_batch,
        "train.seed": cfg.train.seed,
    }
    if resume is not None:
        # resume=auto: find_resume_checkpoint has just verified it (rank 0, once); an explicit path is verified here.
        state = load_checkpoint(
            engine,
            resume_from,
            verify_hashes=cfg.train.resume != "auto",
            universal_dir=resume.load_dir if resume.universal else None,
        )
        try:
            check_resume_settings(state.get("data_order"), data_order)
        except CheckpointError as e:
            raise ConfigError(f"train.resume: {resume_from}: {e}") from e
        step, bad_streak = int(state["step"]), int(state.get("bad_streak", 0))
        try:
            loader.load_state_dict(state["loader"])
        except ValueError as e:  # e.g. a changed mixture: a config problem, named, not a traceback
            raise ConfigError(f"train.resume: {resume_from}: {e}") from e
        drawn = state.get("source_counts") or drawn
        if dist.is_main():
            print(f"[dsft] resumed from {resume_from} at step {step}", flush=True)
            _truncate_metrics(out / "metrics.jsonl", step)
    metrics = MetricsLogger(out, enabled=dist.is_main(), append=resume_from is not None)
    for report in data_reports.values():  # what the data lost to length limits and bad records
        metrics.log({"step": 0, "split": "data", **report})

    from finetune.watchdog import StepWatchdog, default_step_timeout, nccl_report_warning

    step_timeout = default_step_timeout(dist.backend(), cfg.train.step_timeout_s, cfg.train.collective_timeout_s)
    warning = nccl_report_warning(os.environ, dist.backend(), step_timeout, cfg.train.collective_timeout_s)
    if warning and dist.is_main():
        print(f"[dsft] WARNING {warning}", flush=True)
    watchdog = StepWatchdog(
        step_timeout,
        on_timeout=lambda msg: metrics.flush(),
        heartbeat_dir=out / "heartbeat",
        ckpt_root=ckpt_root,
    )
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=step, disable=not dist.is_main(), desc=cfg.method.name, dynamic_ncols=True)
    batches = _batches(loader)
    last = {"step": step}
    # device-side sums since the last metrics row: read (one sync) per row
    row = _RowTotals(engine.device, len(names or []))
    try:
        with watchdog.guard():  # a peer that died mid-collective -> one report naming it, exit 87
            while step < total_steps:
                lr = cfg.train.lr * lr_factor(step, total_steps, warmup, cfg.train.lr_scheduler, cfg.train.min_lr_ratio)
                micro_batches = [next(batches) for _ in range(plan.grad_accum)]
                loss, counts = _train_step(engine, micro_batches, cfg, plan, tiled_head)
                row.add(loss, counts)
                step += 1
                # DeepSpeed skipped the step when its gradients were not finite: a host flag it computed anyway
                bad_streak = _count_bad_step(engine.was_step_applied(), engine, bad_streak, cfg, precision, step)
                if step % cfg.train.log_every == 0 or step == total_steps:
                    mean_loss, real_tokens, dt, steps, row_drawn = row.read(plan.world_size * plan.grad_accum)
                    grad_norm = engine.get_global_grad_norm()
                    grad_norm = float(grad_norm) if grad_norm is not None else None
                    tokens_per_s = real_tokens / dt
                    last = {"step": step, "split": "train", "epoch": loader.epoch, "loss": mean_loss, "lr": lr}
                    last.update(grad_norm=grad_norm, loss_scale=_loss_scale(engine), tokens_per_s=tokens_per_s)
                    # exact sums over the row's `steps` steps, for benchmarks over many rows
                    last.update(real_tokens=real_tokens, step_time_s=dt, steps=steps)
                    last.update(
                        mfu=mfu(fpt, tokens_per_s, peak, dist.world_size()),
                        skipped=not engine.was_step_applied(),
                        # every skipped step since the start, not only the row's last one (dsft doctor counts them)
                        skipped_total=int(getattr(engine, "skipped_steps", 0)),
                    )
                    if names:  # cumulative samples per mixture source over all ranks, and the passes they make
                        drawn = [a + b for a, b in zip(drawn, row_drawn, strict=True)]
                        last.update(source_counts=dict(zip(names, drawn, strict=True)))
                        last.update(source_epochs=dict(zip(names, loader.source.source_epochs(drawn), strict=True)))
                    metrics.log({**last, **memory_stats()})
                    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
                bar.update(1)
                watchdog.beat(step)
                if eval_loader is not None and cfg.train.eval_every and step % cfg.train.eval_every == 0:
                    ev = evaluate_sources(engine, eval_loader, cfg, tiled_head)
                    metrics.log({"step": step, "split": "eval", **ev})
                    metrics.plot()
                if cfg.train.save_every and step % cfg.train.save_every == 0:
                    state = {
                        "step": step,
                        "bad_streak": bad_streak,
                        "loader": loader.state_dict(),
                        "source_counts": [a + b for a, b in zip(drawn, row.drawn(), strict=True)] if names else None,
                        "data_order": data_order,  # what a resume must keep (check_resume_settings)
                    }
                    metrics.flush()  # the rows up to a checkpoint survive a crash with it
                    try:
                        watchdog.note_checkpoint(
                            save_checkpoint(engine, ckpt_root, step, state, cfg.train.keep_last, watchdog)
                        )
                    except CheckpointError as e:  # raised on every rank alike; previous checkpoint left intact
                        if cfg.train.on_save_error == "stop":
                            raise
                        if dist.is_main():
                            print(f"[dsft] WARNING checkpoint at step {step} failed, training on: {e}", flush=True)
            summary = {"step": step, "loss": last.get("loss"), "data": data_reports}
            if eval_loader is not None:
                ev = evaluate_sources(engine, eval_loader, cfg, tiled_head)
                metrics.log({"step": step, "split": "eval", "final": True, **ev})
                summary.update(eval_loss=ev["loss"], eval_ppl=ev["ppl"])
            save_final(engine, cfg, tokenizer, out / "final", serving["stop_token_ids"])
            metrics.plot()
            if dist.is_main():
                (out / "summary.json").write_text(json.dumps(summary, indent=2))
            return summary
    finally:
        watchdog.stop()
        bar.close()
        metrics.close()


def _batches(loader):
    """Endless micro-batches; the loader moves to the next epoch by itself when one ends."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise TrainingAborted("the training loader yielded no batch in a whole epoch")


def _forward_kwargs(batch: dict, cfg: Config, device) -> tuple[dict, int]:
    batch = dict(batch)
    real = int(batch.pop("num_real_tokens", 0))
    batch.pop("source_counts", None)  # a mixture's samples per source: counted by the loop, not a model input
    if not get_method(cfg.method.name).keeps_position_ids:
        # PEFT prompt learning shifts positions itself (it prepends virtual tokens); explicit ids would be ignored.
        batch.pop("position_ids", None)
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}, real


def _target_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())  # causal LM: position t predicts label t+1


def _train_step(engine, micro_batches: list[dict], cfg: Config, plan, head=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over ``grad_accum`` micro-batches, without waiting on the device.

    Returns device tensors: this rank's share of the step's mean target-token loss (summed over ranks and divided by
    ``world_size x grad_accum`` it is the mean; see the module docstring), and ``[target tokens, real tokens]`` of
    the step over all ranks. The token counts come from the batches on the host; their all-reduce is started before
    the first forward and only waited on (on the device's stream under NCCL) when the first loss is scaled, so it
    overlaps the forward instead of blocking the host.
    """
    scale = plan.world_size * plan.grad_accum
    # a mixture's samples per source ride along in the same all-reduce (counts[2:])
    per_source = [
        sum(c) for c in zip(*(b["source_counts"].tolist() for b in micro_batches if "source_counts" in b), strict=True)
    ]
    counts = torch.tensor(
        [
            sum(_target_tokens(b) for b in micro_batches),
            sum(int(b.get("num_real_tokens", 0)) for b in micro_batches),
            *per_source,
        ],
        dtype=torch.float64,
    ).to(engine.device, non_blocking=True)
    pending = dist.all_reduce_sum_async(counts)
    engine.train()
    loss_sum = torch.zeros((), device=engine.device, dtype=torch.float64)
    weight = None
    for batch in micro_batches:
        kwargs, _ = _forward_kwargs(batch, cfg, engine.device)
        summed = summed_loss(engine, kwargs, head)  # the sum of this micro-batch's token losses (tiled or not)
        if weight is None:
            if pending is not None:
                pending.wait()
            weight = scale / counts[0].clamp(min=1.0)  # the step's gradient is that of sum(token losses) / n_global
        loss = summed * weight.to(summed.dtype)
        engine.backward(loss)
        engine.step()
        loss_sum += loss.detach().double()
    return loss_sum, counts


class _RowTotals:
    """What one ``metrics.jsonl`` row reports, summed on the device over the steps since the previous row.

    Reading it (:meth:`read`) is the loop's one host sync and its one loss all-reduce per row, so with
    ``train.log_every`` N the other N-1 steps queue work on the GPU without waiting for it.
    """

    def __init__(self, device, num_sources: int = 0):
        self.device, self.num_sources = device, num_sources
        self._reset()

    def _reset(self) -> None:
        self.loss = torch.zeros((), device=self.device, dtype=torch.float64)
        self.counts = torch.zeros(2 + self.num_sources, device=self.device, dtype=torch.float64)
        self.steps = 0
        self.t0 = time.perf_counter()

    def add(self, loss: torch.Tensor, counts: torch.Tensor) -> None:
        self.loss += loss
        self.counts += counts
        self.steps += 1

    def drawn(self) -> list[int]:
        """Samples per mixture source of all ranks since the last read (a host sync)."""
        return [int(c) for c in self.counts[2:].tolist()]

    def read(self, scale: int) -> tuple[float, int, float, int, list[int]]:
        """(mean step loss over all ranks, real tokens of all ranks, seconds, steps, samples per mixture source of
        all ranks) since the last read."""
        (loss,) = dist.all_reduce_sum([self.loss])  # counts are all-reduced already, every step
        real, seconds, steps, drawn = int(self.counts[1]), time.perf_counter() - self.t0, self.steps, self.drawn()
        self._reset()
        return loss / scale / steps, real, seconds, steps, drawn


def _loss_scale(engine) -> float | None:
    if not engine.fp16_enabled():
        return None
    return float(getattr(engine.optimizer, "cur_scale", getattr(engine.optimizer, "loss_scale", float("nan"))))


def skip_non_finite_steps(engine) -> None:
    """Make ``engine`` skip an optimizer step whose gradients hold inf/NaN, whatever its ZeRO stage and precision.

    Under ZeRO-1/2/3 (any precision) and bf16/fp16 at ZeRO-0, DeepSpeed's optimizer wrapper checks the gradient norm
    and skips a non-finite step (``was_step_applied()`` is False). ZeRO-0 fp32 hands DeepSpeed the torch optimizer
    itself, which applies the NaN and ruins every weight. DeepSpeed's engine reads ``optimizer.overflow`` after each
    step (``_take_model_step``), so setting it gives this case the same skip and bookkeeping (the LR schedule does not
    advance, ``skipped_steps`` counts it). Gradients are already all-reduced here, so every rank decides alike.
    """
    if engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled():
        return  # DeepSpeed's own wrapper skips already (tests/unit/finetune/nan_step_script.py checks every case)
    optimizer = engine.optimizer
    step = optimizer.step

    def guarded_step(*args, **kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        optimizer.overflow = bool(grads) and not torch.isfinite(torch.stack(torch._foreach_norm(grads))).all().item()
        if not optimizer.overflow:
            return step(*args, **kwargs)

    optimizer.overflow = False
    optimizer.step = guarded_step


def _count_bad_step(applied: bool, engine, bad_streak: int, cfg: Config, precision: str, step: int) -> int:
    """Count consecutive skipped (non-finite) steps; abort with a diagnosis after ``train.max_bad_steps`` in a row.

    ``applied`` is ``engine.was_step_applied()``: DeepSpeed skips a step whose gradients hold inf/NaN (a NaN loss
    gives NaN gradients), on every stage and precision (ZeRO-0 fp32 through :func:`skip_non_finite_steps`). fp16
    overflows while the dynamic loss scale is still calibrating are normal and only count once the scale is at 1.
    """
    if applied:
        return 0
    if precision == "fp16" and (_loss_scale(engine) or 0) > 1:
        return bad_streak
    bad_streak += 1
    grad_norm = engine.get_global_grad_norm()
    if dist.is_main():
        print(
            f"[dsft] step {step}: skipped, non-finite loss or gradients (grad_norm={grad_norm}, {bad_streak} in a row)",
            flush=True,
        )
    if bad_streak >= cfg.train.max_bad_steps:
        if precision == "fp16":
            hint = "fp16 overflow with the loss scale at its floor: use precision=bf16 (same range as fp32)"
        else:
            hint = f"the learning rate is probably too high: lower train.lr={cfg.train.lr:g} or raise train.warmup"
        raise TrainingAborted(
            f"{bad_streak} consecutive steps with a non-finite loss or gradient norm (up to step {step}, "
            f"train.max_bad_steps={cfg.train.max_bad_steps}): {hint}; also check the data for empty targets"
        )
    return bad_streak


@torch.no_grad()
def evaluate(engine, loader, cfg: Config, head=None) -> dict:
    """Mean target-token loss and perplexity over the whole eval set (all ranks' shares summed); ``head``: the
    tiled loss's patched head (``finetune.tiled_loss``), or None for the model's own loss."""
    engine.eval()
    loss_sum, tokens = 0.0, 0
    for batch in loader:
        kwargs, _ = _forward_kwargs(batch, cfg, engine.device)
        # the SUM of token losses (num_items_in_batch=1, or tiled): exact pooling across batches
        loss_sum += float(summed_loss(engine, kwargs, head))
        tokens += _target_tokens(batch)
    loss_sum, tokens = dist.all_reduce_sum([loss_sum, tokens])
    engine.train()
    loss = loss_sum / max(tokens, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": int(tokens)}


def evaluate_sources(engine, loaders, cfg: Config, head=None) -> dict:
    """``evaluate`` of one loader, or of a list ``data.eval``'s loaders (``{name: loader}``): ``loss/NAME``,
    ``ppl/NAME`` and ``tokens/NAME`` per source, and ``loss``/``ppl``/``tokens`` over all their target tokens pooled
    (what one exact evaluation of all of them together gives; every sample counted once)."""
    if not isinstance(loaders, dict):
        return evaluate(engine, loaders, cfg, head)
    out, loss_sum, tokens = {}, 0.0, 0
    for name, loader in loaders.items():
        ev = evaluate(engine, loader, cfg, head)
        out.update({f"loss/{name}": ev["loss"], f"ppl/{name}": ev["ppl"], f"tokens/{name}": ev["tokens"]})
        loss_sum, tokens = loss_sum + ev["loss"] * ev["tokens"], tokens + ev["tokens"]
    loss = loss_sum / max(tokens, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": int(tokens), **out}


def save_final(engine, cfg: Config, tokenizer, final_dir: Path, stop_ids: list[int] | None = None) -> None:
    """Write ``final_dir``: a full ``save_pretrained`` model (full) or a PEFT adapter folder, plus the tokenizer.

    ZeRO-3 holds only a shard of every weight per rank, so the weights are gathered first (collective: every rank
    must call this); the main rank writes. ``stop_ids`` (the data's end-of-turn tokens and eos, see
    ``data.serving_settings``) become ``generation_config.eos_token_id``; an adapter folder gets a
    ``generation_config.json`` of its own, since ``PeftModel.save_pretrained`` writes none.
    """
    import deepspeed

    module = engine.module
    zero3 = engine.zero_optimization_stage() == 3
    if cfg.is_peft:
        trainable = [p for p in module.parameters() if p.requires_grad]
        ctx = deepspeed.zero.GatheredParameters(trainable, modifier_rank=None) if zero3 else nullcontext()
        with ctx:
            if dist.is_main():
                save_for_serving(module, final_dir, stop_ids, peft=True)
    else:
        state = engine._zero3_consolidated_16bit_state_dict() if zero3 else None
        if dist.is_main():
            state = state if zero3 else {k: v.detach().cpu() for k, v in module.state_dict().items()}
            save_for_serving(module, final_dir, stop_ids, peft=False, state_dict=state)
    if dist.is_main():
        tokenizer.save_pretrained(final_dir)
    dist.barrier()


def _resume_path(cfg: Config, ckpt_root: Path) -> Path | None:
    if cfg.train.resume == "never":
        return None
    if cfg.train.resume != "auto":
        return Path(cfg.train.resume)

    return find_resume_checkpoint(ckpt_root)  # collective: every rank calls it, rank 0 alone reads the checkpoints


def _truncate_metrics(path: Path, step: int) -> None:
    """After a resume, drop rows logged past the checkpoint (they are about to be recomputed) and the data rows
    (logged again at every start)."""
    if not path.exists():
        return
    rows = [(line, json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    keep = [line for line, row in rows if row["step"] <= step and row.get("split") != "data"]
    path.write_text("".join(line + "\n" for line in keep))


def main(
    defaults: dict | None = None,
    methods: tuple[str, ...] | None = None,
    require_loss_mask: bool = False,
    argv: list[str] | None = None,
) -> int:
    """Recipe entry point: ``--config X.yaml key=value ...``; validates before any process starts talking.

    Args:
        defaults: what the recipe sets unless the YAML or an override says otherwise (e.g. the method name).
        methods: the ``method.name`` values (names or aliases) this recipe accepts (None: any).
        require_loss_mask: passed to ``run`` (the SFT recipe).
        argv: arguments (default ``sys.argv[1:]``); ``--local_rank=N`` from the deepspeed launcher is accepted.
    """
    import argparse
    import os

    from finetune.config import load_config
    from finetune.preflight import check_before_launch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (see finetune/configs/)")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-4")
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides, defaults)
        if methods and cfg.method.name not in {get_method(m).name for m in methods}:
            recipe = get_method(cfg.method.name).recipe or "sft.py"
            raise ConfigError(
                f"method.name={cfg.method.name} is not trained by this recipe (it takes {', '.join(methods)}); "
                f"use finetune/{recipe} (sft.py trains any method)"
            )
        cfg.validate(int(os.environ.get("WORLD_SIZE", 1)))
        check_before_launch(cfg)  # files and the model's config.json: seconds, before any collective
    except ConfigError as e:
        if os.environ.get("RANK", "0") == "0":  # every rank fails the same way; one message is enough
            print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        run(cfg, require_loss_mask=require_loss_mask)
    except ConfigError as e:
        if dist.is_main():
            print(f"config error: {e}", file=sys.stderr, flush=True)
        return 2
    except TrainingAborted as e:
        print(f"[dsft] training aborted on rank {dist.rank()}: {e}", file=sys.stderr, flush=True)
        if dist.is_main():  # the reason, where `dsft doctor RUN_DIR` reads it
            summary = {"aborted": str(e), "exit_code": EXIT_BAD_STEPS}
            Path(cfg.output_dir, "summary.json").write_text(json.dumps(summary, indent=2))
        return EXIT_BAD_STEPS
    except CheckpointError as e:
        if dist.is_main():
            print(
                f"[dsft] CheckpointError: save failed, training stopped: {e}\nThe previous checkpoint is intact: free space "
                "and rerun the same command (train.resume=auto), or set train.on_save_error=continue.",
                file=sys.stderr,
                flush=True,
            )
        return EXIT_SAVE_FAILED
    finally:
        dist.destroy()
    return 0
