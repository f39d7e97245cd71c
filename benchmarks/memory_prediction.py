"""Predicted vs measured peak GPU memory: does ds_configs.memory hold within ±15 % on a real GPU?

For a ~1.1B Llama (TinyLlama-1.1B's shape, random weights built locally: nothing is downloaded), full fine-tuning
and LoRA (r=16, all linears), ZeRO-2 and ZeRO-3, a few micro batches, with and without gradient checkpointing:
each case runs in its own process (clean allocator and process group), takes 3 DeepSpeed steps on one GPU, and
reports ``torch.cuda.max_memory_allocated`` next to ``ds_configs.memory.estimate(...).gpu`` (the estimate without
the safety margin, which covers what that counter does not see: CUDA context, fragmentation).

    python -m benchmarks.memory_prediction            # the table (skips cleanly without CUDA)
    python -m benchmarks.run --only memory_prediction

On a machine without CUDA, ``run()`` returns a table saying so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from launch.process import free_port as _free_port

# TinyLlama-1.1B: 22 layers, hidden 2048, MLP 5632, 32 heads with 4 KV heads (GQA), vocab 32000.
SHAPE = dict(
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4
)
VOCAB = 32000
SEQ_LEN = 1024
# (method, zero stage, micro batch, gradient checkpointing)
CASES = [
    (method, stage, micro, ckpt)
    for method in ("full", "lora")
    for stage in (2, 3)
    for micro, ckpt in ((1, True), (4, True), (1, False), (2, False))
]
TARGET = 0.15


def measure_case(
    method: str, stage: int, micro: int, ckpt: bool, device: str = "cuda", shape: dict | None = None
) -> dict:
    """Run one case in this process (world size 1) and return predicted and measured bytes.

    ``device="cpu"`` with a small ``shape`` is a smoke test of the same code path; ``measured`` is then None.
    """
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ds_configs import make_ds_config, resolve_batch
    from ds_configs.memory import MethodSpec, estimate, shape_from_hf_config

    shape = shape or SHAPE
    precision = "bf16"
    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, tie_word_embeddings=False, **shape)
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        model_shape = shape_from_hf_config(tmp)
    spec = MethodSpec(method, lora_r=16)
    predicted = estimate(
        model_shape,
        spec,
        zero_stage=stage,
        gpus_per_node=1,
        seq_len=SEQ_LEN,
        micro_batch=micro,
        gradient_checkpointing=ckpt,
        precision=precision,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if method == "lora":
            model.enable_input_require_grads()
    cfg = make_ds_config(
        zero_stage=stage,
        batch=resolve_batch(world_size=1, micro_batch_size=micro, grad_accum=1),
        precision=precision,
        # torch_adam: no JIT build of FusedAdam needed; its states are the same 8 bytes/param.
        optimizer={"type": "AdamW", "params": {"lr": 1e-5, "torch_adam": True}},
        hidden_size=model_shape.hidden_size,
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=cfg
    )
    on_gpu = device == "cuda"
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    ids = torch.randint(0, VOCAB, (micro, SEQ_LEN), device=engine.device)
    for _ in range(3):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    measured = torch.cuda.max_memory_allocated() if on_gpu else None
    return {
        "method": method,
        "zero_stage": stage,
        "micro_batch": micro,
        "checkpointing": ckpt,
        "predicted": predicted.gpu,
        "parts": predicted.parts_gpu,
        "measured": measured,
        "params": model_shape.total_params,
    }


def run() -> dict:
    """The benchmark table: one subprocess per case on the local GPU; a 'no CUDA device' table otherwise."""
    import torch

    title = "Predicted vs measured peak GPU memory (ds_configs.memory, ~1.1B Llama, 1 GPU)"
    if not torch.cuda.is_available():
        return {
            "title": title,
            "markdown": "| status |\n|---|\n| skipped: no CUDA device (run `python -m benchmarks.memory_prediction` on a GPU) |",
            "data": {"skipped": "no CUDA device"},
        }
    rows = []
    for method, stage, micro, ckpt in CASES:
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0"}
        env.update(WORLD_SIZE="1", LOCAL_RANK="0")
        case = json.dumps([method, stage, micro, ckpt])
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.memory_prediction", "--case", case],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            tail = (proc.stderr or proc.stdout)[-300:].replace("\n", " ").replace("|", "/")
            rows.append(
                {"method": method, "zero_stage": stage, "micro_batch": micro, "checkpointing": ckpt, "error": tail}
            )
            continue
        rows.append(json.loads(lines[-1][len("RESULT ") :]))
    gib = 1024**3
    md = [
        "| method | ZeRO | micro | ckpt | predicted GiB | measured GiB | error | within ±15% |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        head = f"| {r['method']} | {r['zero_stage']} | {r['micro_batch']} | {'on' if r['checkpointing'] else 'off'} |"
        if "error" in r:
            md.append(f"{head} - | - | failed: {r['error']} | - |")
            continue
        err = r["predicted"] / r["measured"] - 1
        r["relative_error"] = err
        ok = "yes" if abs(err) <= TARGET else "no"
        md.append(f"{head} {r['predicted'] / gib:.2f} | {r['measured'] / gib:.2f} | {err:+.1%} | {ok} |")
    return {"title": title, "markdown": "\n".join(md), "data": {"seq_len": SEQ_LEN, "rows": rows}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", help='internal: one case as JSON ["full", 2, 1, true]')
    args = parser.parse_args(argv)
    if args.case:
        method, stage, micro, ckpt = json.loads(args.case)
        print("RESULT " + json.dumps(measure_case(method, stage, micro, ckpt)), flush=True)
        return 0
    result = run()
    print(f"## {result['title']}\n\n{result['markdown']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
