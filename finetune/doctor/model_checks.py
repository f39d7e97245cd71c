"""The before-training checks that run the real model on one real batch: gradient flow, fp16 range, overfit-one-batch.

The model is loaded in fp32 on CPU or the local GPU and trained in-process with plain torch (no DeepSpeed), so the
checks take seconds on a small model and need no launcher.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from finetune.doctor.report import FAIL, OK, SKIP, WARN, Report

# Overfit-one-batch. Measured on the demo (finetune/configs/demo.yaml: 0.6M-param Llama, 16 rows, lr 3e-3, CPU,
# 40 steps, < 1 s): 5.70 -> 0.146 (0.03x). lr 1e-7 stays at 0.998x (flat), lr 10 climbs to 13024 (diverges).
# A working setup memorises one batch: 40 steps must take the loss below 30% of its start. 30% leaves room for
# a pretrained model at a cautious rate (its start loss is already low) while a rate 100x too low stays near 1.0x;
# above 90% the setup is called unable to learn, in between it learns but slowly (WARN).
OVERFIT_STEPS = 40
OVERFIT_PASS_RATIO = 0.3
OVERFIT_FLAT_RATIO = 0.9
# Loss above this multiple of its start (or non-finite) on the same batch: divergence, the learning rate.
DIVERGE_RATIO = 1.5
FP16_MAX = 65504.0  # largest finite float16
# Activations within this factor of FP16_MAX are a warning: fine-tuning can grow them, and fp16 has no headroom.
FP16_HEADROOM = 4.0


def check_on_model(cfg, plan, src, tokenizer, model_config, counts, dev, overfit_steps: int, report: Report) -> None:
    """Load the real model (weights in fp32 on ``dev``) and run the checks that need it on one real batch.

    Args:
        cfg: the loaded config.
        plan: its ``BatchPlan`` (``Config.validate``): the micro batch size of the first batch.
        src: the resolved ``data.train`` source.
        tokenizer: the tokenizer of ``model.name_or_path`` (its pad id pads the batch).
        model_config: the model's HF config (the attention kernel depends on it).
        counts: (trainable, total) parameters, from the meta-device check: what the memory estimate needs.
        dev: the torch device the checks run on.
        overfit_steps: AdamW steps of the overfit-one-batch test; 0 reports it as SKIP.
        report: receives the ``gradients``, ``fp16_range`` and ``overfit`` findings.
    """
    import torch

    need = _bytes_needed(*counts)
    free = _free_bytes(dev)
    if free is not None and need > 0.8 * free:
        why = f"needs ~{need / 2**30:.1f} GiB for weights, gradients and AdamW in fp32, {free / 2**30:.1f} GiB free"
        for check in ("gradients", "fp16_range", "overfit"):
            report.add(SKIP, check, f"not run on {dev}: {why}", "run dsft doctor on a machine (GPU) with more memory")
        return
    hf_attn, mode = _attention(cfg, model_config, dev, report)
    batch = _first_batch(cfg, plan, src, tokenizer, mode, report)
    if batch is None:
        return
    model = _load_model(cfg, hf_attn, dev)
    _check_gradients(cfg, model, batch, dev, report)
    _check_fp16_range(cfg, model, model_config, batch, dev, report)
    if overfit_steps > 0:
        _overfit(cfg, model, batch, dev, overfit_steps, report)
    else:
        report.add(SKIP, "overfit", "--overfit-steps 0")
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _bytes_needed(trainable: int, total: int) -> int:
    """fp32 weights, plus gradient and two AdamW moments per trainable weight; activations of one batch not counted."""
    return 4 * total + 12 * trainable


def _free_bytes(dev) -> int | None:
    import torch

    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:  # not Linux: no cheap way to ask, run the checks
        return None
    return None


def _attention(cfg, model_config, dev, report: Report) -> tuple[str, str]:
    """The run's attention kernel, or this machine's default for it when the configured one cannot run here."""
    from finetune.attention import resolve_attention

    try:
        return resolve_attention(cfg.model.attn_implementation, dev.type, config=model_config, precision="fp32")
    except ValueError as e:  # e.g. flash_attention_2 on a CPU login node: check the rest with what runs here
        hf, mode = resolve_attention("auto", dev.type, config=model_config, precision="fp32")
        report.add(
            SKIP,
            "attention",
            f"model.attn_implementation={cfg.model.attn_implementation} cannot run here ({e}); the model checks use {hf}",
        )
        return hf, mode


def _first_batch(cfg, plan, src, tokenizer, mode: str, report: Report) -> dict | None:
    """The first training micro-batch (the run's seed, packing and micro batch size), as the engine builds it."""
    from data_tools.loader import build_dataloader
    from finetune.engine import _target_tokens  # the engine's count of what the loss is averaged over (one home)

    loader = build_dataloader(
        src,
        seq_len=cfg.data.seq_len,
        micro_batch_size=plan.micro_batch_size,
        seed=cfg.train.seed,
        packing=cfg.packing,
        attention=mode,
        pad_id=tokenizer.pad_token_id,
        shuffle=True,
        drop_last=True,
    )
    batch = next(iter(loader), None)
    if batch is None:
        report.add(
            FAIL,
            "overfit",
            f"data.train gives no full micro-batch of {plan.micro_batch_size} rows",
            "use more data or a smaller train.micro_batch_size",
        )
        return None
    targets = _target_tokens(batch)
    report.details["batch"] = {
        "rows": int(batch["input_ids"].shape[0]),
        "length": int(batch["input_ids"].shape[1]),
        "targets": targets,
    }
    if targets == 0:
        report.add(
            FAIL,
            "overfit",
            "the first batch has no target token (every label is masked): the loss is 0/0",
            "see loss_tokens above: the data's loss mask is empty",
        )
        return None
    return batch


def _load_model(cfg, hf_attn: str, dev):
    """The base in fp32 on ``dev``, made trainable by the method's ``prepare``, as the run would (minus DeepSpeed)."""
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.methods import get_method

    method = get_method(cfg.method.name)
    kwargs = method.load_kwargs(cfg, "fp32")
    if "quantization_config" in kwargs:
        kwargs["device_map"] = {"": dev.index or 0} if dev.type == "cuda" else {"": "cpu"}
    torch.manual_seed(cfg.train.seed)  # PEFT adapters start as in the run
    model = AutoModelForCausalLM.from_pretrained(
        cfg.model.name_or_path,
        dtype=torch.float32,
        attn_implementation=hf_attn,
        trust_remote_code=cfg.model.trust_remote_code,
        use_safetensors=True,
        **kwargs,
    )
    model.config.use_cache = False
    model = method.prepare(model, cfg)
    return model.to(dev)


def _forward(cfg, model, batch, dev):
    from finetune.engine import _forward_kwargs  # the engine's rule for what reaches the model (one home)

    kwargs, _ = _forward_kwargs(batch, cfg, dev)
    return model(**kwargs)


def _check_gradients(cfg, model, batch, dev, report: Report) -> None:
    """A real backward on two rows: every trainable tensor must get a gradient (PEFT + checkpointing: input grads)."""
    tiny = {k: (v[:2] if hasattr(v, "shape") and v.dim() > 0 else v) for k, v in batch.items()}
    model.train()
    model.zero_grad(set_to_none=True)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    peft_gc = cfg.is_peft and cfg.model.gradient_checkpointing
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hooked = bool(getattr(base, "_require_grads_hooks", None) or getattr(base, "_require_grads_hook", None))
    check = "gradients.checkpointing" if peft_gc else "gradients"
    try:
        loss = _forward(cfg, model, tiny, dev).loss
        loss.backward()
    except RuntimeError as e:  # "element 0 of tensors does not require grad": nothing upstream of the loss trains
        report.add(
            FAIL,
            check,
            f"backward on one batch failed ({str(e).splitlines()[0]}): no gradient reaches the trainable parameters"
            + (
                " (frozen embeddings + gradient checkpointing: the checkpointed blocks see no input that needs grad)"
                if peft_gc
                else ""
            ),
            "call model.enable_input_require_grads() after enabling checkpointing (finetune.methods."
            "enable_gradient_checkpointing does), or use non-reentrant checkpointing",
        )
        return
    # Reached = autograd gave it a gradient. Zero is fine for some: LoRA's A gets exactly 0 while its B starts at 0.
    missing = [n for n, p in trainable if p.grad is None]
    moving = sum(1 for _, p in trainable if p.grad is not None and bool(p.grad.abs().sum() > 0))
    model.zero_grad(set_to_none=True)
    what = f"{len(trainable) - len(missing)} of {len(trainable)} trainable tensors get a gradient ({moving} non-zero)"
    if peft_gc:
        what += f" with gradient checkpointing (enable_input_require_grads {'set' if hooked else 'NOT set'})"
    fix_gc = (
        "call model.enable_input_require_grads() after enabling checkpointing on a frozen base (finetune.methods."
        "enable_gradient_checkpointing does), or set model.gradient_checkpointing=false"
    )
    if len(missing) == len(trainable) or moving == 0:
        report.add(
            FAIL,
            check,
            f"{what}: gradients do not reach the trainable parameters"
            + (f" ({', '.join(missing[:3])} ...)" if missing else ""),
            fix_gc if peft_gc else "check the method's prepare: the trainable tensors are not used by the forward",
        )
    elif missing:
        report.add(
            WARN if not peft_gc else FAIL,
            check,
            f"{what}; none for {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}",
            fix_gc if peft_gc else "fine for layers this data never uses; otherwise they do not train",
        )
    else:
        report.add(OK, check, what)


def _planned_precision(cfg) -> str:
    """The precision the run will train in: the configured one, or what ``auto`` gives on this machine."""
    import torch

    from ds_configs import resolve_precision

    if cfg.precision != "auto":
        return cfg.precision
    return resolve_precision("auto", torch.cuda.get_device_capability() if torch.cuda.is_available() else None)


def _check_fp16_range(cfg, model, model_config, batch, dev, report: Report) -> None:
    """Largest weight and activation on one batch (fp32 forward) against fp16's 65504, when the run trains in fp16."""
    import torch

    biggest = {"value": 0.0, "where": ""}

    def hook(module_name):
        def record(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            if torch.is_tensor(out) and out.is_floating_point() and out.numel():
                m = float(out.detach().abs().max())
                if m > biggest["value"] or not math.isfinite(m):
                    biggest.update(value=m, where=module_name)

        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        model.eval()
        with torch.no_grad():
            _forward(cfg, model, batch, dev)
    finally:
        for h in handles:
            h.remove()
    weight_max, weight_name = 0.0, ""
    for n, p in model.named_parameters():
        if p.is_floating_point() and p.numel():
            m = float(p.detach().abs().max())
            if m > weight_max:
                weight_max, weight_name = m, n
    act = biggest["value"]
    report.details["fp16_range"] = {
        "max_activation": act,
        "at": biggest["where"],
        "max_weight": weight_max,
        "weight": weight_name,
    }
    precision = _planned_precision(cfg)
    pretrained = str(getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", "")).replace(
        "torch.", ""
    )
    seen = f"largest activation {act:.4g} ({biggest['where']}), largest weight {weight_max:.4g} ({weight_name})"
    if precision != "fp16":
        report.add(OK, "fp16_range", f"precision={precision}: no fp16 range limit ({seen})")
        return
    to_bf16 = "use precision=bf16 (Ampere or newer: fp32's range, no loss scaling)"
    if weight_max > FP16_MAX or act > FP16_MAX or not math.isfinite(act):
        report.add(
            FAIL,
            "fp16_range",
            f"precision=fp16 but {seen} exceeds fp16's {FP16_MAX:g}: inf/NaN from the first step",
            to_bf16,
        )
    elif act * FP16_HEADROOM > FP16_MAX:
        report.add(
            WARN, "fp16_range", f"precision=fp16: {seen}, within {FP16_HEADROOM:g}x of fp16's {FP16_MAX:g}", to_bf16
        )
    elif pretrained == "bfloat16":
        report.add(
            WARN,
            "fp16_range",
            f"precision=fp16 with a model saved in bfloat16 (pretrained in bf16: its activations may leave fp16's "
            f"range on other batches; {seen} on this one)",
            to_bf16,
        )
    else:
        report.add(OK, "fp16_range", f"precision=fp16: {seen}, within fp16's range")


def _overfit(cfg, model, batch, dev, steps: int, report: Report) -> None:
    """``steps`` AdamW steps at ``train.lr`` on one batch (the run's betas, weight decay, clipping; no schedule).

    On a GPU the forward runs under autocast in the run's precision (fp32 master weights, like DeepSpeed's mixed
    precision), with a dynamic loss scaler for fp16; on CPU in fp32.
    """
    import torch

    precision = _planned_precision(cfg) if dev.type == "cuda" else "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    params = [p for p in model.parameters() if p.requires_grad]
    t = cfg.train
    opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay)
    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    for _ in range(steps):
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            loss = _forward(cfg, model, batch, dev).loss
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            break
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if t.max_grad_norm > 0:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        scaler.step(opt)
        scaler.update()
    seconds = time.perf_counter() - t0
    report.details["overfit"] = {
        "steps": len(losses),
        "losses": losses,
        "seconds": round(seconds, 2),
        "precision": precision,
        "lr": t.lr,
        "pass_ratio": OVERFIT_PASS_RATIO,
    }
    report.add(*diagnose_overfit(losses, t.lr, steps, precision, dev.type))


def diagnose_overfit(losses: list[float], lr: float, steps: int, precision: str = "fp32", device: str = "cpu"):
    """(level, check, message, fix) for the loss curve of the overfit-one-batch test."""
    start, end = losses[0], losses[-1]
    where = f"{len(losses)} AdamW steps at lr {lr:g} on one batch ({device}, {precision})"
    curve = f"loss {start:.4g} -> {end:.4g}"
    if not math.isfinite(start):
        return (
            FAIL,
            "overfit",
            f"the first loss is {start} before any update",
            ("the model's forward overflows on this batch: check fp16_range above, use fp32/bf16"),
        )
    lower = f"lower train.lr (now {lr:g}) 3-10x, or raise train.warmup"
    if not math.isfinite(end):
        return (
            FAIL,
            "overfit",
            f"{curve} (non-finite at step {len(losses)}) in {where}: the learning rate is too high, the loss diverges",
            lower,
        )
    if end > DIVERGE_RATIO * start or max(losses) > 2 * start:
        return (
            FAIL,
            "overfit",
            f"{curve} (peak {max(losses):.4g}) in {where}: the loss diverges, the learning rate is too high",
            lower,
        )
    ratio = end / start if start > 0 else 1.0
    if ratio < OVERFIT_PASS_RATIO:
        return OK, "overfit", f"{curve} ({ratio:.0%} of the start) in {where}: the setup can learn", ""
    if min(losses) < OVERFIT_PASS_RATIO * start:
        return WARN, "overfit", f"{curve} in {where}: reached {min(losses):.4g}, then climbed back: unstable", lower
    if ratio > OVERFIT_FLAT_RATIO:
        return (
            FAIL,
            "overfit",
            (
                f"{curve} ({ratio:.0%} of the start) in {where}: the setup cannot learn, the loss is flat. Gradients and "
                "labels passed above, so the learning rate is too low"
            ),
            f"raise train.lr (now {lr:g}) 10x and re-run dsft doctor",
        )
    return (
        WARN,
        "overfit",
        f"{curve} ({ratio:.0%} of the start, want < {OVERFIT_PASS_RATIO:.0%}) in {where}: learns, slowly",
        (f"raise train.lr (now {lr:g}), or --overfit-steps {2 * steps} to see if it gets there"),
    )
