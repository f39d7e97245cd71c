"""launch.run dry-runs give the exact deepspeed command lines; launch.slurm_hostfile reads SLURM variables."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from launch.run import LaunchError, build_command, build_parser, main
from launch.slurm_hostfile import SlurmEnvError, expand_nodelist, hostfile_from_env, slots_per_node

REPO = Path(__file__).resolve().parents[3]
RECIPE = ["finetune/lora.py", "--config", "finetune/configs/lora.yaml", "train.max_steps=3"]


def dry_run(argv: list[str], capsys) -> list[str]:
    """Run ``launch.run --dry-run`` in-process and return the printed argv (the deepspeed path made relative)."""
    assert main(["--dry-run", "--deepspeed", "deepspeed", *argv]) == 0
    return shlex.split(capsys.readouterr().out)


def test_single_node(capsys):
    assert dry_run(["--num_gpus", "2", *RECIPE], capsys) == ["deepspeed", "--num_gpus", "2", *RECIPE]


def test_hostfile_multi_node(capsys, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("w0 slots=8\nw1 slots=8\n")
    argv = ["--hostfile", str(hostfile), "--master_addr", "10.0.0.1", "--master_port", "29600"]
    assert dry_run([*argv, "--launcher", "openmpi", *RECIPE], capsys) == [
        "deepspeed",
        "--hostfile",
        str(hostfile),
        "--master_addr",
        "10.0.0.1",
        "--master_port",
        "29600",
        "--launcher",
        "openmpi",
        *RECIPE,
    ]
    # Without ssh: every node runs the launcher for its own ranks.
    assert dry_run([*argv, "--no_ssh", "--node_rank", "1", *RECIPE], capsys) == [
        "deepspeed",
        "--hostfile",
        str(hostfile),
        "--master_addr",
        "10.0.0.1",
        "--master_port",
        "29600",
        "--no_ssh",
        "--node_rank",
        "1",
        *RECIPE,
    ]


def test_shipped_hostfile_example_is_read_by_deepspeed():
    from deepspeed.launcher.runner import fetch_hostfile

    pool = fetch_hostfile(str(REPO / "launch" / "hostfile.example"))
    assert dict(pool) == {"worker-0": 8, "worker-1": 8}


def test_slurm(capsys, tmp_path, monkeypatch):
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_NODEID": "1",  # srun sets it per node
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    cmd = dry_run(["--slurm", *RECIPE], capsys)
    hostfile = tmp_path / "dsft-hostfile-4242"
    assert cmd == [
        "deepspeed",
        "--hostfile",
        str(hostfile),
        "--master_addr",
        "gpu07",
        "--no_ssh",
        "--node_rank",
        "1",
        *RECIPE,
    ]
    assert hostfile.read_text() == "gpu07 slots=4\ngpu08 slots=4\n"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--no_ssh", "x.py"], "--node_rank"),
        (["--node_rank", "1", "x.py"], "only applies with --no_ssh"),
        (["--launcher", "openmpi", "x.py"], "need(s) --hostfile"),
        (["--hostfile", "/nonexistent/hosts", "x.py"], "no such file"),
        (["--slots", "4", "x.py"], "only applies with --slurm"),
        (["--slurm", "x.py"], "SLURM_NODEID is not set"),
        (["--slurm", "--launcher", "slurm", "x.py"], "drop them"),
    ],
)
def test_bad_flag_combinations_say_what_to_change(argv, message, monkeypatch):
    for var in ("SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_NODEID"):
        monkeypatch.delenv(var, raising=False)
    args = build_parser().parse_args(["--deepspeed", "deepspeed", *argv])
    with pytest.raises(LaunchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_command(args)


def test_slurm_without_nodelist_says_so(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    monkeypatch.delenv("SLURM_NODELIST", raising=False)
    monkeypatch.setenv("SLURM_NODEID", "0")
    args = build_parser().parse_args(["--deepspeed", "deepspeed", "--slurm", "x.py"])
    with pytest.raises(LaunchError, match="SLURM_JOB_NODELIST is not set"):
        build_command(args)


def test_slurm_sbatch_dry_run(tmp_path):
    """launch/slurm.sbatch (what sbatch runs on each node under srun) prints this node's deepspeed command."""
    # Other tests in the same session may have exported MASTER_ADDR/PORT (in-process process groups): not ours.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "SLURM_"))}
    env = {
        **inherited,
        "DRY_RUN": "1",
        "PYTHON": sys.executable,
        "TMPDIR": str(tmp_path),
        "SLURM_JOB_ID": "9",
        "SLURM_JOB_NODELIST": "gpu[01-02]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_NODEID": "0",
        "SLURM_SUBMIT_DIR": str(REPO),
    }
    out = subprocess.run(
        ["bash", "launch/slurm.sbatch", "finetune/full.py", "--config", "finetune/configs/full.yaml"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    cmd = shlex.split(out)
    hostfile = tmp_path / "dsft-hostfile-9"
    assert cmd[1:] == [
        "--hostfile",
        str(hostfile),
        "--master_addr",
        "gpu01",
        "--master_port",
        "29500",
        "--no_ssh",
        "--node_rank",
        "0",
        "finetune/full.py",
        "--config",
        "finetune/configs/full.yaml",
    ]
    assert hostfile.read_text() == "gpu01 slots=8\ngpu02 slots=8\n"


def test_cli_dry_run_subprocess_and_shell_wrapper():
    """The module CLI and launch/single_node.sh print the same quoted command; args with spaces stay one word."""
    recipe = ["finetune/sft.py", "--config", "finetune/configs/sft.yaml", "output_dir=my runs/a"]
    out = subprocess.run(
        [sys.executable, "-m", "launch.run", "--dry-run", "--num_gpus", "2", *recipe],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    cmd = shlex.split(out)
    assert Path(cmd[0]).name == "deepspeed" and cmd[1:] == ["--num_gpus", "2", *recipe]
    sh = subprocess.run(
        ["bash", "launch/single_node.sh", "2", *recipe],
        cwd=REPO,
        env={**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert sh == out


def test_expand_nodelist():
    assert expand_nodelist("node[01-03,07]") == ["node01", "node02", "node03", "node07"]
    assert expand_nodelist("a1,b[9-11],c") == ["a1", "b9", "b10", "b11", "c"]
    assert expand_nodelist("r[1-2]-n[8-9]") == ["r1-n8", "r1-n9", "r2-n8", "r2-n9"]
    with pytest.raises(SlurmEnvError, match="unbalanced"):
        expand_nodelist("node[01-03")
    with pytest.raises(SlurmEnvError, match="bad range"):
        expand_nodelist("node[05-01]")


def test_slots_from_slurm_variables():
    assert slots_per_node({"SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "1"}) == 8
    assert slots_per_node({"SLURM_GPUS_PER_NODE": "gpu:h100:4"}) == 4
    assert slots_per_node({"SLURM_NTASKS_PER_NODE": "2(x3)"}) == 2
    with pytest.raises(SlurmEnvError, match="--gpus-per-node"):
        slots_per_node({})


def test_hostfile_from_env_checks_node_count():
    hosts, slots, text = hostfile_from_env(
        {"SLURM_JOB_NODELIST": "node[01-03,07]", "SLURM_JOB_NUM_NODES": "4", "SLURM_NTASKS_PER_NODE": "4(x4)"}
    )
    assert hosts == ["node01", "node02", "node03", "node07"] and slots == 4
    assert text.splitlines() == ["node01 slots=4", "node02 slots=4", "node03 slots=4", "node07 slots=4"]
    with pytest.raises(SlurmEnvError, match="expands to 2 hosts"):
        hostfile_from_env({"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_NUM_NODES": "3", "SLURM_GPUS_ON_NODE": "1"})
