"""``dsft plan`` speaks the training config: every key it writes or prints loads and validates, its 7B choice is the
generator's, the generator's JSON trains next to the keys it prints, and both README paths train on 2 CPU ranks."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ds_configs import generate, plan
from ds_configs.build import make_ds_config, preset_path
from finetune.config import describe, load_config, to_dict
from launch.process import free_port
from tests.recipes.conftest import _env, write_counting_data

REPO = Path(__file__).resolve().parents[3]
DSFT = str(Path(sys.executable).with_name("dsft"))
LEAF_KEYS = {key for key, _, _ in describe()}
# Llama-2-7B's shape: the numbers the generator's README example passes as flags.
LLAMA7B_FLAGS = ["--params", "6738415616", "--layers", "32", "--hidden", "4096", "--intermediate", "11008"]
LLAMA7B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}


def run(main, args, capsys) -> tuple[int, str, str]:
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def line_after(text: str, prefix: str) -> list[str]:
    """The shell words of the printed line that starts with ``prefix``."""
    (line,) = [ln for ln in text.splitlines() if ln.strip().startswith(prefix)]
    return shlex.split(line.strip()[len(prefix) :])


def command_after(text: str, prefix: str) -> list[str]:
    """The words of the command printed on the line after the one that starts with ``prefix``."""
    lines = text.splitlines()
    i = next(i for i, ln in enumerate(lines) if ln.startswith(prefix))
    return shlex.split(lines[i + 1])


def assert_keys_exist(keys: list[str]) -> None:
    for arg in keys:
        key = arg.split("=", 1)[0]
        assert key in LEAF_KEYS, f"printed key {key} is not a training-config key"


@pytest.fixture(scope="module")
def llama7b_dir(tmp_path_factory) -> Path:
    """A directory holding only a Llama-2-7B config.json: the shape, nothing to download."""
    d = tmp_path_factory.mktemp("llama7b")
    (d / "config.json").write_text(json.dumps(LLAMA7B_CONFIG))
    return d


@pytest.fixture(scope="module")
def counting(tmp_path_factory) -> dict[str, str]:
    """The recipe tests' counting task (tests/recipes/conftest.py), smaller: 128 train / 16 eval samples."""
    d = tmp_path_factory.mktemp("counting")
    return {"train": write_counting_data(d / "train", 128, 0), "eval": write_counting_data(d / "eval", 16, 1)}


@pytest.mark.parametrize(
    "yaml_name, method, hardware, precision",
    [
        ("full.yaml", "full", ["--gpus-per-node", "4", "--nodes", "2", "--gpu-arch", "h100"], "bf16"),
        ("lora.yaml", "lora", ["--gpus-per-node", "2", "--gpu-arch", "a100"], "bf16"),
        ("qlora.yaml", "qlora", ["--gpus-per-node", "2", "--gpu-arch", "a100"], "bf16"),
        ("ptuning_v2.yaml", "prefix", ["--gpus-per-node", "2", "--gpu-arch", "v100"], "fp16"),
        ("prompt_tuning.yaml", "prompt", ["--gpus-per-node", "2", "--gpu-arch", "cpu"], "fp32"),
    ],
)
def test_every_key_plan_writes_or_prints_loads_and_validates(
    yaml_name, method, hardware, precision, tiny_llama_dir, tmp_path, capsys
):
    config = f"finetune/configs/{yaml_name}"
    inputs = [f"model.name_or_path={tiny_llama_dir}", "train.lr=3e-4"]
    out = tmp_path / "planned.yaml"
    args = ["--config", config, *inputs, *hardware, "--gpu-mem-gib", "24", "--out", str(out)]
    rc, text, err = run(plan.main, args, capsys)
    assert rc == 0, text + err
    world = int(hardware[1]) * (int(hardware[hardware.index("--nodes") + 1]) if "--nodes" in hardware else 1)

    written = load_config(out)  # unknown keys or wrong types raise here
    batch = written.validate(world)
    assert written.method.name == method and written.precision == precision
    assert written.train.lr == 3e-4 and written.model.name_or_path == str(tiny_llama_dir)  # the input is kept
    shown = f"batch: micro {batch.micro_batch_size} × accumulation {batch.grad_accum} × {world} GPUs"
    assert shown in text
    header = [ln for ln in out.read_text().splitlines() if ln.startswith("#")]
    assert f"dsft plan {shlex.join(args)}" in header[1] and f"x {hardware[1]} GPUs x 24 GiB" in header[0]

    # The printed keys, applied to the input config the same way, give exactly the written YAML.
    keys = line_after(text, "planned keys:")
    assert_keys_exist(keys)
    assert {k.split("=")[0] for k in keys} >= {"zero.stage", "train.micro_batch_size", "model.gradient_checkpointing"}
    assert to_dict(load_config(config, inputs + keys)) == to_dict(written)
    # ... and so does the printed `dsft train` command that uses overrides instead of the file.
    cmd = command_after(text, "or, as overrides")
    assert cmd[:5] == ["dsft", "train", method, "--config", config]
    overrides = [w for w in cmd[5:] if "=" in w]
    assert_keys_exist(overrides)
    assert to_dict(load_config(config, overrides)) == to_dict(written)
    train_cmd = command_after(text, "wrote ")
    assert train_cmd[:5] == ["dsft", "train", method, "--config", str(out)]


def test_7b_plan_picks_what_the_generator_picks(llama7b_dir, tmp_path, capsys):
    hw = ["--gpus-per-node", "1", "--gpu-mem-gib", "24", "--gpu-arch", "a10", "--seq-len", "2048"]
    hw += ["--global-batch", "16"]
    rc, old, _ = run(generate.main, [*LLAMA7B_FLAGS, "--method", "lora", "--lora-r", "16", *hw], capsys)
    assert rc == 0, old
    out = tmp_path / "planned.yaml"
    # lora.yaml: LoRA r=16 on all linears, as the generator's flags say.
    args = ["--config", "finetune/configs/lora.yaml", f"model.name_or_path={llama7b_dir}", *hw, "--out", str(out)]
    rc, new, err = run(plan.main, args, capsys)
    assert rc == 0, new + err

    def summary(text: str) -> list[str]:
        return [ln for ln in text.splitlines() if ln.startswith(("|", "chosen:", "batch:", "6.74B params"))]

    assert summary(new) == summary(old) and len(summary(new)) == 14  # header, 11 table lines, chosen, batch
    assert "chosen: zero0" in new  # one 24 GB GPU: ZeRO partitions nothing, plain data parallel is cheapest
    cfg = load_config(out)
    cfg.validate(1)
    assert (cfg.zero.stage, cfg.zero.offload_optimizer, cfg.zero.offload_params) == (0, "none", "none")
    assert (cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.global_batch) == (4, 4, 16)
    assert cfg.model.gradient_checkpointing is True and cfg.precision == "bf16" and cfg.data.seq_len == 2048
    # The generator's own advice names the same training-config keys and values.
    assert line_after(old, "training config keys:") == line_after(new, "planned keys:")


def test_generator_json_agrees_with_the_config_its_keys_give(llama7b_dir, tmp_path, capsys):
    """The README's 7B LoRA example: `--out ds.json` + `deepspeed=ds.json` used to stop with '"zero_optimization.stage"
    is 0 but the training config gives zero_stage = 2'. With the keys the generator prints, the engine's merge takes
    the JSON as is."""
    ds_json = tmp_path / "ds.json"
    args = [*LLAMA7B_FLAGS, "--method", "lora", "--gpus-per-node", "1", "--gpu-mem-gib", "24", "--gpu-arch", "a10"]
    rc, text, _ = run(
        generate.main, [*args, "--seq-len", "2048", "--global-batch", "16", "--out", str(ds_json)], capsys
    )
    assert rc == 0, text
    assert "train.gradient_checkpointing" not in text and "ON (model.gradient_checkpointing=true)" in text
    keys = line_after(text, "training config keys:")
    assert_keys_exist(keys)
    base = ["finetune/configs/lora.yaml", [f"model.name_or_path={llama7b_dir}", f"deepspeed={ds_json}"]]

    def engine_ds_config(overrides: list[str]) -> dict:
        cfg = load_config(base[0], base[1] + overrides)
        batch = cfg.validate(1)
        return make_ds_config(  # what finetune/engine.py builds from the config
            zero_stage=cfg.zero.stage,
            batch=batch,
            precision="bf16",  # a10: what resolve_precision gives the engine for precision=auto
            offload_optimizer=cfg.zero.offload_optimizer,
            offload_params=cfg.zero.offload_params,
            nvme_path=cfg.zero.nvme_path,
            gradient_clipping=cfg.train.max_grad_norm,
            user_config=cfg.deepspeed,
            hidden_size=4096,
        )

    with pytest.raises(ValueError, match='"zero_optimization.stage" is 0 but the training config gives zero_stage = 2'):
        engine_ds_config([])  # the user's report: the JSON alone contradicts lora.yaml
    merged = engine_ds_config(keys)
    written = json.loads(ds_json.read_text())
    assert merged["zero_optimization"] == written["zero_optimization"]
    assert (merged["train_batch_size"], merged["gradient_accumulation_steps"]) == (16, 4)


def test_plan_keeps_to_the_configs_own_deepspeed_json(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "planned.yaml"
    user_json = preset_path("zero3_offload")  # a user JSON with explicit stage 3 + CPU offload of both
    args = ["--config", "finetune/configs/lora.yaml", f"model.name_or_path={tiny_llama_dir}", f"deepspeed={user_json}"]
    rc, text, err = run(plan.main, [*args, "--gpus-per-node", "2", "--gpu-mem-gib", "24", "--out", str(out)], capsys)
    assert rc == 0, text + err
    assert f"deepspeed={user_json} sets zero_optimization.stage=3" in text  # zero0 would fit, but the JSON says 3
    cfg = load_config(out)
    cfg.validate(2)
    assert (cfg.zero.stage, cfg.zero.offload_optimizer, cfg.zero.offload_params) == (3, "cpu", "cpu")
    assert cfg.deepspeed == str(user_json)  # kept: its other keys still apply


def test_bad_input_is_one_line_and_exit_2(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "planned.yaml"
    hw = ["--gpus-per-node", "2", "--gpu-mem-gib", "24", "--out", str(out)]
    rc, _, err = run(plan.main, ["--config", "finetune/configs/lora.yaml", "model.name_or_path=", *hw], capsys)
    assert rc == 2 and err.startswith("config error: model.name_or_path is empty")
    tiny = f"model.name_or_path={tiny_llama_dir}"
    rc, _, err = run(
        plan.main, ["--config", "finetune/configs/lora.yaml", tiny, "precision=fp16", "--gpu-arch", "cpu", *hw], capsys
    )
    assert rc == 2 and "config error: precision=fp16 on CPU ranks" in err
    rc, _, err = run(plan.main, ["--config", "finetune/configs/lora.yaml", tiny, "--global-batch", "5", *hw], capsys)
    assert rc == 2 and "train.global_batch=5 is not divisible" in err
    rc, _, err = run(plan.main, ["--config", "finetune/configs/lora.yaml", "trian.lr=1", *hw], capsys)
    assert rc == 2 and "unknown key 'trian' (did you mean 'train'?)" in err
    assert not out.exists()


def readme_plan_examples(readme: str) -> list[tuple[list[str], list[str]]]:
    """(dsft plan arguments, shown output) for every ```text block of the ds_configs section that runs dsft plan."""
    section = readme[readme.index("<!-- section:ds_configs -->") : readme.index("<!-- /section:ds_configs -->")]
    blocks = re.findall(r"```text\n\$ (dsft plan .*?--out \S+)\n(.*?)```", section, flags=re.S)
    return [(shlex.split(cmd.replace("\\\n", " "))[2:], shown.splitlines()) for cmd, shown in blocks]


def test_readme_plan_example_shows_the_current_output(llama7b_dir, tmp_path, capsys):
    """The README's `dsft plan` example, run as written (its model directory: a Llama-2-7B config.json)."""
    examples = readme_plan_examples((REPO / "README.md").read_text())
    assert len(examples) == 1, "README: expected one ```text block with a `$ dsft plan` example"
    ((args, shown),) = examples
    model = next(a for a in args if a.startswith("model.name_or_path="))
    args[args.index(model)] = f"model.name_or_path={llama7b_dir}"
    args[args.index("--out") + 1] = str(tmp_path / "planned.yaml")
    rc, text, err = run(plan.main, args, capsys)
    assert rc == 0, text + err

    def before_wrote(lines: list[str]) -> list[str]:  # the lines after "wrote" name the output path
        return lines[: next(i for i, ln in enumerate(lines) if ln.startswith("wrote "))]

    assert before_wrote(text.splitlines()) == before_wrote(shown), "README example is stale: rerun it and paste"
    assert load_config(tmp_path / "planned.yaml").validate(1).global_batch == 16


def _train(cmd: list[str], log: Path) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    log.write_bytes(proc.stdout)
    assert proc.returncode == 0, proc.stdout.decode(errors="replace")[-4000:]


def _check_run(run_dir: Path, stage: int, micro: int) -> None:
    """The run trained 3 steps with the planned ZeRO stage and micro batch, and wrote its adapter."""
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    assert [r["step"] for r in rows if r.get("split") == "train"] == [1, 2, 3]
    used = json.loads((run_dir / "ds_config.json").read_text())
    assert used["zero_optimization"]["stage"] == stage and used["train_micro_batch_size_per_gpu"] == micro
    assert (run_dir / "final" / "adapter_config.json").is_file()


def tiny_run(model_dir: Path, data: dict, run_dir: Path) -> list[str]:
    """What a user sets to try a config on the tiny model: its data, a run dir, three logged steps."""
    return [
        f"model.name_or_path={model_dir}",
        f"data.train={data['train']}",
        "data.eval=null",
        f"output_dir={run_dir}",
        "train.max_steps=3",
        "train.log_every=1",
        "train.warmup=0",
        "train.save_every=0",
    ]


def test_planned_yaml_trains_unchanged_on_two_cpu_ranks(tiny_llama_dir, counting, tmp_path, capsys):
    """The README path: `dsft plan ... --out planned.yaml`, then `dsft train lora --config planned.yaml`."""
    planned, run_dir = tmp_path / "planned.yaml", tmp_path / "run"
    args = ["--config", "finetune/configs/lora.yaml", *tiny_run(tiny_llama_dir, counting, run_dir)]
    args += ["--gpus-per-node", "2", "--gpu-mem-gib", "24", "--gpu-arch", "cpu", "--seq-len", "128"]
    rc, text, err = run(plan.main, [*args, "--global-batch", "8", "--out", str(planned)], capsys)
    assert rc == 0, text + err
    cfg = load_config(planned)
    # lora.yaml says zero.stage 2 and micro 4 x accumulation 4: the plan changes both, and the run must use its values.
    assert (cfg.zero.stage, cfg.train.micro_batch_size, cfg.train.grad_accum) == (0, 4, 1)
    _train(
        [DSFT, "train", "lora", "--config", str(planned), "--num-gpus", "2", "--master-port", str(free_port())],
        tmp_path / "train.log",
    )
    _check_run(run_dir, stage=0, micro=4)


def test_generator_json_trains_with_the_printed_keys_on_two_cpu_ranks(tiny_llama_dir, counting, tmp_path, capsys):
    """The other path: `dsft-ds-config --out ds.json`, then `deepspeed=ds.json` plus the keys it printed."""
    ds_json, run_dir = tmp_path / "ds.json", tmp_path / "run"
    args = ["--model", str(tiny_llama_dir), "--method", "lora", "--gpus-per-node", "2", "--gpu-mem-gib", "24"]
    args += ["--gpu-arch", "cpu", "--seq-len", "128", "--global-batch", "8", "--out", str(ds_json)]
    rc, text, _ = run(generate.main, args, capsys)
    assert rc == 0, text
    keys = line_after(text, "training config keys:")
    assert json.loads(ds_json.read_text())["zero_optimization"]["stage"] == 0  # lora.yaml says 2: the old conflict
    cmd = [DSFT, "train", "lora", "--config", "finetune/configs/lora.yaml", "--num-gpus", "2"]
    cmd += ["--master-port", str(free_port()), *tiny_run(tiny_llama_dir, counting, run_dir), f"deepspeed={ds_json}"]
    _train(cmd + keys, tmp_path / "train.log")
    _check_run(run_dir, stage=0, micro=4)
