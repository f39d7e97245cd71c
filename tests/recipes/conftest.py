"""Recipe tests: run the real ``deepspeed`` launcher on CPU (gloo) with the tiny Llama and a learnable tiny task.

The task: each sample counts upward through 64 token ids (id t is followed by t+1, wrapping), 16-47 tokens long,
so a model that learns "next = previous + 1" drives the loss far below ln(vocab) within a few dozen steps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from launch.process import free_port as _free_port

REPO = Path(__file__).resolve().parents[2]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
SEQ_LEN = 128


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def write_counting_data(prefix: Path, n: int, seed: int) -> str:
    """An mmap dataset of ``n`` counting samples (see module docstring)."""
    from data_tools.indexed import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(str(prefix), dtype=np.uint16)
    for _ in range(n):
        length, start = int(rng.integers(16, 48)), int(rng.integers(0, 64))
        builder.add_document((np.arange(start, start + length) % 64 + 10).astype(np.uint16))
    builder.finalize()
    return str(prefix)


@pytest.fixture(scope="session")
def counting_data(tmp_path_factory) -> dict[str, str]:
    """{"train": prefix (512 samples), "eval": prefix (32 samples)}."""
    d = tmp_path_factory.mktemp("counting")
    return {"train": write_counting_data(d / "train", 512, 0), "eval": write_counting_data(d / "eval", 32, 1)}


def recipe_cmd(
    recipe: str, nproc: int, model_dir, data: dict, out: Path, *overrides: str, launcher: str = "deepspeed"
) -> list[str]:
    """The command line a user types (``deepspeed``, ``torchrun`` or plain ``python``), with tiny-run overrides."""
    port = str(_free_port())  # other tests may launch at the same time: never share 29500
    if launcher == "deepspeed":
        prefix = [DEEPSPEED, "--num_gpus", str(nproc), "--master_port", port]
    elif launcher == "torchrun":
        prefix = [TORCHRUN, "--nproc_per_node", str(nproc), "--master_port", port]
    else:
        assert nproc == 1, "plain python runs one rank"
        prefix = [sys.executable]
    return [
        *prefix,
        f"finetune/{recipe}.py",
        "--config",
        f"finetune/configs/{recipe}.yaml",
        f"model.name_or_path={model_dir}",
        f"data.train={data['train']}",
        f"data.eval={data.get('eval') or 'null'}",
        f"output_dir={out}",
        f"data.seq_len={SEQ_LEN}",
        "precision=fp32",
        "train.warmup=2",
        "train.save_every=0",
        "model.gradient_checkpointing=false",
        "train.log_every=1",  # a loss per step, for the curve comparisons
        *overrides,
    ]


def launch(cmd: list[str], out: Path) -> subprocess.Popen:
    """Start the launcher in its own session (so a test can SIGKILL the whole job); output to ``out``.log."""
    out.parent.mkdir(parents=True, exist_ok=True)
    log = open(f"{out}.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def run_recipe(
    recipe: str,
    model_dir,
    data: dict,
    out: Path,
    *overrides: str,
    nproc: int = 2,
    timeout: int = 600,
    launcher="deepspeed",
):
    """Run a recipe to completion; fail the test with the log tail when it does not exit 0.

    Also fails if the job left DeepSpeed's CPU all-reduce buffers in /dev/shm (66 MB of RAM per rank per launch).
    """
    cmd = recipe_cmd(recipe, nproc, model_dir, data, out, *overrides, launcher=launcher)
    proc = launch(cmd, out)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_job(proc)
        rc = "timeout"
    if rc != 0:
        tail = Path(f"{out}.log").read_text(errors="replace")[-4000:]
        pytest.fail(f"{recipe} exited {rc}; log tail:\n{tail}")
    if "--master_port" in cmd:
        port = cmd[cmd.index("--master_port") + 1]
        assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")), "leaked /dev/shm buffers"
    return out


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every rank (they share the launcher's session / process group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until ``path`` exists (fails if the job ends first)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"job ended (rc={proc.returncode}) before {path} appeared")
        if time.monotonic() > deadline:
            kill_job(proc)
            pytest.fail(f"{path} did not appear within {timeout}s")
        time.sleep(0.05)


def metrics(out: Path, split: str = "train") -> list[dict]:
    """Rows of ``out/metrics.jsonl`` for ``split``."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("split") == split]


def losses(out: Path) -> dict[int, float]:
    """step -> train loss."""
    return {r["step"]: r["loss"] for r in metrics(out)}


def reloaded_eval_loss(
    out: Path, base_dir, eval_prefix: str, method: str, model_dir: Path | None = None, packing: str | None = None
) -> float:
    """Mean target-token eval loss of ``out/final`` (or ``model_dir``) reloaded the way a user would, computed over
    both ranks' eval shares exactly as the engine's evaluation does.

    ``packing`` overrides the method's row layout: ``method="full", packing="padding"`` scores a base model on the same
    padded batches a prefix / prompt adapter is scored on (packed rows differ from padded ones by ~1e-4 relative)."""
    import torch
    from transformers import AutoModelForCausalLM

    from data_tools.loader import build_dataloader

    path = model_dir or out / "final"
    if method == "full":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        from peft import PeftModel

        kwargs = {}
        if method == "qlora":  # the adapter was trained against the 4-bit base: evaluate it on the same base
            from transformers import BitsAndBytesConfig

            kwargs["device_map"] = {"": "cpu"}
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32,
            )
        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, **kwargs)
        model = PeftModel.from_pretrained(base, path)
    model.eval()
    packing = packing or ("padding" if method in ("prefix", "prompt") else "packed")
    total, tokens = 0.0, 0
    for rank in range(2):
        loader = build_dataloader(
            eval_prefix,
            seq_len=SEQ_LEN,
            micro_batch_size=2,
            rank=rank,
            world_size=2,
            seed=42,
            packing=packing,
            attention="mask",
            shuffle=False,
            drop_last=False,
            pad_id=3,
        )
        for batch in loader:
            batch.pop("num_real_tokens")
            if method in ("prefix", "prompt"):
                batch.pop("position_ids", None)
            with torch.no_grad():
                total += float(model(**batch, num_items_in_batch=torch.tensor(1.0)).loss)
            tokens += int((batch["labels"][:, 1:] != -100).sum())
    return total / tokens
