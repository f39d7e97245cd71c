"""``dsft doctor``: will this config learn (before training), and what went wrong (after)?

    dsft doctor --config finetune/configs/lora.yaml model.name_or_path=DIR data.train=PREFIX output_dir=OUT
    dsft doctor runs/lora                 # a run directory: reads metrics.jsonl, summary.json, config.json

Before training it checks what fails a run silently, in the order a fine-tuner would (the classic checklist: check
the data and labels, check what trains, overfit one batch):

- the data against the tokenizer and model (``finetune.data.check_sources`` -> ``finetune.preflight``);
- the share of tokens that carry loss, with one sample printed with its trained spans in ``[[...]]``;
- samples longer than ``data.seq_len`` (``finetune.data.length_report``), pad and eos tokens;
- the trainable parameter count (the method's ``prepare`` on a meta-device model: no weights, any size);
- the learning rate against the method's usual range (``get_method(name).lr_range``);
- on the real model, on one real batch: that gradients reach every trainable tensor (PEFT + gradient checkpointing
  needs input grads), the largest activation against fp16's range, and **overfit-one-batch**: ``OVERFIT_STEPS``
  AdamW steps at ``train.lr`` on that batch, in-process (plain torch, no DeepSpeed), on CPU or the local GPU. A
  setup that cannot memorise one batch cannot learn a dataset; the loss says which way it fails.

After training it names what the rows of ``metrics.jsonl`` show, each with its fix: a NaN after a climbing grad
norm (the learning rate), an fp16 loss-scale collapse, a loss flat from step 1, eval loss rising while train loss
falls (overfitting), skipped steps, a run that never finished.

Output: one line per finding, ``OK`` / ``WARN`` / ``FAIL`` (``SKIP``: a check that could not run, and why), then
what to do. ``--json`` prints the same as one JSON object. Exit status: 0 no FAIL, 1 at least one FAIL, 2 a bad
invocation (unreadable config, no such run directory).

The package: ``report`` (findings, levels, exit codes, printing), ``before`` (the data, loss-mask, length, pad/eos,
trainable and lr checks), ``model_checks`` (gradients, fp16 range and overfit-one-batch on the real model),
``after`` (the run diagnosis) and ``cli`` (``build_parser``, ``main``); ``python -m finetune.doctor`` runs ``main``.
"""

from __future__ import annotations

from finetune.doctor.after import (
    FLAT_FALL,
    GRAD_CLIMB_FACTOR,
    MIN_LOSS_SCALE,
    OVERFIT_EVAL_RISE,
    diagnose_run,
    read_rows,
)
from finetune.doctor.before import (
    LOW_LOSS_SHARE,
    LR_FAIL_FACTOR,
    SAMPLE_CHARS,
    SCAN_SAMPLES,
    check_config,
    get_lr_range,
    render_sample,
)
from finetune.doctor.cli import build_parser, main
from finetune.doctor.model_checks import (
    DIVERGE_RATIO,
    FP16_HEADROOM,
    FP16_MAX,
    OVERFIT_FLAT_RATIO,
    OVERFIT_PASS_RATIO,
    OVERFIT_STEPS,
    check_on_model,
    diagnose_overfit,
)
from finetune.doctor.report import (
    EXIT_OK,
    EXIT_PROBLEM,
    EXIT_USAGE,
    FAIL,
    OK,
    SKIP,
    WARN,
    Finding,
    Report,
    print_report,
)

__all__ = [
    "DIVERGE_RATIO",
    "EXIT_OK",
    "EXIT_PROBLEM",
    "EXIT_USAGE",
    "FAIL",
    "FLAT_FALL",
    "FP16_HEADROOM",
    "FP16_MAX",
    "GRAD_CLIMB_FACTOR",
    "LOW_LOSS_SHARE",
    "LR_FAIL_FACTOR",
    "MIN_LOSS_SCALE",
    "OK",
    "OVERFIT_EVAL_RISE",
    "OVERFIT_FLAT_RATIO",
    "OVERFIT_PASS_RATIO",
    "OVERFIT_STEPS",
    "SAMPLE_CHARS",
    "SCAN_SAMPLES",
    "SKIP",
    "WARN",
    "Finding",
    "Report",
    "build_parser",
    "check_config",
    "check_on_model",
    "diagnose_overfit",
    "diagnose_run",
    "get_lr_range",
    "main",
    "print_report",
    "read_rows",
    "render_sample",
]
