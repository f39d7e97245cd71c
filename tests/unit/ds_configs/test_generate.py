"""Generator choices on the issue's worked examples (explicit shapes, no downloads), failures, presets."""

from __future__ import annotations

import json

import pytest

from ds_configs import make_ds_config, resolve_batch
from ds_configs.build import AIO_SECTION, PRESET_DIR, PRESETS, preset_path
from ds_configs.generate import main, preset_json

LLAMA7B = ["--params", "6738415616", "--layers", "32", "--hidden", "4096", "--intermediate", "11008"]
LLAMA13B = ["--params", "13015864320", "--layers", "40", "--hidden", "5120", "--intermediate", "13824"]


def run(args, capsys):
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_7b_lora_on_one_24gb_gpu(tmp_path, capsys):
    out = tmp_path / "ds.json"
    args = LLAMA7B + ["--method", "lora", "--gpus-per-node", "1", "--gpu-mem-gib", "24", "--seq-len", "2048"]
    rc, text, _ = run(args + ["--global-batch", "16", "--gpu-arch", "a10", "--out", str(out)], capsys)
    assert rc == 0, text
    # One GPU: ZeRO partitions nothing, so plain data parallel is the cheapest; the 16-bit base (12.6 GiB) fits.
    assert "chosen: zero0" in text
    cfg = json.loads(out.read_text())
    assert cfg["zero_optimization"]["stage"] == 0
    assert cfg["bf16"]["enabled"] is True  # A10 is Ampere (8.6)
    micro, accum = cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]
    assert micro * accum == cfg["train_batch_size"] == 16
    assert micro == 4 and "gradient checkpointing ON" in text


def test_13b_full_on_eight_80gb_gpus(tmp_path, capsys):
    out = tmp_path / "ds.json"
    args = LLAMA13B + ["--method", "full", "--gpus-per-node", "8", "--gpu-mem-gib", "80", "--seq-len", "2048"]
    rc, text, _ = run(args + ["--global-batch", "128", "--gpu-arch", "h100", "--out", str(out)], capsys)
    assert rc == 0, text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| zero")}
    # 20 bytes/param replicated (244 GiB) and ZeRO-1's 4P + 16P/8 (≈75 GiB + activations) do not fit in 80 GiB.
    assert rows["zero0"].rstrip("|").split("|")[-2].strip() == "no"
    assert rows["zero1"].rstrip("|").split("|")[-2].strip() == "no"
    assert "chosen: zero2" in text and "cheaper ones do not: zero0, zero1" in text
    cfg = json.loads(out.read_text())
    assert cfg["zero_optimization"]["stage"] == 2 and "offload_optimizer" not in cfg["zero_optimization"]
    assert cfg["train_batch_size"] == 128
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 5120 * 5120  # sized from the hidden size


def test_v100_gets_fp16_with_dynamic_loss_scaling(tmp_path, capsys):
    out = tmp_path / "ds.json"
    args = LLAMA7B + ["--method", "qlora", "--gpus-per-node", "1", "--gpu-mem-gib", "32", "--seq-len", "1024"]
    rc, text, _ = run(args + ["--gpu-arch", "v100", "--out", str(out)], capsys)
    assert rc == 0, text
    cfg = json.loads(out.read_text())
    assert cfg["fp16"]["enabled"] is True and cfg["fp16"]["loss_scale"] == 0 and cfg["bf16"]["enabled"] is False


def test_qlora_zero3_only_with_4bit_as_the_engine_accepts(capsys):
    base = LLAMA7B + ["--method", "qlora", "--gpus-per-node", "2", "--gpu-mem-gib", "24", "--seq-len", "1024"]
    rc, text, _ = run(base + ["--quant-bits", "8"], capsys)
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| zero")}
    assert "4-bit QLoRA weights only" in rows["zero3"] and "cannot be offloaded" in rows["zero3_offload"]
    rc, text, _ = run(base, capsys)
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| zero")}
    assert "4-bit QLoRA weights only" not in rows["zero3"]


def test_offload_when_gpus_are_too_small_and_cpu_limit_is_respected(tmp_path, capsys):
    base = LLAMA13B + ["--method", "full", "--gpus-per-node", "2", "--gpu-mem-gib", "48", "--seq-len", "1024"]
    out = tmp_path / "ds.json"
    rc, text, _ = run(base + ["--out", str(out)], capsys)
    assert rc == 0 and "chosen: zero2_offload" in text  # 13B full on 2×48 GB needs optimizer offload
    zero = json.loads(out.read_text())["zero_optimization"]
    # What the choice means: optimizer states in pinned CPU memory, parameters on the GPUs.
    assert zero["stage"] == 2 and zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert "offload_param" not in zero
    rc, text, _ = run(base + ["--cpu-mem-gib", "64"], capsys)
    assert rc == 2, text  # ~260 GiB of CPU state does not fit in 64 GiB
    assert "nothing fits" in text and "CPU memory per node" in text and "--nvme-path" in text


def test_nothing_fits_says_what_would(capsys):
    args = ["--params", "70e9", "--layers", "80", "--hidden", "8192", "--heads", "64", "--kv-heads", "8"]
    args += ["--method", "full", "--gpus-per-node", "1", "--gpu-mem-gib", "24", "--cpu-mem-gib", "256"]
    rc, text, _ = run(args + ["--seq-len", "4096"], capsys)
    assert rc == 2
    assert "nothing fits. What would:" in text
    # With full offload the GPU side fits (~11 GiB) but 70B × 18 bytes of states needs ~1.9 TiB of CPU memory.
    assert "GiB CPU memory per node (zero3_offload" in text and "GPUs with" not in text
    assert "nodes × 1 GPUs per node" in text and "--nvme-path" in text


def test_nvme_offload_writes_the_path_buffers_and_aio_settings(tmp_path, capsys):
    args = ["--params", "70e9", "--layers", "80", "--hidden", "8192", "--heads", "64", "--kv-heads", "8"]
    args += ["--method", "full", "--gpus-per-node", "1", "--gpu-mem-gib", "24", "--cpu-mem-gib", "256"]
    out = tmp_path / "ds.json"
    rc, text, _ = run(args + ["--seq-len", "4096", "--nvme-path", "/local_nvme", "--out", str(out)], capsys)
    # 70B with full CPU offload needs ~1.9 TiB of CPU memory (zero3_offload): the optimizer states go to NVMe, the
    # 16-bit parameters stay in CPU memory (~210 GiB per node in all, under the 256 GiB given).
    assert rc == 0 and "chosen: zero3_nvme_opt" in text, text
    cfg = json.loads(out.read_text())
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"] == {
        "device": "nvme",
        "nvme_path": "/local_nvme",
        "pin_memory": True,
        "buffer_count": 4,
        "fast_init": False,
    }
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert cfg["aio"] == AIO_SECTION and cfg["aio"]["intra_op_parallelism"] == 1  # not the ignored "thread_count"


def test_model_from_hf_config_on_cpu_ranks(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "ds.json"
    args = ["--model", str(tiny_llama_dir), "--method", "lora", "--gpus-per-node", "2", "--gpu-mem-gib", "2"]
    rc, text, _ = run(args + ["--seq-len", "64", "--gpu-arch", "cpu", "--explain", "--out", str(out)], capsys)
    assert rc == 0, text
    assert "precision fp32" in text and "model_states" in text  # --explain breakdown
    cfg = json.loads(out.read_text())
    assert cfg["bf16"]["enabled"] is False and cfg["fp16"]["enabled"] is False


def test_bad_inputs_exit_nonzero_with_a_message(capsys):
    rc, _, err = run(
        LLAMA7B
        + ["--gpus-per-node", "2", "--gpu-mem-gib", "80", "--seq-len", "512", "--micro-batch", "3"]
        + ["--global-batch", "16"],
        capsys,
    )
    assert rc == 2 and "train.global_batch=16 is not divisible" in err
    rc, _, err = run(
        LLAMA7B
        + [
            "--gpus-per-node",
            "1",
            "--gpu-mem-gib",
            "80",
            "--seq-len",
            "512",
            "--gpu-arch",
            "v100",
            "--precision",
            "bf16",
        ],
        capsys,
    )
    assert rc == 2 and "bf16 needs compute capability" in err


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_committed_presets_equal_generator_output(name):
    assert preset_path(name).read_text() == preset_json(name), (
        f"regenerate: python -m ds_configs.generate --write-presets {PRESET_DIR}"
    )


def test_write_presets_and_single_preset(tmp_path, capsys):
    assert main(["--write-presets", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.json" for n in PRESETS)
    one = tmp_path / "one.json"
    assert main(["--preset", "zero2_offload", "--out", str(one)]) == 0
    assert json.loads(one.read_text())["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_fills_and_deepspeed_parses_it(name, tmp_path):
    from deepspeed.runtime.config import DeepSpeedConfig

    stage, opt, par, _ = PRESETS[name]
    # DeepSpeedConfig without torch.distributed sees world size 1.
    batch = resolve_batch(world_size=1, micro_batch_size=2, global_batch=8)
    nvme = str(tmp_path) if "nvme" in (opt, par) else None
    cfg = make_ds_config(
        zero_stage=stage,
        batch=batch,
        precision="bf16",
        offload_optimizer=opt,
        offload_params=par,
        nvme_path=nvme,
        user_config=preset_path(name),
    )
    parsed = DeepSpeedConfig(cfg)
    assert parsed.zero_config.stage == stage
    assert parsed.train_batch_size == 8 and parsed.gradient_accumulation_steps == 4
    assert parsed.zero_config.offload_optimizer is None or parsed.zero_config.offload_optimizer.device == opt
    if nvme:
        assert str(parsed.zero_config.offload_param.nvme_path) == nvme
        with pytest.raises(ValueError, match="pass nvme_path"):
            make_ds_config(
                zero_stage=stage,
                batch=batch,
                precision="bf16",
                offload_optimizer=opt,
                offload_params=par,
                user_config=preset_path(name),
            )


def test_readme_worked_examples_show_the_current_output(tmp_path, capsys):
    import re
    import shlex
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[3] / "docs" / "plan.md").read_text()
    section = doc[doc.index("<!-- section:generator -->") : doc.index("<!-- /section:generator -->")]
    examples = re.findall(r"```text\n\$ (python -m ds_configs\.generate .*?--out \S+)\n(.*?)```", section, flags=re.S)
    assert len(examples) == 1
    for command, shown in examples:
        args = shlex.split(command.replace("\\\n", " "))[3:]
        args[args.index("--out") + 1] = str(tmp_path / "ds.json")
        assert main(args) == 0
        printed = capsys.readouterr().out.strip().splitlines()[:-1]  # last line: "wrote <path>"
        assert printed == shown.strip().splitlines()[:-1], "README example is stale: rerun the command and paste"


def test_global_batch_not_divisible_by_gpus_is_reported(capsys):
    rc, _, err = run(
        LLAMA7B + ["--gpus-per-node", "4", "--gpu-mem-gib", "80", "--seq-len", "512", "--global-batch", "10"], capsys
    )
    assert rc == 2 and "train.global_batch=10 is not divisible" in err
