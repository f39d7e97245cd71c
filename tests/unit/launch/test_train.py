"""``dsft`` and ``dsft train``: the front door dispatches, and a config mistake stops in seconds, before launch."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch import cli
from launch.train import recipe_for, world_size_of

REPO = Path(__file__).resolve().parents[3]
DSFT = [sys.executable, "-m", "launch.cli"]


def _dsft(*args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    start = time.monotonic()
    proc = subprocess.run([*DSFT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - start


def test_help_lists_every_command_and_each_module_has_main():
    text = cli.usage()
    for name in cli.COMMANDS:
        assert f"  {name}" in text
    # every subcommand's module is importable and has main(argv)
    import importlib

    for name, (module, _) in cli.COMMANDS.items():
        assert callable(importlib.import_module(module).main), name


def test_unknown_command_suggests(capsys):
    assert cli.main(["trian"]) == 2
    assert "did you mean 'train'" in capsys.readouterr().err
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0


@pytest.mark.parametrize(
    "method, script, leading",
    [
        ("full", "full.py", ["method.name=full"]),
        ("lora", "lora.py", ["method.name=lora"]),
        ("qlora", "lora.py", ["method.name=qlora"]),
        ("prefix", "ptuning_v2.py", ["method.name=prefix"]),
        ("prompt", "prompt_tuning.py", ["method.name=prompt"]),
        ("sft", "sft.py", []),
    ],
)
def test_method_picks_its_recipe(method, script, leading):
    path, overrides = recipe_for(method)
    assert Path(path).name == script and Path(path).is_file()
    assert overrides == leading


def test_world_size_from_the_launcher_flags(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# two nodes\nnode-a slots=4\nnode-b slots=2 # smaller\n")
    assert world_size_of(["deepspeed", "--num_gpus", "3", "x.py"]) == 3
    assert world_size_of(["deepspeed", "--hostfile", str(hosts), "x.py"]) == 6
    assert world_size_of(["deepspeed", "--hostfile", str(hosts), "--num_nodes", "1", "x.py"]) == 4
    assert world_size_of(["deepspeed", "--hostfile", str(hosts), "--num_gpus", "1", "x.py"]) == 2


def _base_args(tiny_llama_dir, tmp_path) -> list[str]:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "one two three"}\n')
    return [
        "--config",
        "finetune/configs/full.yaml",
        f"model.name_or_path={tiny_llama_dir}",
        f"data.train={data}",
        f"output_dir={tmp_path / 'run'}",
        "--num-gpus",
        "2",
    ]


def test_dry_run_prints_the_deepspeed_command_the_recipe_runs_with(tiny_llama_dir, tmp_path):
    proc, _ = _dsft("train", "lora", *_base_args(tiny_llama_dir, tmp_path), "train.lr=1e-4", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    cmd = proc.stdout.split()
    assert cmd[0].endswith("deepspeed") and cmd[1:3] == ["--num_gpus", "2"]
    assert cmd[3].endswith("finetune/lora.py")
    assert cmd[4:7] == ["--config", "finetune/configs/full.yaml", "method.name=lora"]
    assert cmd[-1] == "train.lr=1e-4"


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("output_dir=FILE", "output_dir=", "exists and is a file"),
        ("data.train=MISSING", "data.train", "does not exist"),
        ("data.seq_len=4096", "data.seq_len=4096", "max_position_embeddings=2048"),
        ("method.lora.target_modules=[q_proj,qkv]", "method.lora.target_modules", "called qkv"),
        ("data.eval=PREFIX", "data.eval=", "expected an mmap prefix"),
    ],
)
def test_mistakes_are_config_errors_within_seconds(tiny_llama_dir, tmp_path, override, key, words):
    """The issue's three mistakes (and two more): one `config error: KEY` line in < 10 s, no traceback, exit 2."""
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    override = (
        override.replace("FILE", str(afile))
        .replace("MISSING", str(tmp_path / "missing.jsonl"))
        .replace("PREFIX", str(tmp_path / "no_prefix"))
    )
    method = "lora" if "lora" in override else "full"
    proc, seconds = _dsft("train", method, *_base_args(tiny_llama_dir, tmp_path), override)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"config error: {key}"), proc.stderr
    assert words in proc.stderr and "Traceback" not in proc.stderr
    assert seconds < 10, seconds


def test_gpt2_positions_are_a_hard_bound(tiny_gpt2_dir, tmp_path):
    args = _base_args(tiny_gpt2_dir, tmp_path)
    proc, _ = _dsft("train", "full", *args, "data.seq_len=2049")
    assert proc.returncode == 2 and "n_positions=2048" in proc.stderr and "position table" in proc.stderr
    proc, _ = _dsft("train", "full", *args, "data.seq_len=2048", "--dry-run")
    assert proc.returncode == 0, proc.stderr


def test_virtual_tokens_take_positions_too(tiny_llama_dir, tmp_path):
    args = [a.replace("full.yaml", "prompt_tuning.yaml") for a in _base_args(tiny_llama_dir, tmp_path)]
    proc, _ = _dsft("train", "prompt", *args, "data.seq_len=2040", "method.prompt.num_virtual_tokens=16")
    assert proc.returncode == 2 and "16 virtual tokens" in proc.stderr and "<= 2032" in proc.stderr


def test_the_raw_recipe_command_gets_the_same_check(tiny_llama_dir, tmp_path, capsys):
    """`deepspeed finetune/full.py ...` without dsft: engine.main runs check_before_launch before any process group."""
    from finetune.engine import main

    afile = tmp_path / "afile"
    afile.write_text("x")
    args = [a for a in _base_args(tiny_llama_dir, tmp_path) if a not in ("--num-gpus", "2")]
    assert main(argv=[*args, f"output_dir={afile}"]) == 2
    assert capsys.readouterr().err.startswith(f"config error: output_dir={afile} exists and is a file")


def test_a_bad_launcher_flag_is_refused_before_launch(tiny_llama_dir, tmp_path):
    proc, _ = _dsft("train", "full", *_base_args(tiny_llama_dir, tmp_path), "--hostfile", str(tmp_path / "nope"))
    assert proc.returncode == 2 and "--hostfile" in proc.stderr and "no such file" in proc.stderr
    proc, _ = _dsft("train", "nosuch", *_base_args(tiny_llama_dir, tmp_path))
    assert proc.returncode == 2 and "METHOD 'nosuch'" in proc.stderr
