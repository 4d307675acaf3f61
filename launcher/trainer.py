"""The training loop: accumulate to the global batch, step, evaluate, log, checkpoint."""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from launcher import checkpoint
from launcher.config import LOW_RANK_METHODS, Config, config_to_dict, profile_window
from launcher.distributed import DistInfo, agree_on_step, all_reduce_sum
from launcher.engines.base import Engine, param_dtype
from launcher.flops import cuda_memory_bytes, device_peak_flops, throughput
from launcher.health import DivergenceGuard
from launcher.metrics import MetricsLogger, import_wandb, start_wandb, write_summary
from launcher.profiling import StepProfiler
from launcher.schedule import LRSchedule
from launcher.train_state import JsonState, TrainState
from lotus_dist import LotusAdamW
from lotus_dist.comm import local_view
from lotus_dist.optim import NonFiniteGradientError
from lotus_dist.precision import upcast
from lotus_dist.rso import RSOAdamW


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, too many skipped steps)."""


@dataclass(frozen=True)
class StepOutcome:
    """One optimizer step as every rank agreed on it."""

    loss: float
    """Global mean training loss."""
    grad_norm: float
    """Global gradient norm (nan in per-layer mode and on a skipped step)."""
    skipped: bool
    """The update was skipped for a non-finite loss or gradient."""
    stop: bool
    """A stop signal reached some rank: checkpoint and stop after this step."""
    saving: bool
    """A background checkpoint is still being written on some rank."""


class Trainer:
    """Owns the built pieces and runs ``cfg.training.steps`` optimizer steps.

    Every decision that changes what ranks do next (skip the update, stop on a signal,
    publish a background checkpoint) is taken from one all-reduce per step
    (``agree_on_step``); the divergence guard and the save policy read only agreed
    values, so every rank saves, rolls back and stops at the same step.

    Args:
        engine: carries out backward, gradient sync, clipping and the update.
        train_data / eval_data: iterators of this rank's slice of each global batch.
    """

    def __init__(self, cfg: Config, dist_info: DistInfo, engine: Engine, scheduler: LRSchedule,
                 train_data: Any, eval_data: Any, accum_steps: int) -> None:
        self.cfg, self.dist, self.engine = cfg, dist_info, engine
        self.model, self.raw_model = engine.model, engine.raw_model
        self.optimizer, self.scheduler = engine.optimizer, scheduler
        self.train_data, self.eval_data = train_data, eval_data
        self.accum_steps = accum_steps
        self.state = TrainState()
        t = cfg.training
        self.guard = DivergenceGuard(t.max_skipped_steps, t.spike_factor,
                                     cfg.checkpoint.healthy_steps)
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_dir = self.run_dir / "ckpt"
        self.device = dist_info.device
        self._stop_signal: int | None = None
        self._pending_save: checkpoint.PendingSave | None = None
        self._save_due = False
        self._last_saved_step: int | None = None
        self.tokens_per_step = cfg.training.batch_size * cfg.training.seq_len
        self.autocast = compute_autocast(cfg.training.dtype, self.device)
        #: The dtype losses are summed in: fp64 in an fp64 run, where they are compared.
        self.loss_dtype = param_dtype(cfg.training.dtype)
        #: Dense bf16 peak FLOP/s of this device for MFU; None where unknown (CPU).
        self.peak_flops = device_peak_flops(self.device)
        if cfg.run.wandb_project:
            import_wandb()  # on every rank: a missing wandb stops them all, not rank 0 alone
        self._wandb_run: Any = None

    # ----------------------------------------------------------------- checkpoint state

    def checkpoint_state(self) -> dict[str, Any]:
        return {**self.engine.checkpoint_items(),
                "lr_scheduler": self.scheduler, "dataloader": JsonState(self.train_data),
                "train_state": self.state, "health": self.guard.state,
                "rng": checkpoint.RNGState()}

    def maybe_resume(self) -> int | None:
        """Load the checkpoint ``checkpoint.resume`` names; return its step or None."""
        path = checkpoint.resolve_resume(self.ckpt_dir, self.cfg.checkpoint.resume)
        if path is None:
            return None
        self._load(path)
        self.log(f"resumed from step {self.state.step} ({path})")
        for change in self.scheduler.changes_on_resume():
            self.log(f"the learning-rate schedule changed on resume: {change}")
        return self.state.step

    def _load(self, path: Path) -> None:
        checkpoint.load(path, self.checkpoint_state())
        self.scheduler.scale = self.state.lr_scale
        self.scheduler.apply()  # the optimizer's groups came back with the saved lr
        self.guard.forgive()

    def save_checkpoint(self) -> None:
        """Save now (background when checkpoint.async), then prune what is validated."""
        self.finish_pending_save()
        state, step = self.checkpoint_state(), self.state.step
        if self.cfg.checkpoint.async_:
            self._pending_save = checkpoint.save_async(self.ckpt_dir, step, state)
            self.log(f"writing checkpoint step-{step} in the background")
        else:
            path = checkpoint.save(self.ckpt_dir, step, state)
            self.log(f"saved checkpoint {path}")
            self._published(step)

    def finish_pending_save(self) -> None:
        """Publish the background checkpoint (collective: every rank calls it at the same
        step, after ``agree_on_step`` said every rank has finished writing, or to wait)."""
        if self._pending_save is None:
            return
        pending, self._pending_save = self._pending_save, None
        path = pending.publish()
        self.log(f"saved checkpoint {path}")
        self._published(pending.step)

    def _published(self, step: int) -> None:
        self._last_saved_step = step
        self._prune(protect_from=step - self.cfg.checkpoint.healthy_steps)

    def _prune(self, protect_from: int | None) -> None:
        """Keep ``checkpoint.keep_latest`` checkpoints, plus the newest one at or before
        ``protect_from``: a new checkpoint counts as good only once ``healthy_steps``
        good steps followed it, and until then the last validated one stays."""
        keep = self.cfg.checkpoint.keep_latest
        if keep > 0:
            checkpoint.prune(self.ckpt_dir, keep, protect_step=protect_from)

    # ----------------------------------------------------------------- the loop

    def train(self) -> dict[str, Any]:
        cfg = self.cfg.training
        checkpoint.remove_scratch(self.ckpt_dir)
        resumed_step = self.maybe_resume()
        if self.cfg.run.wandb_project and self.dist.is_main:
            self._wandb_run = start_wandb(self.cfg.run.wandb_project, self.run_dir,
                                          config_to_dict(self.cfg))
        self.metrics = self._open_metrics(resumed_step)
        profiler = StepProfiler(
            profile_window(cfg.profile_steps) if self.dist.is_main or self.cfg.run.log_all_ranks
            else None, self.run_dir / "profile", self.dist.rank, self.device)
        previous_handlers = self._install_signal_handlers()
        last_eval: dict[str, float] = {}
        stopped = False
        try:
            if resumed_step is None:
                initial = self.evaluate()
                self.state.initial_eval_loss = initial["eval_loss"]
                self.state.initial_eval_ppl = initial["eval_ppl"]
                self.metrics.log_eval(0, initial)
            train_iter = iter(self.train_data)
            window: list[float] = []
            window_start = time.perf_counter()
            while self.state.step < cfg.steps:
                profiler.before_step(self.state.step + 1)
                start = time.perf_counter()
                outcome = self.train_step(train_iter)
                self.state.step += 1
                self.state.tokens_seen += self.tokens_per_step
                step_time = time.perf_counter() - start
                self.state.train_seconds += step_time
                step = self.state.step
                profiler.after_step(step)
                bad = self.guard.record(step, outcome.loss, outcome.skipped)
                if bad and not outcome.skipped:
                    self.log(f"step {step}: loss spike ({outcome.loss:.4f}, more than "
                             f"training.spike_factor={cfg.spike_factor} x the recent mean "
                             f"{self.guard.state.loss_ema:.4f})")
                window.append(outcome.loss)
                if step % cfg.log_interval == 0 or step == cfg.steps:
                    elapsed = time.perf_counter() - window_start
                    row = self._train_row(window, outcome.grad_norm, len(window), elapsed)
                    self.metrics.log_train(step, row, elapsed / len(window))
                    window, window_start = [], time.perf_counter()
                if self.guard.diverged:
                    train_iter = self._roll_back_or_stop()
                    window, window_start = [], time.perf_counter()
                    continue
                if self._pending_save is not None and not outcome.saving:
                    self.finish_pending_save()
                ev_interval = self.cfg.eval.interval
                if (ev_interval and step % ev_interval == 0) or step == cfg.steps:
                    last_eval = self.evaluate()
                    self.metrics.log_eval(step, last_eval)
                    window_start = time.perf_counter()  # eval time is not step time
                if self._checkpoint_if_due(step, outcome.stop):
                    window_start = time.perf_counter()
                if outcome.stop:
                    stopped = True
                    break
            self.finish_pending_save()
            if stopped:
                why = (f"on signal {self._stop_signal}" if self._stop_signal is not None
                       else "on a stop signal another rank received")
                self.log(f"stopping at step {self.state.step} {why} (relaunch to resume from "
                         f"{checkpoint.find_latest(self.ckpt_dir) or 'the start'})")
            if self._last_saved_step is not None:
                self._prune(protect_from=None)
            if not last_eval and not stopped:  # resumed a finished run
                self.log(f"the run had already reached training.steps={cfg.steps}")
                last_eval = self.evaluate()
        finally:
            profiler.close()
            self.metrics.close()
            if self._wandb_run is not None:
                self._wandb_run.finish()
                self._wandb_run = None
            restore_signal_handlers(previous_handlers)
        summary = self._summary(last_eval)
        if self.dist.is_main:
            write_summary(self.run_dir, summary)
        return summary

    def _checkpoint_if_due(self, step: int, stop: bool) -> bool:
        """Save at the interval, the last step and on a stop, but only while the guard says
        the recent steps were good: a save that is due otherwise waits for health to
        return (or, on a stop or the last step, is not written). Returns True if it saved."""
        interval = self.cfg.checkpoint.interval
        due = (interval and step % interval == 0) or step == self.cfg.training.steps or stop
        self._save_due = self._save_due or bool(due)
        if self._save_due and self.guard.may_save(step):
            self._save_due = False
            self.save_checkpoint()
            return True
        if due:
            self.log(f"step {step}: checkpoint withheld, the last "
                     f"checkpoint.healthy_steps={self.cfg.checkpoint.healthy_steps} steps were "
                     f"not all good (bad step {self.guard.state.last_bad_step})")
        if (self._last_saved_step is not None
                and step - self._last_saved_step == self.cfg.checkpoint.healthy_steps):
            self._prune(protect_from=self._last_saved_step)  # the newest is validated now
        return False

    def _roll_back_or_stop(self) -> Iterator[torch.Tensor]:
        """Too many bad steps in a row. The checkpoint at step s holds the weights after
        update s, which the loss of step s + 1 first tests, so only checkpoints before the
        step preceding the first bad one are trusted. ``stop`` sets newer ones aside (so a
        relaunch resumes from a trusted one) and raises; ``rollback`` reloads the newest
        trusted one with the learning rate scaled down and returns a fresh data iterator."""
        t, step = self.cfg.training, self.state.step
        first_bad = self.guard.streak_start
        self.finish_pending_save()
        set_aside = checkpoint.set_aside(self.ckpt_dir, from_step=first_bad - 1)
        if set_aside:
            self.log(f"set aside checkpoints from after the divergence began: "
                     f"{', '.join(p.name for p in set_aside)}")
        trusted = checkpoint.find_latest(self.ckpt_dir)
        what = (f"{self.guard.state.bad_streak} bad steps in a row (non-finite or spiking "
                f"loss) up to step {step}, more than training.max_skipped_steps="
                f"{t.max_skipped_steps}")
        if t.on_divergence == "stop" or self.state.rollbacks >= t.max_rollbacks or not trusted:
            where = (f"it resumes from {trusted}" if trusted
                     else "no checkpoint precedes the divergence, so it starts afresh")
            reason = (f"; {self.state.rollbacks} rollback(s) did not help"
                      if self.state.rollbacks else "")
            hint = "; or set training.on_divergence=rollback" if t.on_divergence == "stop" else ""
            raise TrainingError(
                f"the run diverged: {what}{reason}. Lower optim.lr (the new value applies on "
                f"resume) or raise training.warmup_steps and relaunch: {where}{hint}")
        skipped, rollbacks = self.state.skipped_steps, self.state.rollbacks
        lr_scale = self.state.lr_scale * t.rollback_lr_factor
        self._load(trusted)
        self.state.skipped_steps, self.state.rollbacks = skipped, rollbacks + 1
        self.state.lr_scale = self.scheduler.scale = lr_scale
        self.scheduler.apply()
        self.log(f"the run diverged at step {step} ({what}); rolled back to step "
                 f"{self.state.step} ({trusted}) with the learning rate x{lr_scale:g} "
                 f"(rollback {rollbacks + 1} of training.max_rollbacks={t.max_rollbacks})")
        self.metrics.close()
        self.metrics = self._open_metrics(self.state.step)
        self._save_due, self._last_saved_step = False, self.state.step
        return iter(self.train_data)

    def _open_metrics(self, resume_step: int | None) -> MetricsLogger:
        return MetricsLogger(self.run_dir, self.dist.rank, self.cfg.run.tensorboard,
                             self.cfg.training.steps, resume_step=resume_step,
                             log_all_ranks=self.cfg.run.log_all_ranks,
                             config=config_to_dict(self.cfg), wandb_run=self._wandb_run)

    def train_step(self, train_iter: Iterator[torch.Tensor]) -> StepOutcome:
        """One optimizer step over this rank's slice of one global batch.

        A non-finite loss or gradient on any rank skips the update on every rank (the
        data and the schedule still advance, so a resumed run stays aligned), or stops the
        run when ``optim.nonfinite=raise``.
        """
        self.model.train()
        batch = next(train_iter).to(self.device, non_blocking=True)
        micro_batches = batch.split(self.cfg.training.micro_batch_size)
        loss_sum = torch.zeros((), device=self.device, dtype=self.loss_dtype)
        for i, micro in enumerate(micro_batches):
            with self.engine.micro_batch(last=i == len(micro_batches) - 1):
                with self.autocast:
                    logits = self.model(micro[:, :-1])
                loss = F.cross_entropy(upcast(logits.flatten(0, 1)), micro[:, 1:].flatten())
                self.engine.backward(loss / self.accum_steps)
            loss_sum += loss.detach()
        skipped_before = getattr(self.optimizer, "skipped_steps", 0)
        try:
            grad_norm = self.engine.clip_grad_norm(self.cfg.training.grad_clip)
        except NonFiniteGradientError as e:  # agreed by every rank inside prepare()
            raise TrainingError(f"step {self.state.step + 1}: {e}") from None
        nonfinite = not self.engine.per_layer and not math.isfinite(grad_norm)
        saving = self._pending_save is not None and not self._pending_save.done()
        verdict = agree_on_step(loss_sum / self.accum_steps, nonfinite=nonfinite,
                                stop=self._stop_signal is not None, saving=saving)
        if verdict.nonfinite and self.cfg.optim.nonfinite == "raise":
            raise TrainingError(
                f"step {self.state.step + 1}: non-finite loss or gradient norm (loss "
                f"{verdict.loss}, gradient norm {grad_norm}) and optim.nonfinite=raise; lower "
                "optim.lr, or set optim.nonfinite=skip to skip such steps")
        if not verdict.nonfinite:
            self.engine.optimizer_step()
        skipped = verdict.nonfinite or getattr(self.optimizer, "skipped_steps", 0) > skipped_before
        self.state.skipped_steps += skipped
        self.scheduler.step()
        self.engine.zero_grad()
        return StepOutcome(loss=verdict.loss, grad_norm=grad_norm, skipped=skipped,
                           stop=verdict.stop, saving=verdict.saving)

    def evaluate(self) -> dict[str, float]:
        """Token-weighted mean loss over the fixed validation batches of all ranks."""
        total = eval_loss_sums(self.model, self.eval_data, self.cfg.training.micro_batch_size,
                               self.device, self.autocast)
        return eval_metrics(*all_reduce_sum(total).tolist())

    # ----------------------------------------------------------------- reporting

    def _train_row(self, losses: list[float], grad_norm: float, steps: int,
                   elapsed: float) -> dict[str, Any]:
        tokens_per_s = steps * self.tokens_per_step / max(elapsed, 1e-9)
        row: dict[str, Any] = {
            "loss": sum(losses) / len(losses), "lr": self.scheduler.get_last_lr()[-1],
            "tokens_per_s": tokens_per_s, "grad_norm": grad_norm,
            "peak_memory_bytes": peak_memory_bytes(self.device),
            "skipped_steps": self.state.skipped_steps,
            "skipped_records": self.train_data.skipped_records,
        }
        for error in self.train_data.new_data_errors():
            self.log(f"data: skipped {error['reason']} in {error['file']} at byte "
                     f"{error['offset']} (data.on_error=skip)")
        row.update(self._throughput(tokens_per_s))
        row.update(cuda_memory_bytes(self.device))
        row.update(refresh_stats(self.optimizer))
        return row

    def _throughput(self, tokens_per_s: float) -> dict[str, Any]:
        return throughput(tokens_per_s, self.dist.world_size,
                          self.raw_model.flops_per_token(self.cfg.training.seq_len),
                          self.peak_flops)

    def _summary(self, final_eval: dict[str, float]) -> dict[str, Any]:
        telemetry = (self.optimizer.telemetry()
                     if isinstance(self.optimizer, LotusAdamW | RSOAdamW) else {})
        tokens_per_s = self.state.tokens_seen / max(self.state.train_seconds, 1e-9)
        return {
            "steps": self.state.step,
            "final_eval_loss": final_eval.get("eval_loss"),
            "final_eval_ppl": final_eval.get("eval_ppl"),
            "initial_eval_loss": self.state.initial_eval_loss,
            "initial_eval_ppl": self.state.initial_eval_ppl,
            "tokens_seen": self.state.tokens_seen,
            "wall_time_s": self.state.train_seconds,
            "tokens_per_s": tokens_per_s,
            "mfu": None,  # replaced below where the device's peak is known
            **self._throughput(tokens_per_s),
            "peak_memory_bytes": peak_memory_bytes(self.device),
            "skipped_steps": self.state.skipped_steps,
            "skipped_records": self.train_data.skipped_records,
            "eval_skipped_records": self.eval_data.skipped_records,
            "rollbacks": self.state.rollbacks,
            "world_size": self.dist.world_size,
            "refreshes_per_matrix": {k: v["refresh_count"] for k, v in telemetry.items()},
            "engine": self.engine.name,
            "bytes_per_step": self.engine.comm_bytes_per_step(),
            "optimizer": self.cfg.optim.name,
            "rank": (self.cfg.optim.rank
                     if self.cfg.optim.name in LOW_RANK_METHODS else None),
            "optimizer_state_bytes": optimizer_state_bytes(self.optimizer),
        }

    def log(self, message: str) -> None:
        if self.dist.is_main or self.cfg.run.log_all_ranks:
            print(message, flush=True)

    def _install_signal_handlers(self) -> dict[int, Any]:
        """SIGUSR1 (SLURM's warning before a time limit), SIGTERM and a first Ctrl-C (SIGINT)
        checkpoint and stop at the end of the current step; all ranks stop at the same step
        (``agree_on_step``). A second Ctrl-C stops at once. Returns the handlers replaced,
        for ``restore_signal_handlers``."""
        def handler(signum: int, _frame: Any) -> None:
            if signum == signal.SIGINT and self._stop_signal is not None:
                raise KeyboardInterrupt
            self._stop_signal = signum
            if signum == signal.SIGINT:
                print("interrupted: checkpointing at the end of this step (Ctrl-C again to "
                      "stop at once)", flush=True)

        previous = {}
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread
                previous[sig] = signal.signal(sig, handler)
        return previous


def compute_autocast(training_dtype: str,
                     device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``training.dtype=bf16``, and for ``auto`` on CUDA; else none."""
    use_bf16 = training_dtype == "bf16" or (training_dtype == "auto" and device.type == "cuda")
    return (torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16
            else contextlib.nullcontext())


@torch.no_grad()
def eval_loss_sums(model: torch.nn.Module, batches: Iterable[torch.Tensor],
                   micro_batch_size: int, device: torch.device,
                   autocast: contextlib.AbstractContextManager) -> torch.Tensor:
    """[summed token loss, token count] (float64) over this rank's ``batches``, run in
    micro-batches as training runs them. The trainer all-reduces it over the ranks;
    ``lotus-train eval`` calls it in one process, so both report the same number."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = 0  # on the host: no copy to the device per micro-batch
    for batch in batches:
        batch = batch.to(device)
        for micro in batch.split(micro_batch_size):
            with autocast:
                logits = model(micro[:, :-1])
            loss = F.cross_entropy(upcast(logits.flatten(0, 1)), micro[:, 1:].flatten(),
                                   reduction="sum")
            loss_sum += loss.double()
            count += micro[:, 1:].numel()
    return torch.stack([loss_sum, loss_sum.new_tensor(float(count))])


def eval_metrics(loss_sum: float, count: float) -> dict[str, float]:
    """``eval_loss`` (mean per token) and ``eval_ppl`` from the summed loss and count."""
    if count == 0:
        raise TrainingError("the validation split yielded no batch; add validation data "
                            "under data.path or set eval.batches")
    mean = loss_sum / count
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50.0))}


def restore_signal_handlers(previous: dict[int, Any]) -> None:
    """Put back the handlers a run replaced: a handler left installed would keep the
    finished trainer (and through its engine every process group) alive until the
    interpreter exits, where destroying a gloo group's threads aborts the process."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of this rank's optimizer state (its shards under FSDP and ZeRO)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                local = local_view(value)
                total += local.numel() * local.element_size()
    return total


def refresh_stats(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Refresh counts (rso: subspaces redrawn) and switch statistics per layer group
    (self_attn, mlp)."""
    if not isinstance(optimizer, LotusAdamW | RSOAdamW):
        return {}
    groups: dict[str, list[dict[str, float]]] = {}
    for name, t in optimizer.telemetry().items():
        kind = "self_attn" if "self_attn" in name else "mlp" if "mlp" in name else "other"
        groups.setdefault(kind, []).append(t)
    out = {}
    for kind, rows in groups.items():
        out[f"refreshes/{kind}"] = sum(r["refresh_count"] for r in rows)
        for key in ("energy", "switch_metric"):
            vals = [r[key] for r in rows if key in r and math.isfinite(r[key])]
            if vals:
                out[f"{key}/{kind}"] = sum(vals) / len(vals)
    return out


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the allocator's peak. CPU: the process's peak resident set (VmHWM)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0
