"""Run by test_engine.py in a fresh process: a NaN loss at step 2 must leave the weights finite on every ZeRO stage
and precision the CPU runs (fp32, bf16), with the engine's own ``skip_non_finite_steps`` applied.

Usage: python nan_step_script.py MODEL_DIR OUT_JSON   (a world of one; prints nothing useful, writes OUT_JSON)
"""

import json
import sys

import deepspeed
import torch
from transformers import AutoModelForCausalLM

from finetune import distributed
from finetune.engine import skip_non_finite_steps


def finite_weights(engine) -> bool:
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        return all(bool(torch.isfinite(p).all()) for p in params)


def main(model_dir: str, out_json: str) -> None:
    distributed.init()
    results = {}
    for stage in (0, 1, 2, 3):
        for precision in ("fp32", "bf16"):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            config = {
                "train_micro_batch_size_per_gpu": 2,
                "gradient_accumulation_steps": 1,
                "gradient_clipping": 1.0,
                "zero_optimization": {"stage": stage},
                "steps_per_print": 10**9,
                "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
                "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},
            }
            engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
            skip_non_finite_steps(engine)
            ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
            steps = []
            for poison in (False, True, False):
                loss = engine(input_ids=ids, labels=ids).loss
                engine.backward(loss * float("nan") if poison else loss)
                engine.step()
                steps.append({"applied": engine.was_step_applied(), "finite": finite_weights(engine)})
            results[f"zero{stage}-{precision}"] = steps
            engine.destroy()
    with open(out_json, "w") as fh:
        json.dump(results, fh, indent=2)
    distributed.destroy()  # gloo can abort at exit without it


if __name__ == "__main__":
    main(*sys.argv[1:3])
