"""Ending a multi-rank run leaves no communication thread behind to crash the exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from small_runs import small_run

from launcher.config import load_config
from launcher.train import run

REPO = Path(__file__).resolve().parents[1]
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
SHORT = ("training.steps=2", "training.warmup_steps=1", "eval.batches=1")

SCRIPT = """
import os
import lotus_dist
import torch
import torch.distributed as dist

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
dist.init_process_group("gloo", rank=0, world_size=1)
model = torch.nn.Linear(4, 4)
opt = lotus_dist.LotusAdamW(lotus_dist.lotus_param_groups(model, 2, target_modules=[""]))
model(torch.ones(2, 4)).sum().backward()
dist.all_reduce(model.weight.grad)
opt.step()
dist.destroy_process_group()
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(sorted(names))
"""


def test_destroying_the_process_group_stops_gloo_threads_after_an_optimizer_was_built():
    """torch._dynamo, first imported by an optimizer after init_process_group, would keep
    the process group (and its worker threads) alive past destroy_process_group; a worker
    thread freeing a finished collective during interpreter shutdown aborts the process.
    ``import lotus_dist`` imports it first."""
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         check=True).stdout
    assert "gloo" not in out, out


LEAKED_GROUP = """
import atexit
import torch.distributed as dist
from launcher.distributed import exit_process, init_distributed, teardown

info = init_distributed(timeout_s=60)
kept = dist.new_group(backend="gloo")  # a reference the way a library cache keeps one
dist.barrier()
teardown()
atexit.register(print, "interpreter shutdown ran")
print(f"rank {info.rank} finished", end="")
exit_process(0)
"""


def test_a_finished_distributed_run_exits_zero_without_interpreter_shutdown(tmp_path):
    """A group some cache keeps alive past teardown can abort interpreter shutdown after
    the run has finished; ``exit_process`` skips it and still flushes what was printed."""
    script = tmp_path / "leak.py"
    script.write_text(LEAKED_GROUP)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(script)], capture_output=True, text=True,
                          cwd=REPO, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "rank 0 finished" in proc.stdout and "rank 1 finished" in proc.stdout, proc.stdout
    assert "interpreter shutdown ran" not in proc.stdout


ONE_PROCESS_CLI = """
import atexit, sys
from launcher.__main__ import main

atexit.register(print, "interpreter shutdown ran")
sys.argv = ["lotus-train", "train", "--config", "configs/tiny.yaml", *sys.argv[1:]]
main()
"""


def test_the_executable_ends_a_one_process_run_without_interpreter_shutdown(small_corpus,
                                                                             tmp_path):
    """Threads left behind can abort interpreter shutdown after a finished one-process
    run too (CI saw it once): the ``lotus-train`` executable leaves through
    ``exit_process``, having written everything, and exits 0."""
    corpus, tokenizer = small_corpus
    script = tmp_path / "cli.py"
    script.write_text(ONE_PROCESS_CLI)
    sets = [f"--set={s}" for s in (f"data.path={corpus}", f"data.tokenizer={tokenizer}",
                                   f"run.dir={tmp_path / 'run'}", "training.steps=2",
                                   "training.seq_len=16", "model.max_seq_len=16",
                                   "training.batch_size=2", "training.micro_batch_size=2",
                                   "training.warmup_steps=0", "eval.batches=1",
                                   "run.tensorboard=false")]
    proc = subprocess.run([sys.executable, str(script), *sets], capture_output=True,
                          text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "done: 2 steps" in proc.stdout, proc.stdout
    assert "interpreter shutdown ran" not in proc.stdout
    assert (tmp_path / "run" / "summary.json").is_file()


def test_a_run_puts_back_the_signal_handlers_it_replaced(small_corpus, tmp_path):
    """A handler left installed keeps the finished trainer, its engine and through them
    the process groups alive until exit (and would act on a signal for a dead run)."""
    before = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    run(load_config("configs/tiny.yaml", small_run(*small_corpus, tmp_path, *SHORT)))
    assert {sig: signal.getsignal(sig) for sig in STOP_SIGNALS} == before


DEEPSPEED_GROUPS = """
import sys
from launcher.config import load_config
from launcher.distributed import exit_process
from launcher.train import run
import deepspeed.utils.groups as groups
alive = []
run(load_config("configs/tiny.yaml", sys.argv[1:]), keep_alive=alive)
assert groups._WORLD_GROUP is None, "DeepSpeed still holds its world group"
print("released")
exit_process(0)
"""


def test_teardown_releases_deepspeeds_process_groups(small_corpus, tmp_path):
    pytest.importorskip("deepspeed")
    script = tmp_path / "ds.py"
    script.write_text(DEEPSPEED_GROUPS)
    sets = small_run(*small_corpus, tmp_path / "run", *SHORT, "parallel.engine=deepspeed",
                     "parallel.deepspeed_config=configs/deepspeed/zero0.json")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(script), *sets], capture_output=True,
                          text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("released") == 2, proc.stdout[-2000:]
