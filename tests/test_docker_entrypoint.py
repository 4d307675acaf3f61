"""docker/entrypoint.sh and docker/run.sh, run directly: no Docker engine on these machines.

The entry point only chooses between lotus-train and torchrun from the environment, so
DRY_RUN=1 (print the command) checks every choice; two real tiny runs (1 and 2 ranks on
gloo) check that the printed commands train. run.sh is run against a stub `docker` that
prints its arguments.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
RUN_SH = REPO / "docker" / "run.sh"
LAUNCH_VARS = ("NNODES", "NPROC_PER_NODE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "DRY_RUN")


def entrypoint(*args: str, dry_run: bool = True, cwd: Path = REPO, path: Path | None = None,
               **env: str):
    """Run the entry point with only the launch variables given here; ``path`` goes first
    on PATH (stub programs)."""
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    # lotus-train and torchrun from this interpreter's environment, as in the image.
    base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base['PATH']}"
    if path is not None:
        base["PATH"] = f"{path}{os.pathsep}{base['PATH']}"
    if dry_run:
        base["DRY_RUN"] = "1"
    return subprocess.run([str(ENTRYPOINT), *args], env={**base, **env}, cwd=cwd,
                          capture_output=True, text=True)


def printed_command(*args: str, path: Path | None = None, **env: str) -> list[str]:
    result = entrypoint(*args, path=path, **env)
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout)


TRAIN = ("train", "--config", "configs/tiny.yaml", "--set", "training.steps=3")


def test_one_rank_runs_lotus_train_in_one_process():
    assert printed_command(*TRAIN, NPROC_PER_NODE="1") == ["lotus-train", *TRAIN]


def test_no_arguments_train_the_tiny_default():
    assert printed_command(NPROC_PER_NODE="1") == [
        "lotus-train", "train", "--config", "configs/tiny.yaml"]


def stub_nvidia_smi(tmp_path: Path, gpus: int) -> Path:
    """A folder holding an nvidia-smi that lists ``gpus`` GPUs."""
    stub = tmp_path / "nvidia-smi"
    lines = "".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})\\n" for i in range(gpus))
    stub.write_text(f'#!/usr/bin/env bash\nprintf "{lines}"\n')
    stub.chmod(0o755)
    return tmp_path


def test_nproc_defaults_to_the_gpus_nvidia_smi_lists(tmp_path):
    command = printed_command(*TRAIN, path=stub_nvidia_smi(tmp_path, 4))
    assert command[:3] == ["torchrun", "--standalone", "--nproc-per-node=4"]


def test_without_gpus_nproc_defaults_to_one_rank(tmp_path):
    assert printed_command(*TRAIN, path=stub_nvidia_smi(tmp_path, 0))[0] == "lotus-train"


def test_several_ranks_on_one_node_use_standalone_torchrun():
    command = printed_command(*TRAIN, NPROC_PER_NODE="2")
    assert command[:3] == ["torchrun", "--standalone", "--nproc-per-node=2"]
    assert command[-len(TRAIN) - 2:] == ["-m", "launcher", *TRAIN]
    assert any(arg.startswith("--signals-to-handle=") and "SIGUSR1" in arg for arg in command)


def test_several_nodes_use_a_static_rendezvous_on_node_zero():
    command = printed_command(*TRAIN, NNODES="2", NODE_RANK="1", NPROC_PER_NODE="8",
                              MASTER_ADDR="10.0.0.1", MASTER_PORT="29400")
    assert command[0] == "torchrun"
    for flag in ("--nnodes=2", "--node-rank=1", "--nproc-per-node=8",
                 "--master-addr=10.0.0.1", "--master-port=29400"):
        assert flag in command
    assert command[-len(TRAIN) - 2:] == ["-m", "launcher", *TRAIN]


def test_several_nodes_without_master_addr_fail_with_a_message():
    result = entrypoint(*TRAIN, NNODES="2", NPROC_PER_NODE="1")
    assert result.returncode == 2
    assert "MASTER_ADDR" in result.stderr


def test_node_rank_outside_the_job_fails_with_a_message():
    result = entrypoint(*TRAIN, NNODES="2", NODE_RANK="2", MASTER_ADDR="10.0.0.1")
    assert result.returncode == 2
    assert "NODE_RANK" in result.stderr


def test_a_non_number_fails_naming_the_variable():
    result = entrypoint(*TRAIN, NPROC_PER_NODE="eight")
    assert result.returncode == 2
    assert "NPROC_PER_NODE" in result.stderr


def test_other_lotus_train_commands_run_in_one_process():
    assert printed_command("bench", "projector", NPROC_PER_NODE="8") == [
        "lotus-train", "bench", "projector"]


def test_any_other_program_runs_as_is():
    assert printed_command("bash", "-c", "echo hi") == ["bash", "-c", "echo hi"]
    result = entrypoint("bash", "-c", "echo hi", dry_run=False)
    assert result.stdout == "hi\n"


TINY_RUN = ("training.steps=4", "training.seq_len=32", "model.max_seq_len=32",
            "training.batch_size=4", "training.micro_batch_size=2",
            "training.warmup_steps=1", "eval.interval=0", "eval.batches=1",
            "checkpoint.interval=0", "run.tensorboard=false")


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_entrypoint_trains_with_one_or_two_ranks(nproc, small_corpus, tmp_path):
    corpus, tokenizer = small_corpus
    run_dir = tmp_path / "run"
    sets = [*TINY_RUN, f"data.path={corpus}", f"data.tokenizer={tokenizer}",
            f"run.dir={run_dir}"]
    args = ["train", "--config", str(REPO / "configs" / "tiny.yaml")]
    for pair in sets:
        args += ["--set", pair]
    result = entrypoint(*args, dry_run=False, cwd=tmp_path, NPROC_PER_NODE=str(nproc),
                        OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4
    assert summary["world_size"] == nproc


def test_run_sh_starts_the_image_with_gpus_host_ipc_and_mounted_folders(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "docker"
    stub.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", LOTUS_HOME=str(tmp_path / "home"),
               NPROC_PER_NODE="8", IMAGE="lotus-dist:test")
    result = subprocess.run([str(RUN_SH), *TRAIN], env=env, capture_output=True, text=True,
                            check=True)
    args = result.stdout.splitlines()
    assert args[0] == "run"
    for flag in ("--gpus", "--ipc=host", "--init", "--network=host"):
        assert flag in args
    assert "memlock=-1" in args
    assert args[args.index("NPROC_PER_NODE") - 1] == "-e"
    assert f"{tmp_path}/home/runs:/opt/lotus/runs" in args
    assert args[-len(TRAIN) - 1:] == ["lotus-dist:test", *TRAIN]
    assert (tmp_path / "home" / "cache").is_dir()
