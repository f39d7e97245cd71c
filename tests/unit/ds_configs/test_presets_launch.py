"""Every preset, filled by make_ds_config, initializes DeepSpeed and trains under `deepspeed --num_gpus 2` on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ds_configs.build import PRESETS
from launch.process import free_port as _free_port

SCRIPT = Path(__file__).with_name("presets_step.py")
REPO = Path(__file__).resolve().parents[3]


def test_every_preset_initializes_and_steps_on_two_cpu_ranks(tiny_llama_dir, tmp_path):
    from deepspeed.ops.op_builder import AsyncIOBuilder

    out = tmp_path / "results.json"
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [str(launcher), "--num_gpus", "2", "--master_port", str(_free_port()), str(SCRIPT)]
    cmd += [str(tiny_llama_dir), str(tmp_path / "nvme"), str(out)]
    # First run compiles DeepSpeedCPUAdam (~70 s, cached in ~/.cache/torch_extensions); then ~30 s.
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert proc.returncode == 0 and out.exists(), proc.stdout[-4000:] + proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert set(results) == set(PRESETS)
    aio_ok = AsyncIOBuilder().is_compatible(verbose=False)
    for name, res in results.items():
        if res["status"] == "skipped":
            # Only NVMe may be skipped, only where DeepSpeed's libaio op cannot build, and never in CI (.ci/run
            # installs libaio-dev, so a skip there means the install broke).
            assert name == "zero3_nvme" and not aio_ok and not os.environ.get("CI"), res
            continue
        assert res["status"] == "ok", f"{name}: {res.get('error')}\n{res.get('tb')}"
        first, *_, last = res["losses"]
        assert last < first, f"{name}: loss did not go down on a repeated batch: {res['losses']}"
    ran = {n: r["precision"] for n, r in results.items() if r["status"] == "ok"}
    assert {"fp32", "bf16"} <= set(ran.values())
