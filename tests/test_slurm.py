"""slurm/*.sbatch on a real SLURM: a two-node cluster on this machine (slurm/local_cluster.sh).

Slow and root-only (it installs and starts slurmctld, slurmd and munged), so it runs only
when asked: ``LOTUS_TEST_SLURM=1 python -m pytest -m slurm tests/test_slurm.py``
(``make test-slurm``). The cluster is brought up if it is not running and stopped again
afterwards; one left running by hand is left running.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(os.environ.get("LOTUS_TEST_SLURM") != "1",
                       reason="set LOTUS_TEST_SLURM=1 to run the SLURM tests (make test-slurm)"),
]

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "slurm" / "local_cluster.sh"
STATE_DIR = Path(os.environ.get("LOTUS_SLURM_DIR", "/tmp/lotus-slurm"))

# A run that takes a few seconds on two CPU "nodes" of one rank each.
SMALL_RUN = ["training.seq_len=32", "model.max_seq_len=32", "training.batch_size=4",
             "training.micro_batch_size=2", "training.warmup_steps=2",
             "training.log_interval=1", "eval.interval=0", "eval.batches=1",
             "run.tensorboard=false"]


@pytest.fixture(scope="module")
def slurm_env() -> dict[str, str]:
    """Environment for sbatch/squeue against the local cluster, started if needed."""
    env = {**os.environ, "SLURM_CONF": str(STATE_DIR / "slurm.conf"),
           # the jobs use this interpreter; one thread per rank: both "nodes" share 2 cores
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    already_up = subprocess.run([CLUSTER, "status"], env=env, capture_output=True).returncode == 0
    subprocess.run([CLUSTER, "up"], env=env, check=True)
    yield env
    if not already_up:
        subprocess.run([CLUSTER, "down"], env=env, check=False)


def overrides(*pairs: str) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


def corpus_args(small_corpus: tuple[Path, Path]) -> list[str]:
    corpus, tokenizer = small_corpus
    return overrides(f"data.path={corpus}", f"data.tokenizer={tokenizer}")


@pytest.fixture
def submit(slurm_env):
    """submit(script, sbatch_args, train_args, env=None) -> job id; cancelled at teardown,
    so a failed test leaves no job running on the cluster."""
    jobs: list[str] = []

    def _submit(script: str, sbatch_args: list[str], train_args: list[str],
                env: dict[str, str] | None = None) -> str:
        result = subprocess.run(["sbatch", "--parsable", *sbatch_args, f"slurm/{script}",
                                 *train_args], cwd=REPO, env=env or slurm_env, check=True,
                                capture_output=True, text=True)
        jobs.append(result.stdout.strip().split(";")[0])
        return jobs[-1]

    yield _submit
    if jobs:
        subprocess.run(["scancel", *jobs], env=slurm_env, check=False)


def job_info(env: dict[str, str], job: str) -> dict[str, str]:
    """scontrol's Key=Value fields for the job (finished jobs stay listed for MinJobAge)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, check=True,
                         capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def wait_for(what: str, condition, timeout: float = 240.0, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_until_done(env: dict[str, str], job: str, log: Path) -> dict[str, str]:
    finished = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")

    def done() -> dict[str, str] | None:
        info = job_info(env, job)
        return info if info["JobState"] in finished else None

    try:
        return wait_for(f"job {job}", done)
    except AssertionError:
        print(log.read_text() if log.exists() else f"(no log at {log})")
        raise


def train_steps(run_dir: Path) -> list[int]:
    """The step of every training row of metrics.jsonl, in file order."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["step"] for row in rows if "loss" in row]


def test_train_job_runs_on_two_nodes_and_writes_its_run_directory(
        slurm_env, submit, small_corpus, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job = submit("train.sbatch", ["--nodes=2", f"--output={log}"],
                 ["--config", "configs/tiny.yaml", *corpus_args(small_corpus),
                  *overrides(*SMALL_RUN, f"run.dir={run_dir}", "training.steps=30",
                             "checkpoint.interval=10")])
    info = wait_until_done(slurm_env, job, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text
    assert info["ExitCode"] == "0:0", text
    # --exclusive by default: whole nodes, and each node's task gets all their CPUs
    node = subprocess.run(["scontrol", "show", "node", "-o", "lotus1"], env=slurm_env,
                          check=True, capture_output=True, text=True).stdout
    node_cpus = int(re.search(r"CPUTot=(\d+)", node).group(1))
    assert info["NumCPUs"] == str(2 * node_cpus)
    assert f"2 node(s) x 1 rank(s) on {node_cpus} CPU(s) each" in text
    assert (run_dir / "nccl-trace").is_dir()  # where a timed-out collective's trace goes
    assert train_steps(run_dir) == list(range(1, 31))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 30
    assert summary["world_size"] == 2
    assert summary["final_eval_loss"] is not None
    assert (run_dir / "ckpt" / "step-30" / "COMPLETE.json").is_file()


def test_usr1_checkpoints_requeues_and_resumes_without_losing_a_step(
        slurm_env, submit, small_corpus, tmp_path):
    steps = 150
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    # No periodic checkpoint: the only one to resume from is the one the signal writes.
    job = submit("train.sbatch", ["--nodes=2", f"--output={log}"],
                 ["--config", "configs/tiny.yaml", *corpus_args(small_corpus),
                  *overrides(*SMALL_RUN, f"run.dir={run_dir}", f"training.steps={steps}",
                             "checkpoint.interval=0")])
    metrics = run_dir / "metrics.jsonl"
    wait_for("10 logged steps", lambda: metrics.exists() and len(train_steps(run_dir)) >= 10)
    # What SLURM does at --signal=B:USR1@N before the time limit, without the wait.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm_env, check=True)

    def requeued() -> bool:
        info = job_info(slurm_env, job)
        if int(info["Restarts"]) < 1:
            return False
        if info["JobState"] == "PENDING" and info["Reason"] == "BeginTime":
            # SLURM holds a requeued job for the credential lifetime; start it now.
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"],
                           env=slurm_env, check=False)
        return True

    wait_for("the requeue", requeued)
    info = wait_until_done(slurm_env, job, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text
    assert int(info["Restarts"]) == 1, text

    stopped = re.search(r"stopping at step (\d+) on signal 10", text)
    assert stopped, text
    stop_step = int(stopped.group(1))
    assert 10 <= stop_step < steps
    assert f"saved checkpoint {run_dir}/ckpt/step-{stop_step}" in text
    assert "requeueing" in text
    assert f"resumed from step {stop_step} " in text
    assert train_steps(run_dir) == list(range(1, steps + 1)), "a step lost or logged twice"
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == steps


def test_sweep_array_gives_each_task_its_grid_point_and_run_directory(
        slurm_env, submit, small_corpus, tmp_path):
    sweep_dir = tmp_path / "sweep"
    env = {**slurm_env, "SWEEP_DIR": str(sweep_dir)}
    # The grid's corners: task 0 is (0.005, 25), task 8 is (0.02, 100).
    job = submit("sweep.sbatch", ["--array=0,8", f"--output={tmp_path}/task-%a.out"],
                 ["--config", "configs/tiny.yaml", *corpus_args(small_corpus),
                  *overrides(*SMALL_RUN, "training.steps=5", "checkpoint.interval=0")], env)
    for task in (0, 8):
        info = wait_until_done(env, f"{job}_{task}", tmp_path / f"task-{task}.out")
        assert info["JobState"] == "COMPLETED", (tmp_path / f"task-{task}.out").read_text()
    for gamma, gap in (("0.005", 25), ("0.02", 100)):
        run_dir = sweep_dir / f"gamma{gamma}-gap{gap}"
        assert json.loads((run_dir / "summary.json").read_text())["steps"] == 5
        config = (run_dir / "config.yaml").read_text()
        assert f"gamma: {gamma}" in config
        assert f"verify_gap: {gap}" in config
