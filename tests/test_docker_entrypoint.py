"""docker/entrypoint.sh and docker/run.sh, run directly: no Docker engine on these machines.

The entry point only chooses between lotus-train and torchrun from the environment, so
DRY_RUN=1 (print the command) checks every choice; two real tiny runs (1 and 2 ranks on
gloo) check that the printed commands train. run.sh is run against a stub `docker` that
prints its arguments; the image's NCCL defaults are read from the Dockerfile.
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


def run_sh_args(tmp_path: Path, **env: str) -> list[str]:
    """The arguments run.sh gives a stub ``docker``, with ``env`` added to the host's."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "docker"
    stub.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    stub.chmod(0o755)
    base = {k: v for k, v in os.environ.items()
            if k not in LAUNCH_VARS and not k.startswith(("NCCL_", "TORCH_NCCL_", "FI_"))}
    base.update(PATH=f"{bin_dir}{os.pathsep}{base['PATH']}", LOTUS_HOME=str(tmp_path / "home"),
                **env)
    result = subprocess.run([str(RUN_SH), *TRAIN], env=base, capture_output=True, text=True,
                            check=True)
    return result.stdout.splitlines()


def forwarded(args: list[str]) -> set[str]:
    return {args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "-e"}


def test_run_sh_starts_the_image_with_gpus_host_ipc_and_mounted_folders(tmp_path):
    args = run_sh_args(tmp_path, NPROC_PER_NODE="8", IMAGE="lotus-dist:test")
    assert args[0] == "run"
    for flag in ("--gpus", "--ipc=host", "--init", "--network=host"):
        assert flag in args
    assert "memlock=-1" in args
    assert args[args.index("NPROC_PER_NODE") - 1] == "-e"
    assert f"{tmp_path}/home/runs:/opt/lotus/runs" in args
    assert args[-len(TRAIN) - 1:] == ["lotus-dist:test", *TRAIN]
    assert (tmp_path / "home" / "cache").is_dir()


def test_run_sh_forwards_nccl_torch_nccl_and_libfabric_variables(tmp_path):
    mine = {"NCCL_IB_HCA": "mlx5", "NCCL_SOCKET_IFNAME": "ib0", "TORCH_NCCL_BLOCKING_WAIT": "1",
            "FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1"}
    args = run_sh_args(tmp_path, **mine, MY_NCCL_NOTE="x", NCCLX="y", NPROC_PER_NODE="8")
    assert forwarded(args) == {*mine, "NPROC_PER_NODE"}


def test_run_sh_maps_infiniband_devices_with_ipc_lock(tmp_path):
    devices = tmp_path / "infiniband"
    devices.mkdir()
    args = run_sh_args(tmp_path, IB_DEVICES=str(devices))
    assert f"--device={devices}" in args
    assert "--cap-add=IPC_LOCK" in args and "memlock=-1" in args
    # a host without the devices (or IB_DEVICES empty) maps none: docker would refuse it
    for absent in (str(tmp_path / "missing"), ""):
        args = run_sh_args(tmp_path, IB_DEVICES=absent)
        assert not any(a.startswith("--device") for a in args)
        assert "--cap-add=IPC_LOCK" in args


def dockerfile_instructions(name: str) -> list[str]:
    """The arguments of every ``name`` instruction of docker/Dockerfile, continuation
    lines joined."""
    text = (REPO / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    return [line.split(None, 1)[1] for line in text.splitlines()
            if line.split(None, 1)[:1] == [name]]


def test_image_sets_nccl_defaults_with_a_flight_recorder_dump_on_a_volume():
    env = dict(pair.split("=", 1) for args in dockerfile_instructions("ENV")
               for pair in shlex.split(args))
    assert env["NCCL_DEBUG"] == "WARN"
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert int(env["TORCH_NCCL_TRACE_BUFFER_SIZE"]) > 0  # else the dump records nothing
    assert env["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    volumes = json.loads(dockerfile_instructions("VOLUME")[0])
    dump = Path(env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"])
    assert any(dump.is_relative_to(v) for v in volumes)  # on the host, not the container's /tmp
    assert dump.name == "rank_"  # one file per rank in its own folder (fr_trace reads it)


def test_entrypoint_creates_the_flight_recorder_folder_before_launching(tmp_path):
    stub = tmp_path / "torchrun"
    stub.write_text("#!/usr/bin/env bash\necho started\n")
    stub.chmod(0o755)
    trace = tmp_path / "runs" / "nccl-trace"
    result = entrypoint(*TRAIN, dry_run=False, path=tmp_path, NPROC_PER_NODE="2",
                        TORCH_NCCL_DEBUG_INFO_TEMP_FILE=f"{trace}/rank_")
    assert result.stdout == "started\n", result.stderr
    assert trace.is_dir()
