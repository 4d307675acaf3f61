"""slurm/train.sbatch run by bash with stub ``srun`` and ``scontrol``: how it starts the
ranks (one task per node with all the job's CPUs there, the whole environment exported)
and the NCCL environment they get, without a SLURM cluster (``tests/test_slurm.py`` runs
the script on a real one)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "train.sbatch"
PREFIXES = ("NCCL_", "TORCH_NCCL_", "FI_", "SLURM_")

STUBS = {
    # srun: record the arguments and the environment the ranks would start with
    "srun": 'printf "%s\\n" "$@" >"$STUB_DIR/srun.args"\nenv >"$STUB_DIR/srun.env"\n',
    "scontrol": ('case "$1 $2" in\n'
                 '    "show hostnames") echo node1; echo node2 ;;\n'
                 '    "show node") echo "NodeName=$3 NodeAddr=10.0.0.7 State=IDLE" ;;\n'
                 'esac\n'),
}


def run_script(tmp_path: Path, **env: str) -> tuple[list[str], dict[str, str]]:
    """(srun's arguments, srun's environment) of one run of the script on a fake
    2-node allocation of 16 CPUs per node; ``env`` adds to the submitter's environment."""
    stubs = tmp_path / "bin"
    stubs.mkdir(parents=True)
    for name, body in STUBS.items():
        (stubs / name).write_text(f"#!/usr/bin/env bash\n{body}")
        (stubs / name).chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith(PREFIXES)}
    base.update(PATH=f"{stubs}{os.pathsep}{base['PATH']}", STUB_DIR=str(tmp_path),
                PYTHON=sys.executable, SLURM_JOB_ID="4242", SLURM_NNODES="2",
                SLURM_JOB_NODELIST="node[1-2]", SLURM_JOB_CPUS_PER_NODE="16(x2)")
    base.update(env)
    run_dir = tmp_path / "run"
    result = subprocess.run(["bash", str(SCRIPT), "--config", "configs/tiny.yaml", "--set",
                             f"run.dir={run_dir}"], cwd=REPO, env=base, capture_output=True,
                            text=True, timeout=120)
    # srun "ran" without training a step: the script reports it, status 1
    assert result.returncode == 1, result.stdout + result.stderr
    assert "training step ended with status 0 at step 0" in result.stdout
    environ = dict(line.split("=", 1) for line in
                   (tmp_path / "srun.env").read_text().splitlines() if "=" in line)
    return (tmp_path / "srun.args").read_text().splitlines(), environ


def test_one_task_per_node_gets_all_the_jobs_cpus_and_the_whole_environment(tmp_path):
    args, _ = run_script(tmp_path)
    assert args[:4] == ["--ntasks-per-node=1", "--cpus-per-task=16", "--export=ALL",
                        "--wait=120"]
    assert "--rdzv-endpoint=10.0.0.7:24242" in args and "--nnodes=2" in args
    assert "#SBATCH --exclusive" in SCRIPT.read_text().split("set -euo")[0]


def test_cpus_per_task_when_asked_and_the_smallest_node_otherwise(tmp_path):
    args, _ = run_script(tmp_path / "asked", SLURM_CPUS_PER_TASK="6")
    assert "--cpus-per-task=6" in args
    args, _ = run_script(tmp_path / "uneven", SLURM_JOB_CPUS_PER_NODE="64(x2),32")
    assert "--cpus-per-task=32" in args


def test_the_ranks_get_your_nccl_and_libfabric_settings(tmp_path):
    mine = {"NCCL_IB_HCA": "mlx5_0,mlx5_1", "NCCL_SOCKET_IFNAME": "ib0",
            "TORCH_NCCL_BLOCKING_WAIT": "1", "FI_PROVIDER": "efa",
            "FI_EFA_USE_DEVICE_RDMA": "1", "NCCL_DEBUG": "INFO",
            "TORCH_NCCL_TRACE_BUFFER_SIZE": "500"}
    _, environ = run_script(tmp_path, **mine)
    assert {k: environ.get(k) for k in mine} == mine  # forwarded, and yours win


def test_default_nccl_settings_keep_a_flight_recorder_trace_in_the_run_dir(tmp_path):
    _, environ = run_script(tmp_path)
    assert environ["NCCL_DEBUG"] == "WARN"
    assert environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert int(environ["TORCH_NCCL_TRACE_BUFFER_SIZE"]) > 0  # else the dump is empty
    assert environ["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1"
    trace = Path(environ["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"])
    assert trace == tmp_path / "run" / "nccl-trace" / "rank_"
    assert trace.parent.is_dir()  # made ready for the rank_<N> files

