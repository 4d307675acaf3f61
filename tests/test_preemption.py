"""Stop signals and hung ranks in real multi-rank jobs (torchrun, gloo).

A stop signal may reach one rank only, or ranks at different steps (SLURM signals the
batch step, a user signals one PID, a node's agent is slow). Every rank must stop at the
same step with one checkpoint, and a relaunch must log every step exactly once. A
stopped rank must turn into an error within ``parallel.timeout_s``, not a hang.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from small_runs import small_run

REPO = Path(__file__).resolve().parents[1]

STEPS = 400  # far more than a test waits for: the run only ends by the signal


def args(corpus: Path, tokenizer: Path, run_dir: Path, *extra: str) -> list[str]:
    return small_run(corpus, tokenizer, run_dir, f"training.steps={STEPS}",
                     "training.warmup_steps=2", "training.log_interval=1", "eval.interval=0",
                     "eval.batches=1", "checkpoint.interval=0", *extra)


def launch(nproc: int, sets: list[str]) -> subprocess.Popen:
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable])
    return subprocess.Popen([*cmd, "-m", "launcher", "train", "--config", "configs/tiny.yaml",
                             *(f"--set={s}" for s in sets)], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return [r["step"] for r in rows if "loss" in r]


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not logged_steps(run_dir) or logged_steps(run_dir)[-1] < step:
        if proc.poll() is not None:
            raise AssertionError(f"the job ended early:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no step {step} within {timeout} s")
        time.sleep(0.05)


def worker_pids(launcher_pid: int, nproc: int) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes (or the process itself for one rank)."""
    if nproc == 1:
        return {0: launcher_pid}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                env = (entry / "environ").read_bytes().split(b"\0")
            except (OSError, IndexError, ValueError):
                continue
            if ppid == launcher_pid:
                rank = next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)
                if rank is not None:
                    found[rank] = int(entry.name)
        if len(found) == nproc:
            return found
        time.sleep(0.1)
    raise AssertionError(f"could not find the {nproc} workers of {launcher_pid}")


def finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"the job hung after the signal:\n{out}") from None
    return out


def checkpoints(run_dir: Path) -> list[str]:
    ckpt = run_dir / "ckpt"
    return sorted(p.name for p in ckpt.iterdir()) if ckpt.is_dir() else []


ENGINES = {
    "ddp_lowrank": [],
    "ddp": ["parallel.lowrank_comm=false"],
    "fsdp": ["parallel.engine=fsdp"],
    "deepspeed": ["parallel.engine=deepspeed", "optim.name=adamw",
                  "parallel.deepspeed_config=configs/deepspeed/zero1.json"],
}


def stop_and_resume(small_corpus, run_dir: Path, nproc: int, engine: list[str],
                    signal_ranks: list[int], sig: int = signal.SIGUSR1) -> None:
    """Signal ``signal_ranks`` one after another (a few steps apart), then check that all
    stopped at one step with one checkpoint, and that a relaunch continues from it."""
    sets = args(*small_corpus, run_dir, *engine)
    proc = launch(nproc, sets)
    wait_for_step(proc, run_dir, 3)
    pids = worker_pids(proc.pid, nproc)
    for i, rank in enumerate(signal_ranks):
        if i:
            time.sleep(0.05)  # the next rank's signal comes a step or two later
        with contextlib.suppress(ProcessLookupError):  # that rank may have stopped already
            os.kill(pids[rank], sig)
    out = finish(proc)
    assert proc.returncode == 0, out
    stops = set(re.findall(r"stopping at step (\d+)", out))
    assert len(stops) == 1, out  # rank 0 logs; the others must not have logged another step
    stop_step = int(stops.pop())
    assert checkpoints(run_dir) == [f"step-{stop_step}"], out
    marker = json.loads((run_dir / "ckpt" / f"step-{stop_step}" / "COMPLETE.json").read_text())
    assert marker["world_size"] == nproc
    assert logged_steps(run_dir) == list(range(1, stop_step + 1))
    # The relaunch resumes from the signal's checkpoint and runs a few more steps.
    more = stop_step + 3
    relaunch = launch(nproc, [*sets, f"training.steps={more}"])
    out = finish(relaunch)
    assert relaunch.returncode == 0, out
    assert f"resumed from step {stop_step} " in out
    assert logged_steps(run_dir) == list(range(1, more + 1)), "a step lost or logged twice"


@pytest.mark.parametrize("engine", ENGINES)
def test_a_signal_to_one_rank_of_two_stops_both_at_the_same_step(small_corpus, tmp_path, engine):
    stop_and_resume(small_corpus, tmp_path, 2, ENGINES[engine], signal_ranks=[1])


@pytest.mark.parametrize("engine", ["ddp_lowrank", "fsdp"])
def test_a_signal_to_one_rank_of_three_stops_all_at_the_same_step(small_corpus, tmp_path,
                                                                   engine):
    sets = [*ENGINES[engine], "training.batch_size=12"]  # 12 = 3 ranks x 4
    stop_and_resume(small_corpus, tmp_path, 3, sets, signal_ranks=[2])


def test_signals_reaching_ranks_at_different_steps_stop_all_at_the_first(small_corpus,
                                                                        tmp_path):
    stop_and_resume(small_corpus, tmp_path, 3, ["training.batch_size=12"],
                    signal_ranks=[0, 2, 1])


def test_ctrl_c_checkpoints_and_stops_like_sigterm(small_corpus, tmp_path):
    stop_and_resume(small_corpus, tmp_path, 1, [], signal_ranks=[0], sig=signal.SIGINT)


def test_a_stopped_rank_fails_the_job_within_the_timeout(small_corpus, tmp_path):
    proc = launch(2, args(*small_corpus, tmp_path, "parallel.timeout_s=5"))
    wait_for_step(proc, tmp_path, 3)
    pids = worker_pids(proc.pid, 2)
    os.kill(pids[1], signal.SIGSTOP)
    start = time.monotonic()
    try:
        out = finish(proc, timeout=90)
    finally:
        for pid in pids.values():  # never leave a stopped process behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode != 0, out
    assert time.monotonic() - start < 90
    assert "parallel.timeout_s=5" in out, out  # the error names the key to change
