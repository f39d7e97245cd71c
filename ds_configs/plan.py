"""``dsft plan``: pick the cheapest ZeRO / offload / batch setup that fits, and write it into the training config.

The generator (``ds_configs.generate``, ``dsft-ds-config``) answers the memory question from a model shape and a
method given as flags; this command asks the training config instead. The model (``model.name_or_path``, only its
``config.json`` is read), the method and its size (LoRA rank and targets, QLoRA bits, virtual tokens), the sequence
length, the global batch and the precision come from ``--config X.yaml`` and its ``key=value`` overrides. It prints
the generator's table and choice, then writes a complete training YAML: the config as loaded, plus the chosen
``zero.*``, ``train.micro_batch_size`` / ``train.grad_accum`` / ``train.global_batch``,
``model.gradient_checkpointing``, ``precision`` and ``data.seq_len``. ``dsft train`` runs it unchanged. The same
choices are printed as ``key=value`` overrides.

Before writing, the planned config is checked the way the engine will check it: ``Config.validate`` for the world
size planned, and ``make_ds_config`` with the config's own ``deepspeed`` JSON if it has one (a user's JSON still
carries the keys dsft does not model; its explicit ZeRO settings restrict the candidates).
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

import yaml

from ds_configs.batch import resolve_batch
from ds_configs.build import make_ds_config, resolve_precision, zero_settings_from_json
from ds_configs.generate import (
    Candidate,
    Request,
    config_overrides,
    evaluate,
    format_overrides,
    override_value,
    report,
    target_capability,
)
from ds_configs.memory import GiB, shape_from_hf_config
from finetune.config import Config, ConfigError, load_config, to_dict
from finetune.methods import memory_spec

EXAMPLE = """\
example (a tiny local model on 2 CPU ranks; any HF model directory or hub id works the same way):
  python -c "from finetune.tiny import train_tokenizer as t, build_model as b; t('tok'); b('tiny_model', 'tok')"
  dsft plan --config finetune/configs/lora.yaml model.name_or_path=tiny_model \\
      data.train=launch/demo_data/train.jsonl output_dir=runs/tiny-lora train.max_steps=20 \\
      --gpus-per-node 2 --gpu-mem-gib 24 --gpu-arch cpu --seq-len 128 --out planned.yaml
  dsft train lora --config planned.yaml --num-gpus 2

7B LoRA on 4 x A100 80 GB, global batch 64 (only the model's config.json is read):
  dsft plan --config finetune/configs/lora.yaml --model Qwen/Qwen2.5-7B-Instruct \\
      --gpus-per-node 4 --gpu-mem-gib 80 --gpu-arch a100 --seq-len 2048 --global-batch 64 --out planned.yaml
"""


def _config_global_batch(cfg: Config, world: int) -> int | None:
    """The global batch the config implies on ``world`` ranks, or None when it sets no batch key at all."""
    t = cfg.train
    if t.micro_batch_size is None and t.grad_accum is None and t.global_batch is None:
        return None
    try:
        return resolve_batch(
            world_size=world, micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum, global_batch=t.global_batch
        ).global_batch
    except ValueError as e:
        raise ConfigError(f"{e} (world size {world} planned); or give --global-batch") from e


def _agree_with_user_json(cands: list[Candidate], path: str) -> list[Candidate]:
    """Rule out candidates whose ZeRO settings contradict explicit values in the config's own DeepSpeed JSON."""
    fixed = zero_settings_from_json(path)
    out = []
    for c in cands:
        for key, json_key, ours in (
            ("zero_stage", "zero_optimization.stage", c.zero_stage),
            ("offload_optimizer", "zero_optimization.offload_optimizer.device", c.offload_optimizer),
            ("offload_params", "zero_optimization.offload_param.device", c.offload_params),
        ):
            if key in fixed and fixed[key] != ours:
                c = dataclasses.replace(c, fits=False, why=f"deepspeed={path} sets {json_key}={fixed[key]}")
                break
        out.append(c)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The ``dsft plan`` argument parser."""
    p = argparse.ArgumentParser(
        prog="dsft plan",
        description="Pick the cheapest ZeRO / offload / batch setup that fits, and write it into the training config.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLE,
    )
    p.add_argument("--config", required=True, help="the training YAML (finetune/configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the config, e.g. method.lora.r=32")
    p.add_argument("--model", help="plan for this HF model directory or hub id (sets model.name_or_path)")
    hw = p.add_argument_group("hardware")
    hw.add_argument("--gpus-per-node", type=int, required=True, help="GPUs (or CPU ranks) per node")
    hw.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    hw.add_argument("--gpu-mem-gib", type=float, required=True, help="memory per GPU in GiB (e.g. 24, 80)")
    hw.add_argument(
        "--gpu-arch", help="a100, h100, v100, … or a compute capability (8.0); 'cpu' for CPU ranks (default: local)"
    )
    hw.add_argument("--cpu-mem-gib", type=float, help="CPU memory per node in GiB (unchecked if omitted)")
    hw.add_argument("--nvme-path", help="local NVMe directory: enables ZeRO-Infinity (default: zero.nvme_path)")
    tr = p.add_argument_group("training (default: the config's)")
    tr.add_argument("--seq-len", type=int, help="tokens per row (sets data.seq_len)")
    tr.add_argument("--global-batch", type=int, help="rows per optimizer step (sets train.global_batch)")
    out = p.add_argument_group("output")
    out.add_argument("--out", required=True, help="where to write the planned training YAML")
    out.add_argument("--explain", action="store_true", help="memory breakdown of the chosen and every cheaper one")
    return p


def _train_command(method: str, config: str, nodes: int, gpus_per_node: int, overrides: str = "") -> str:
    launch = f"--num-gpus {gpus_per_node}" if nodes == 1 else "--hostfile HOSTFILE --master-addr ADDR"
    return f"dsft train {method} --config {shlex.quote(config)} {launch}" + (f" {overrides}" if overrides else "")


def _header(argv: list[str], req: Request, arch_note: str, chosen: Candidate, method: str, out: str) -> str:
    assert chosen.est is not None
    cpu = f"{req.cpu_mem / GiB:g} GiB CPU memory per node" if req.cpu_mem else "CPU memory not checked"
    lines = [
        f"# Planned by dsft plan for {req.nodes} node(s) x {req.gpus_per_node} GPUs x {req.gpu_mem / GiB:g} GiB, "
        f"{arch_note}, {cpu}:",
        f"#   dsft plan {shlex.join(argv)}",
        f"# Chosen: {chosen.name} (ZeRO-{chosen.zero_stage}, offload optimizer={chosen.offload_optimizer}, "
        f"params={chosen.offload_params}), the cheapest that fits: estimated "
        f"{chosen.est.gpu_with_margin / GiB:.1f} GiB per GPU with margin (ds_configs/memory.py).",
        f"# Train it unchanged (train.global_batch is checked against the world size planned, {req.world}):",
        f"#   {_train_command(method, out, req.nodes, req.gpus_per_node)}",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``dsft plan``; returns 0 when a setup fits and the YAML is written, 2 on bad input or when nothing fits."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_intermixed_args(argv)
    world = args.gpus_per_node * args.nodes
    if args.gpus_per_node < 1 or args.nodes < 1 or args.gpu_mem_gib <= 0:
        print("error: --gpus-per-node, --nodes and --gpu-mem-gib must be positive", file=sys.stderr)
        return 2
    # What the user changed, spelled as overrides: the planned YAML is the config loaded with these plus the choice.
    inputs = list(args.overrides)
    if args.model:
        inputs.append(f"model.name_or_path={override_value(args.model)}")
    if args.seq_len is not None:
        inputs.append(f"data.seq_len={args.seq_len}")
    try:
        cfg = load_config(args.config, inputs)
        if not cfg.model.name_or_path:
            raise ConfigError("model.name_or_path is empty: set it (or --model) to a model directory or hub id")
        global_batch = args.global_batch if args.global_batch is not None else _config_global_batch(cfg, world)
        method = memory_spec(cfg)  # the registry: what the memory model counts for cfg.method
        capability, arch_note = target_capability(args.gpu_arch)
        try:
            precision = resolve_precision(cfg.precision, capability)
        except ValueError as e:
            raise ConfigError(f"precision={cfg.precision} on {arch_note}: {e}") from e
        nvme_path = args.nvme_path or cfg.zero.nvme_path
        try:
            shape = shape_from_hf_config(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"model.name_or_path={cfg.model.name_or_path}: cannot read its config.json ({e}); give a local model "
                "directory or a reachable hub id (--model)"
            ) from e
        req = Request.for_hardware(
            args,
            shape=shape,
            method=method,
            nvme_path=nvme_path,
            seq_len=cfg.data.seq_len,
            micro_batch=None,
            global_batch=global_batch,
            precision=precision,
            checkpointing="auto",
        )
        if global_batch is not None:
            resolve_batch(world_size=world, global_batch=global_batch)  # names train.global_batch if indivisible
        cands = evaluate(req)
        if cfg.deepspeed:
            cands = _agree_with_user_json(cands, cfg.deepspeed)
    except (ConfigError, ValueError) as e:
        print(f"config error: {e}" if isinstance(e, ConfigError) else f"error: {e}", file=sys.stderr)
        return 2

    picked = report(req, cands, arch_note, explain_all=args.explain)
    if picked is None:
        return 2
    chosen, batch = picked
    keys = config_overrides(chosen, batch, req)
    if args.nvme_path:
        keys.setdefault("zero.nvme_path", args.nvme_path)  # remembered even where the choice does not use it
    # The input overrides the plan re-sets (data.seq_len from --seq-len, a train.* batch key) are dropped, not repeated.
    kept = [o for o in inputs if o.split("=", 1)[0].strip() not in keys]
    planned = kept + [f"{k}={override_value(v)}" for k, v in keys.items()]
    try:
        out_cfg = load_config(args.config, planned)
        # The checks the engine runs before it builds anything, for the world size planned.
        checked = out_cfg.validate(world)
        assert checked == batch, f"planned batch {batch} but the config resolves {checked}"
        make_ds_config(
            zero_stage=out_cfg.zero.stage,
            batch=checked,
            precision=precision,
            offload_optimizer=out_cfg.zero.offload_optimizer,
            offload_params=out_cfg.zero.offload_params,
            nvme_path=out_cfg.zero.nvme_path,
            gradient_clipping=out_cfg.train.max_grad_norm,
            user_config=out_cfg.deepspeed,
            hidden_size=shape.hidden_size,
        )
    except ConfigError as e:
        print(f"config error: {e} (the planned config would not train; {args.out} not written)", file=sys.stderr)
        return 2
    except ValueError as e:  # make_ds_config: the config's own DeepSpeed JSON contradicts the plan
        where = f"deepspeed={out_cfg.deepspeed}" if out_cfg.deepspeed else "zero"
        print(f"config error: {where}: {e} ({args.out} not written)", file=sys.stderr)
        return 2

    print(f"planned keys: {format_overrides(keys)}")
    text = _header(argv, req, arch_note, chosen, out_cfg.method.name, args.out)
    text += yaml.safe_dump(to_dict(out_cfg), sort_keys=False, allow_unicode=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(f"wrote {args.out}; train it unchanged:")
    print(f"  {_train_command(out_cfg.method.name, args.out, args.nodes, args.gpus_per_node)}")
    print("or, as overrides of the input config:")
    print(f"  {_train_command(out_cfg.method.name, args.config, args.nodes, args.gpus_per_node, shlex.join(planned))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
