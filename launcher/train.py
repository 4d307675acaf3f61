"""`lotus-train train`: parse config, build, train, tear down."""

from __future__ import annotations

import dataclasses
import traceback
from pathlib import Path

import torch
import yaml

from launcher.capabilities import clip_mode, plan_run
from launcher.checkpoint import CheckpointError
from launcher.config import (
    PROJECTED_OPTIMIZERS,
    Config,
    ConfigError,
    config_to_dict,
    load_config,
)
from launcher.data import build_data
from launcher.distributed import (
    DistInfo,
    exit_process,
    from_rank0,
    init_distributed,
    is_grouped,
    made_a_group,
    start_cli_process,
    teardown,
)
from launcher.engines import build_engine
from launcher.run_dir import check_run_dir
from launcher.schedule import build_lr_scheduler
from launcher.trainer import Trainer, TrainingError
from lotus_dist.model import MODEL_SIZES


def run(cfg: Config, keep_alive: list[object] | None = None) -> dict:
    """Train as ``cfg`` says (this process is one rank of the job); return the summary.

    The training objects are freed before the process group is destroyed (``_train``
    returns first), while the group they reference is still registered, so dropping them
    destroys no group. ``keep_alive`` receives the trainer instead: the CLI passes one
    and then ends with ``exit_process``. Destroying a gloo group right after its last
    collective races its worker threads for the GIL, a deadlock CI met once.
    """
    dist_info = init_distributed(cfg.parallel.timeout_s)
    try:
        return _train(cfg, dist_info, keep_alive)
    finally:
        teardown()


def _train(cfg: Config, dist_info: DistInfo, keep_alive: list[object] | None) -> dict:
    # What runs (engine, accumulation) is decided once, and refused here if it cannot.
    plan = plan_run(cfg, dist_info.world_size, is_grouped(), dist_info.device)
    accum_steps = plan.accum_steps
    # Decided on rank 0 and shared, before anything is built: every rank stops together.
    problem, changes = from_rank0(check_run_dir(cfg) if dist_info.is_main else None)
    if problem:
        raise ConfigError(problem)
    torch.manual_seed(cfg.training.seed)
    train_data, eval_data, vocab_size = build_data(cfg, dist_info)
    model_cfg = dataclasses.replace(MODEL_SIZES[cfg.model.size], vocab_size=vocab_size,
                                    max_seq_len=cfg.model.max_seq_len)
    engine = build_engine(cfg, model_cfg, dist_info, plan)
    scheduler = build_lr_scheduler(engine.optimizer, cfg.training.warmup_steps,
                                   cfg.training.steps, cfg.training.min_lr_ratio)
    trainer = Trainer(cfg, dist_info, engine, scheduler, train_data, eval_data, accum_steps)
    if dist_info.is_main:
        Path(cfg.run.dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.run.dir) / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
        trainer.log(f"{cfg.model.size} ({model_cfg.num_params / 1e6:.1f}M params) with "
                    f"{cfg.optim.name} on {dist_info.world_size} rank(s) ({engine.name}), "
                    f"{cfg.training.steps} steps -> {cfg.run.dir}")
        t, o = cfg.training, cfg.optim
        rank = f", rank {o.rank}" if o.name in PROJECTED_OPTIMIZERS else ""
        clip = clip_mode(cfg)
        trainer.log(f"batch {t.batch_size} x {t.seq_len} = {t.batch_size * t.seq_len:,} tokens "
                    f"per step ({accum_steps} micro-batch(es) of {t.micro_batch_size} per "
                    f"rank), lr {o.lr:g}{rank}, {clip}")
        if changes:
            trainer.log("resuming with changed settings: " + ", ".join(changes))
    if keep_alive is not None:
        keep_alive.append(trainer)
    summary = trainer.train()
    if dist_info.is_main:
        print_summary(summary)
    return summary


def print_summary(summary: dict) -> None:
    def ppl(key: str) -> str:
        value = summary.get(key)
        return "n/a" if value is None else f"{value:.2f}"

    print(f"done: {summary['steps']} steps, {summary['tokens_seen']:,} tokens at "
          f"{summary['tokens_per_s']:,.0f} tok/s; eval perplexity "
          f"{ppl('initial_eval_ppl')} -> {ppl('final_eval_ppl')}; "
          f"refreshes {sum(summary['refreshes_per_matrix'].values())} over "
          f"{len(summary['refreshes_per_matrix'])} matrices")


def main(config_path: str | None, overrides: list[str]) -> None:
    """Errors a user can fix (config, data, checkpoint, divergence, a hung rank) end the
    run with one clear line instead of a traceback. Under a process group every ending,
    a crash included, leaves through ``exit_process``, so no rank can hang or abort in
    interpreter shutdown after it is done."""
    alive: list[object] = []
    start_cli_process()
    try:
        cfg = load_config(config_path, overrides)
        run(cfg, keep_alive=alive)
    except (ConfigError, CheckpointError, TrainingError, FileNotFoundError, ValueError) as e:
        exit_process(f"lotus-train: error: {e}")
    except RuntimeError as e:
        if not is_collective_timeout(e):
            crash(e)
        exit_process(f"lotus-train: error: a collective waited more than parallel.timeout_s="
                     f"{cfg.parallel.timeout_s:g} s for another rank ({str(e).strip()}): a "
                     "rank is stopped, dead or stuck elsewhere (see the other ranks' logs). "
                     "Relaunch to resume from the last checkpoint; raise parallel.timeout_s "
                     "if a step legitimately waits that long")
    except BaseException as e:  # re-raised, or reported and exited
        crash(e)
    exit_process(0)


def crash(e: BaseException) -> None:
    """An unexpected error: re-raised in one process; under a process group, its
    traceback printed and the process ended with status 1 (130 on a second Ctrl-C)."""
    if not made_a_group():
        raise e
    traceback.print_exception(e)
    exit_process(130 if isinstance(e, KeyboardInterrupt) else 1)


def is_collective_timeout(e: BaseException) -> bool:
    """gloo raises 'Timed out waiting ...'; NCCL's watchdog 'Watchdog caught collective
    operation timeout' (when it raises instead of aborting the process)."""
    text = str(e)
    return "Timed out waiting" in text or "collective operation timeout" in text
