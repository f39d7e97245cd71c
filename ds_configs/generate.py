"""``python -m ds_configs.generate`` / ``dsft-ds-config``: pick the cheapest DeepSpeed setup that fits, explain, write it.

Example (7B LoRA on one 24 GB GPU; explicit shape, nothing downloaded)::

    python -m ds_configs.generate --params 6738415616 --layers 32 --hidden 4096 --intermediate 11008 \\
        --vocab 32000 --method lora --gpus-per-node 1 --gpu-mem-gib 24 --seq-len 2048 --global-batch 16 \\
        --out ds_config.json

Order of preference (cheapest first, by throughput cost): ZeRO 0 → 1 → 2 → 3, then optimizer offload to CPU
(ZeRO-2, then ZeRO-3), then parameter offload, then NVMe. Within a configuration: no gradient checkpointing if
it fits (checkpointing recomputes the forward, ~1/3 more compute), and the largest micro batch that fits and
divides the global batch. ``--preset NAME`` / ``--write-presets DIR`` write the preset templates instead.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ds_configs.batch import ACCUM_KEY, GLOBAL_KEY, MICRO_KEY, BatchPlan, resolve_batch
from ds_configs.build import (
    PRESETS,
    gpu_arch_capability,
    make_ds_config,
    preset_template,
    resolve_precision,
)
from ds_configs.memory import (
    MARGIN_FIXED_BYTES,
    MARGIN_FRACTION,
    Estimate,
    GiB,
    MethodSpec,
    ModelShape,
    estimate,
    methods,
    shape_from_hf_config,
    shape_from_numbers,
)

# (name, zero stage, optimizer offload, parameter offload), cheapest first.
STRATEGIES: list[tuple[str, int, str, str]] = [
    ("zero0", 0, "none", "none"),
    ("zero1", 1, "none", "none"),
    ("zero2", 2, "none", "none"),
    ("zero3", 3, "none", "none"),
    ("zero2_offload", 2, "cpu", "none"),
    ("zero3_offload_opt", 3, "cpu", "none"),
    ("zero3_offload", 3, "cpu", "cpu"),
    ("zero3_nvme_opt", 3, "nvme", "cpu"),
    ("zero3_nvme", 3, "nvme", "nvme"),
]
MAX_MICRO_BATCH = 64  # beyond this the GPU is saturated; larger global batches use accumulation


@dataclass
class Candidate:
    """One strategy evaluated at its best micro batch (or at micro 1 with checkpointing when nothing fits)."""

    name: str
    zero_stage: int
    offload_optimizer: str
    offload_params: str
    micro_batch: int
    gradient_checkpointing: bool
    est: Estimate | None
    fits: bool
    why: str


@dataclass
class Request:
    """Everything the search needs, from the command line."""

    shape: ModelShape
    method: MethodSpec
    gpus_per_node: int
    nodes: int
    gpu_mem: int
    cpu_mem: int | None
    nvme_path: str | None
    seq_len: int
    micro_batch: int | None
    global_batch: int | None
    precision: str
    checkpointing: str  # auto | on | off

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    @classmethod
    def for_hardware(cls, args: argparse.Namespace, **rest) -> Request:
        """A request for the hardware flags both ``dsft-ds-config`` and ``dsft plan`` take (GPUs per node, nodes,
        GPU and CPU memory in GiB); ``rest`` gives the model, method and batch fields."""
        return cls(
            gpus_per_node=args.gpus_per_node,
            nodes=args.nodes,
            gpu_mem=int(args.gpu_mem_gib * GiB),
            cpu_mem=int(args.cpu_mem_gib * GiB) if args.cpu_mem_gib else None,
            **rest,
        )


def _micro_options(req: Request) -> list[int]:
    if req.micro_batch is not None:
        return [req.micro_batch]
    cap = MAX_MICRO_BATCH
    if req.global_batch is not None:
        cap = min(cap, req.global_batch // req.world)
    options = [m for m in (2**i for i in range(7)) if m <= max(cap, 1)]
    if req.global_batch is not None:
        # the micro batch must divide the per-rank share of the global batch
        options = [m for m in options if req.global_batch % (m * req.world) == 0] or [1]
    return sorted(options, reverse=True)


def _check(req: Request, stage: int, opt: str, par: str, micro: int, gc: bool) -> tuple[Estimate, str]:
    est = estimate(
        req.shape,
        req.method,
        zero_stage=stage,
        offload_optimizer=opt,
        offload_params=par,
        gpus_per_node=req.gpus_per_node,
        nodes=req.nodes,
        seq_len=req.seq_len,
        micro_batch=micro,
        gradient_checkpointing=gc,
        precision=req.precision,
    )
    problems = []
    if est.gpu_with_margin > req.gpu_mem:
        problems.append(f"GPU {est.gpu_with_margin / GiB:.1f} > {req.gpu_mem / GiB:.0f} GiB")
    if req.cpu_mem is not None and est.cpu * (1 + MARGIN_FRACTION) > req.cpu_mem:
        problems.append(f"CPU {est.cpu * (1 + MARGIN_FRACTION) / GiB:.0f} > {req.cpu_mem / GiB:.0f} GiB/node")
    return est, "; ".join(problems)


def _qlora_refusal(req: Request, stage: int, par: str) -> str | None:
    """Why the engine refuses this strategy for a quantized (QLoRA) base, or None: ``ds_configs.rules``, the rules
    ``Config.validate`` applies too."""
    from ds_configs import rules

    bits = req.method.base_quant_bits
    if bits is None:
        return None
    violations = rules.check(stage, offload_params=par, quant_bits=bits, quantized_by=req.method.name)
    return violations[0].reason if violations else None


def evaluate(req: Request) -> list[Candidate]:
    """Evaluate every strategy; each at the largest micro batch that fits (no checkpointing preferred)."""
    out: list[Candidate] = []
    gc_options = {"auto": [False, True], "on": [True], "off": [False]}[req.checkpointing]
    for name, stage, opt, par in STRATEGIES:
        if "nvme" in (opt, par) and not req.nvme_path:
            out.append(Candidate(name, stage, opt, par, 0, False, None, False, "needs --nvme-path"))
            continue
        if why := _qlora_refusal(req, stage, par):
            out.append(Candidate(name, stage, opt, par, 0, False, None, False, why))
            continue
        found = None
        for gc in gc_options:
            for micro in _micro_options(req):
                est, problem = _check(req, stage, opt, par, micro, gc)
                if not problem:
                    found = Candidate(name, stage, opt, par, micro, gc, est, True, "fits")
                    break
            if found:
                break
        if found is None:
            # Report the smallest setting tried (micro 1, checkpointing if allowed) and why it failed.
            micro = min(_micro_options(req))
            gc = gc_options[-1]
            est, problem = _check(req, stage, opt, par, micro, gc)
            found = Candidate(name, stage, opt, par, micro, gc, est, False, problem)
        out.append(found)
    return out


def render_table(cands: list[Candidate]) -> str:
    """Markdown table of candidates: estimated GPU/CPU memory, fits, why."""
    lines = [
        "| config | ZeRO | offload opt/param | micro | ckpt | GPU GiB est | GPU GiB +margin | CPU GiB/node | fits | why |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cands:
        if c.est is None:
            lines.append(
                f"| {c.name} | {c.zero_stage} | {c.offload_optimizer}/{c.offload_params} | - | - | - | - | - | no |"
                f" {c.why} |"
            )
            continue
        lines.append(
            f"| {c.name} | {c.zero_stage} | {c.offload_optimizer}/{c.offload_params} | {c.micro_batch} |"
            f" {'on' if c.gradient_checkpointing else 'off'} | {c.est.gpu / GiB:.1f} | {c.est.gpu_with_margin / GiB:.1f} |"
            f" {c.est.cpu / GiB:.1f} | {'yes' if c.fits else 'no'} | {c.why} |"
        )
    return "\n".join(lines)


def explain(req: Request, c: Candidate) -> str:
    """Breakdown of one candidate's estimate and the assumptions behind it."""
    assert c.est is not None
    s = req.shape
    lines = [
        f"model: {s.source}, {s.total_params:,} params ({s.num_layers} layers, hidden {s.hidden_size}, "
        f"intermediate {s.intermediate_size}, kv {s.kv_dim}, vocab {s.vocab_size}, largest layer "
        f"{s.largest_layer_params:,})",
        f"method: {req.method.name}, trainable {c.est.trainable:,} params"
        + (
            f" (LoRA r={req.method.lora_r}, targets {req.method.lora_targets or 'all-linear'})"
            if req.method.name in ("lora", "qlora")
            else ""
        ),
        f"per GPU at micro batch {c.micro_batch}, seq {req.seq_len}, checkpointing "
        f"{'on' if c.gradient_checkpointing else 'off'}, {req.precision}:",
    ]
    for part, value in c.est.parts_gpu.items():
        lines.append(f"  {part:<13} {value / GiB:8.2f} GiB")
    lines.append(f"  {'total':<13} {c.est.gpu / GiB:8.2f} GiB (compare with torch.cuda.max_memory_allocated)")
    lines.append(
        f"  + margin {MARGIN_FRACTION:.0%} fragmentation + {MARGIN_FIXED_BYTES / GiB:.1f} GiB CUDA context = "
        f"{c.est.gpu_with_margin / GiB:.2f} GiB of {req.gpu_mem / GiB:.0f} GiB"
    )
    lines.append(
        f"per node CPU: {c.est.cpu / GiB:.1f} GiB" + (f", NVMe: {c.est.nvme / GiB:.1f} GiB" if c.est.nvme else "")
    )
    lines.extend(f"note: {n}" for n in c.est.notes)
    lines.append(
        "formulas: see ds_configs/memory.py (model states = DeepSpeed's estimators; activations after "
        "Korthikanti et al. 2022 for SDPA attention and a gated MLP)"
    )
    return "\n".join(lines)


def suggest(req: Request) -> list[str]:
    """When nothing fits: what would (more GPUs, shorter sequences, QLoRA, a bigger GPU, CPU memory / NVMe)."""
    tips = []
    cheapest_gpu = None
    for name, stage, opt, par in STRATEGIES:
        if "nvme" in (opt, par) and not req.nvme_path:
            continue
        if _qlora_refusal(req, stage, par):
            continue
        est, _ = _check(req, stage, opt, par, 1, req.checkpointing != "off")
        if cheapest_gpu is None or est.gpu_with_margin < cheapest_gpu[1].gpu_with_margin:
            cheapest_gpu = (name, est)
    if cheapest_gpu:
        name, est = cheapest_gpu
        needs = []
        if est.gpu_with_margin > req.gpu_mem:
            needs.append(f"GPUs with >= {est.gpu_with_margin / GiB:.1f} GiB")
        if req.cpu_mem is not None and est.cpu * (1 + MARGIN_FRACTION) > req.cpu_mem:
            needs.append(f">= {est.cpu * (1 + MARGIN_FRACTION) / GiB:.0f} GiB CPU memory per node")
        if needs:
            tips.append(f"{' and '.join(needs)} ({name}, the smallest GPU footprint, at micro batch 1)")
    for factor in (2, 4, 8, 16, 32, 64):
        more = Request(**{**req.__dict__, "nodes": req.nodes * factor})
        if any(c.fits for c in evaluate(more)):
            tips.append(f"{more.world} GPUs ({more.nodes} nodes × {req.gpus_per_node} GPUs per node)")
            break
    seq = req.seq_len // 2
    while seq >= 128:
        shorter = Request(**{**req.__dict__, "seq_len": seq})
        if any(c.fits for c in evaluate(shorter)):
            tips.append(f"--seq-len {seq}")
            break
        seq //= 2
    if req.method.name in ("full", "lora"):
        qlora = Request(**{**req.__dict__, "method": MethodSpec("qlora", lora_r=req.method.lora_r)})
        if any(c.fits for c in evaluate(qlora)):
            tips.append("--method qlora (4-bit base weights)")
    if not req.nvme_path:
        tips.append("--nvme-path on a local NVMe drive (ZeRO-Infinity), if CPU memory is the limit")
    return tips


# The training-config keys (finetune/config.py) a choice sets; tests load every one with load_config.
GRADIENT_CHECKPOINTING_KEY = "model.gradient_checkpointing"


def config_overrides(c: Candidate, batch: BatchPlan, req: Request) -> dict[str, Any]:
    """A chosen candidate as training-config ``key: value`` pairs, in the order a user reads them.

    This is the one mapping from the generator's choice to ``finetune/config.py`` keys: ``dsft plan`` writes these
    into the planned YAML and prints them, and ``dsft-ds-config`` prints them next to its JSON so that a training
    config given ``deepspeed=ds.json`` agrees with the JSON's explicit sections instead of contradicting them.
    ``train.global_batch`` is written consistent with the other two: a plan launched on another world size then
    fails ``Config.validate`` with the three keys named, instead of silently training another batch.
    """
    keys: dict[str, Any] = {
        "zero.stage": c.zero_stage,
        "zero.offload_optimizer": c.offload_optimizer,
        "zero.offload_params": c.offload_params,
    }
    if "nvme" in (c.offload_optimizer, c.offload_params):
        keys["zero.nvme_path"] = req.nvme_path
    keys[MICRO_KEY] = batch.micro_batch_size
    keys[ACCUM_KEY] = batch.grad_accum
    keys[GLOBAL_KEY] = batch.global_batch
    keys[GRADIENT_CHECKPOINTING_KEY] = c.gradient_checkpointing
    keys["precision"] = req.precision
    keys["data.seq_len"] = req.seq_len
    return keys


def override_value(value: Any) -> str:
    """``value`` spelled so that ``load_config``'s override parser (YAML scalars) reads it back unchanged."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    text = str(value)
    if isinstance(value, str) and yaml.safe_load(text) != value:
        return json.dumps(value)  # a JSON string is a YAML string: '1e5' or 'null' stay strings
    return text


def format_overrides(keys: dict[str, Any]) -> str:
    """``key=value`` arguments for a shell command line (each shell-quoted where needed)."""
    return " ".join(shlex.quote(f"{k}={override_value(v)}") for k, v in keys.items())


def report(
    req: Request, cands: list[Candidate], arch_note: str, explain_all: bool
) -> tuple[Candidate, BatchPlan] | None:
    """Print the generator's summary, table, choice and (``explain_all``) breakdowns; the choice, or None.

    Shared by ``dsft-ds-config`` and ``dsft plan`` so that both show the same table and explanation. When nothing
    fits it prints what would and returns None.
    """
    shape = req.shape
    print(
        f"{shape.total_params / 1e9:.2f}B params, {req.method.name}, {req.nodes} node(s) × {req.gpus_per_node} GPU × "
        f"{req.gpu_mem / GiB:g} GiB, seq {req.seq_len}, precision {req.precision} ({arch_note})"
    )
    for note in shape.notes:
        print(f"note: {note}")
    print()
    print(render_table(cands))
    print()
    if req.cpu_mem is None:
        print("CPU memory not checked (pass --cpu-mem-gib to check offload candidates against it)")
    chosen = next((c for c in cands if c.fits), None)
    if chosen is None:
        print("nothing fits. What would:")
        for tip in suggest(req):
            print(f"  - {tip}")
        return None
    batch = resolve_batch(world_size=req.world, micro_batch_size=chosen.micro_batch, global_batch=req.global_batch)
    skipped = [c.name for c in cands[: cands.index(chosen)]]
    print(
        f"chosen: {chosen.name} (ZeRO-{chosen.zero_stage}, offload optimizer={chosen.offload_optimizer}, "
        f"params={chosen.offload_params}) — the cheapest that fits"
        + (f"; cheaper ones do not: {', '.join(skipped)}" if skipped else "")
    )
    print(
        f"batch: micro {batch.micro_batch_size} × accumulation {batch.grad_accum} × {batch.world_size} GPUs = "
        f"global {batch.global_batch}; gradient checkpointing "
        + (f"ON ({GRADIENT_CHECKPOINTING_KEY}=true)" if chosen.gradient_checkpointing else "off")
    )
    if explain_all:
        print()
        # The chosen one and every cheaper one, so the breakdown shows why those did not fit.
        for c in cands[: cands.index(chosen) + 1]:
            if c.est is not None:
                print(f"[{c.name}]")
                print(explain(req, c))
                print()
    return chosen, batch


def target_capability(arg: str | None) -> tuple[tuple[int, int] | None, str]:
    """The compute capability to plan for (None = CPU ranks) and a note saying where it came from.

    ``--gpu-arch`` wins; else the local GPU; else Ampere is assumed (the note says so).
    """
    if arg is not None:
        if arg.lower() == "cpu":
            return None, "CPU ranks (--gpu-arch cpu)"
        cap = gpu_arch_capability(arg)
        return cap, f"--gpu-arch {arg} (compute capability {cap[0]}.{cap[1]})"
    import torch

    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        return cap, f"local {torch.cuda.get_device_name()} (compute capability {cap[0]}.{cap[1]})"
    return (8, 0), "assumed Ampere or newer (no --gpu-arch and no local GPU)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsft-ds-config", description=__doc__.split("\n\n")[0])
    model = p.add_argument_group("model (a HF config, or explicit numbers)")
    model.add_argument("--model", help="HF model path or hub id (only the config is read)")
    model.add_argument("--params", type=float, help="total parameters, e.g. 7e9 (with --layers/--hidden for accuracy)")
    model.add_argument("--layers", type=int, help="decoder layers")
    model.add_argument("--hidden", type=int, help="hidden size")
    model.add_argument("--intermediate", type=int, help="MLP width (derived from --params if omitted)")
    model.add_argument("--vocab", type=int, default=32000, help="vocabulary size (default 32000)")
    model.add_argument("--heads", type=int, help="attention heads (default hidden/128)")
    model.add_argument("--kv-heads", type=int, help="key/value heads for GQA (default = heads)")
    meth = p.add_argument_group("method")
    meth.add_argument(
        "--method", choices=methods(), default="full", help="a finetune.methods name or alias (e.g. ptuning_v2)"
    )
    meth.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default 16)")
    meth.add_argument("--lora-targets", nargs="*", help="linear names to adapt (default: all linears)")
    meth.add_argument("--quant-bits", type=int, default=4, choices=(4, 8), help="QLoRA base-weight bits")
    meth.add_argument("--virtual-tokens", type=int, default=32, help="prefix/prompt length for ptuning_v2/prompt")
    hw = p.add_argument_group("hardware")
    hw.add_argument("--gpus-per-node", type=int, help="GPUs per node")
    hw.add_argument("--nodes", type=int, default=1)
    hw.add_argument("--gpu-mem-gib", type=float, help="memory per GPU in GiB (e.g. 24, 80)")
    hw.add_argument("--cpu-mem-gib", type=float, help="CPU memory per node in GiB (unchecked if omitted)")
    hw.add_argument("--nvme-path", help="local NVMe directory: enables ZeRO-Infinity candidates")
    hw.add_argument("--gpu-arch", help="a100, h100, v100, … or a compute capability (8.0); 'cpu' for CPU ranks")
    tr = p.add_argument_group("training")
    tr.add_argument("--seq-len", type=int, help="tokens per sample (packed row length)")
    tr.add_argument("--micro-batch", type=int, help="fix the micro batch (default: the largest that fits)")
    tr.add_argument("--global-batch", type=int, help="samples per optimizer step (default: micro × GPUs)")
    tr.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    tr.add_argument("--gradient-checkpointing", default="auto", choices=("auto", "on", "off"))
    out = p.add_argument_group("output")
    out.add_argument("--out", help="where to write the DeepSpeed JSON")
    out.add_argument(
        "--explain", action="store_true", help="memory breakdown of the chosen and every cheaper candidate"
    )
    out.add_argument("--preset", choices=sorted(PRESETS), help="write this preset template to --out and exit")
    out.add_argument("--write-presets", metavar="DIR", help="write every preset template into DIR and exit")
    return p


def preset_json(name: str) -> str:
    """The exact text of a preset file."""
    return json.dumps(preset_template(name), indent=2) + "\n"


def write_presets(directory: str | Path) -> list[Path]:
    """Write every preset template as ``DIR/<name>.json``; returns the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in PRESETS:
        path = directory / f"{name}.json"
        path.write_text(preset_json(name))
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns 0 when a configuration fits (and is written), 2 when none does."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.write_presets:
        for path in write_presets(args.write_presets):
            print(f"wrote {path}")
        return 0
    if args.preset:
        if not args.out:
            parser.error("--preset needs --out")
        Path(args.out).write_text(preset_json(args.preset))
        print(f"wrote {args.out} (preset {args.preset}: {PRESETS[args.preset][3]})")
        return 0
    missing = [
        flag
        for flag, v in (
            ("--gpus-per-node", args.gpus_per_node),
            ("--gpu-mem-gib", args.gpu_mem_gib),
            ("--seq-len", args.seq_len),
        )
        if v is None
    ]
    if missing:
        parser.error(f"missing {', '.join(missing)}")
    try:
        if args.model:
            shape = shape_from_hf_config(args.model)
        else:
            shape = shape_from_numbers(
                params=int(args.params) if args.params else None,
                layers=args.layers,
                hidden=args.hidden,
                vocab=args.vocab,
                intermediate=args.intermediate,
                heads=args.heads,
                kv_heads=args.kv_heads,
            )
        method = MethodSpec(
            args.method,
            lora_r=args.lora_r,
            lora_targets=tuple(args.lora_targets) if args.lora_targets else None,
            quant_bits=args.quant_bits,
            virtual_tokens=args.virtual_tokens,
        )
        capability, arch_note = target_capability(args.gpu_arch)
        precision = resolve_precision(args.precision, capability)
        world = args.gpus_per_node * args.nodes
        if args.global_batch is not None:
            # Fails early, with the train.* keys named, when the global batch cannot be split over the GPUs.
            resolve_batch(world_size=world, micro_batch_size=args.micro_batch or 1, global_batch=args.global_batch)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    req = Request.for_hardware(
        args,
        shape=shape,
        method=method,
        nvme_path=args.nvme_path,
        seq_len=args.seq_len,
        micro_batch=args.micro_batch,
        global_batch=args.global_batch,
        precision=precision,
        checkpointing=args.gradient_checkpointing,
    )
    picked = report(req, evaluate(req), arch_note, explain_all=args.explain)
    if picked is None:
        return 2
    chosen, batch = picked
    keys = config_overrides(chosen, batch, req)
    # The same choices as training-config keys: a config given deepspeed=<this JSON> must say the same, or the
    # engine refuses the JSON's explicit stage/batch/precision (build.py never overrides either side silently).
    print(f"training config keys: {format_overrides(keys)}")
    if args.out:
        try:
            cfg = make_ds_config(
                zero_stage=chosen.zero_stage,
                batch=batch,
                precision=precision,
                offload_optimizer=chosen.offload_optimizer,
                offload_params=chosen.offload_params,
                nvme_path=args.nvme_path,
                hidden_size=shape.hidden_size,
            )
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        Path(args.out).write_text(json.dumps(cfg, indent=2) + "\n")
        print(
            f"wrote {args.out}: train with {shlex.quote(f'deepspeed={args.out}')} plus the keys above "
            "(or let `dsft plan --config X.yaml ...` write a training config with them)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
