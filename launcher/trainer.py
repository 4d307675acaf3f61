"""The training loop: accumulate to the global batch, step, evaluate, log, checkpoint."""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from launcher import checkpoint
from launcher.config import Config
from launcher.distributed import DistInfo, all_reduce_mean, all_reduce_sum
from launcher.engines.base import Engine
from launcher.metrics import MetricsLogger, write_summary
from launcher.train_state import JsonState, TrainState
from lotus_dist import LotusAdamW

# Dense bf16 peak of the GPUs we expect, for MFU; unknown devices report no MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


class TrainingError(RuntimeError):
    """Training cannot go on (diverged, too many skipped steps)."""


class Trainer:
    """Owns the built pieces and runs ``cfg.training.steps`` optimizer steps.

    Args:
        engine: carries out backward, gradient sync, clipping and the update.
        train_data / eval_data: iterators of this rank's slice of each global batch.
    """

    def __init__(self, cfg: Config, dist_info: DistInfo, engine: Engine, scheduler: Any,
                 train_data: Any, eval_data: Any, accum_steps: int) -> None:
        self.cfg, self.dist, self.engine = cfg, dist_info, engine
        self.model, self.raw_model = engine.model, engine.raw_model
        self.optimizer, self.scheduler = engine.optimizer, scheduler
        self.train_data, self.eval_data = train_data, eval_data
        self.accum_steps = accum_steps
        self.state = TrainState()
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_dir = self.run_dir / "ckpt"
        self.device = dist_info.device
        self._stop_signal: int | None = None
        self.tokens_per_step = cfg.training.batch_size * cfg.training.seq_len
        use_bf16 = cfg.training.dtype == "bf16" or (
            cfg.training.dtype == "auto" and self.device.type == "cuda")
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                         if use_bf16 else contextlib.nullcontext())

    # ----------------------------------------------------------------- checkpoint state

    def checkpoint_state(self) -> dict[str, Any]:
        return {**self.engine.checkpoint_items(),
                "lr_scheduler": self.scheduler, "dataloader": JsonState(self.train_data),
                "train_state": self.state, "rng": checkpoint.RNGState()}

    def maybe_resume(self) -> int | None:
        """Load the checkpoint ``checkpoint.resume`` names; return its step or None."""
        path = checkpoint.resolve_resume(self.ckpt_dir, self.cfg.checkpoint.resume)
        if path is None:
            return None
        checkpoint.load(path, self.checkpoint_state())
        self.log(f"resumed from step {self.state.step} ({path})")
        return self.state.step

    def save_checkpoint(self) -> None:
        path = checkpoint.save(self.ckpt_dir, self.state.step, self.checkpoint_state(),
                               keep_latest=self.cfg.checkpoint.keep_latest)
        self.log(f"saved checkpoint {path}")

    # ----------------------------------------------------------------- the loop

    def train(self) -> dict[str, Any]:
        cfg = self.cfg.training
        resumed_step = self.maybe_resume()
        metrics = MetricsLogger(self.run_dir, self.dist.rank, self.cfg.run.tensorboard,
                                cfg.steps, resume_step=resumed_step,
                                log_all_ranks=self.cfg.run.log_all_ranks)
        self._install_signal_handlers()
        if resumed_step is None:
            initial = self.evaluate()
            self.state.initial_eval_loss = initial["eval_loss"]
            self.state.initial_eval_ppl = initial["eval_ppl"]
            metrics.log_eval(0, initial)
        train_iter = iter(self.train_data)
        window: list[float] = []
        window_start = time.perf_counter()
        last_eval: dict[str, float] = {}
        try:
            while self.state.step < cfg.steps:
                start = time.perf_counter()
                loss, grad_norm = self.train_step(train_iter)
                self.state.step += 1
                self.state.tokens_seen += self.tokens_per_step
                step_time = time.perf_counter() - start
                self.state.train_seconds += step_time
                window.append(loss)
                step = self.state.step
                if step % cfg.log_interval == 0 or step == cfg.steps:
                    elapsed = time.perf_counter() - window_start
                    row = self._train_row(window, grad_norm, len(window), elapsed)
                    metrics.log_train(step, row, elapsed / len(window))
                    window, window_start = [], time.perf_counter()
                ev_interval = self.cfg.eval.interval
                if (ev_interval and step % ev_interval == 0) or step == cfg.steps:
                    last_eval = self.evaluate()
                    metrics.log_eval(step, last_eval)
                    window_start = time.perf_counter()  # eval time is not step time
                ck_interval = self.cfg.checkpoint.interval
                if self._stop_signal is not None or (ck_interval and step % ck_interval == 0) \
                        or step == cfg.steps:
                    self.save_checkpoint()
                    window_start = time.perf_counter()
                if self._stop_signal is not None:
                    self.log(f"stopping at step {step} on signal {self._stop_signal} "
                             "(checkpoint written; relaunch to resume)")
                    break
            if not last_eval and self._stop_signal is None:  # resumed a finished run
                self.log(f"the run had already reached training.steps={cfg.steps}")
                last_eval = self.evaluate()
        finally:
            metrics.close()
        summary = self._summary(last_eval)
        if self.dist.is_main:
            write_summary(self.run_dir, summary)
        return summary

    def train_step(self, train_iter: Iterator[torch.Tensor]) -> tuple[float, float]:
        """One optimizer step over this rank's slice of one global batch.

        Returns the global mean loss and the gradient norm (nan in per-layer mode, where
        gradients are consumed inside backward). A non-finite loss or gradient skips
        the update (the data and the schedule still advance, so a resumed run stays
        aligned) and is counted; too many stop the run.
        """
        self.model.train()
        batch = next(train_iter).to(self.device, non_blocking=True)
        micro_batches = batch.split(self.cfg.training.micro_batch_size)
        loss_sum = torch.zeros((), device=self.device)
        for i, micro in enumerate(micro_batches):
            with self.engine.micro_batch(last=i == len(micro_batches) - 1):
                with self.autocast:
                    logits = self.model(micro[:, :-1])
                loss = F.cross_entropy(logits.flatten(0, 1).float(), micro[:, 1:].flatten())
                self.engine.backward(loss / self.accum_steps)
            loss_sum += loss.detach()
        loss = float(all_reduce_mean(loss_sum / self.accum_steps))
        grad_norm = self.engine.clip_grad_norm(self.cfg.training.grad_clip)
        skipped_before = getattr(self.optimizer, "skipped_steps", 0)
        if math.isfinite(loss) and (self.engine.per_layer or math.isfinite(grad_norm)):
            self.engine.optimizer_step()
        else:
            self.state.skipped_steps += 1
        self.state.skipped_steps += getattr(self.optimizer, "skipped_steps", 0) - skipped_before
        self.scheduler.step()
        self.engine.zero_grad()
        if self.state.skipped_steps > self.cfg.training.max_skipped_steps:
            raise TrainingError(
                f"{self.state.skipped_steps} steps skipped for non-finite loss or gradients "
                f"(more than training.max_skipped_steps={self.cfg.training.max_skipped_steps}); "
                "the run has diverged: lower optim.lr or raise training.warmup_steps, then "
                "resume from the last checkpoint")
        return loss, grad_norm

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-weighted mean loss over the fixed validation batches of all ranks."""
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batch in self.eval_data:
            batch = batch.to(self.device)
            for micro in batch.split(self.cfg.training.micro_batch_size):
                with self.autocast:
                    logits = self.model(micro[:, :-1])
                loss = F.cross_entropy(logits.flatten(0, 1).float(), micro[:, 1:].flatten(),
                                       reduction="sum")
                total += torch.stack([loss.double(), torch.tensor(micro[:, 1:].numel(),
                                                                  dtype=torch.float64,
                                                                  device=self.device)])
        loss_sum, count = all_reduce_sum(total).tolist()
        if count == 0:
            raise TrainingError("the validation split yielded no batch; add validation data "
                                "under data.path or set eval.batches")
        mean = loss_sum / count
        return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50.0))}

    # ----------------------------------------------------------------- reporting

    def _train_row(self, losses: list[float], grad_norm: float, steps: int,
                   elapsed: float) -> dict[str, Any]:
        tokens_per_s = steps * self.tokens_per_step / max(elapsed, 1e-9)
        row: dict[str, Any] = {
            "loss": sum(losses) / len(losses), "lr": self.scheduler.get_last_lr()[-1],
            "tokens_per_s": tokens_per_s, "grad_norm": grad_norm,
            "peak_memory_gb": peak_memory_bytes(self.device) / 2**30,
            "skipped_steps": self.state.skipped_steps,
        }
        mfu = self._mfu(tokens_per_s)
        if mfu is not None:
            row["mfu"] = mfu
        row.update(refresh_stats(self.optimizer))
        return row

    def _mfu(self, tokens_per_s: float) -> float | None:
        if self.device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(self.device)
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        if peak is None:
            return None
        flops = self.raw_model.flops_per_token(self.cfg.training.seq_len) * tokens_per_s
        return flops / (peak * self.dist.world_size)

    def _summary(self, final_eval: dict[str, float]) -> dict[str, Any]:
        telemetry = self.optimizer.telemetry() if isinstance(self.optimizer, LotusAdamW) else {}
        return {
            "steps": self.state.step,
            "final_eval_loss": final_eval.get("eval_loss"),
            "final_eval_ppl": final_eval.get("eval_ppl"),
            "initial_eval_loss": self.state.initial_eval_loss,
            "initial_eval_ppl": self.state.initial_eval_ppl,
            "tokens_seen": self.state.tokens_seen,
            "wall_time_s": self.state.train_seconds,
            "tokens_per_s": self.state.tokens_seen / max(self.state.train_seconds, 1e-9),
            "peak_memory_bytes": peak_memory_bytes(self.device),
            "skipped_steps": self.state.skipped_steps,
            "world_size": self.dist.world_size,
            "refreshes_per_matrix": {k: v["refresh_count"] for k, v in telemetry.items()},
            "engine": self.engine.name,
            "bytes_per_step": self.engine.comm_bytes_per_step(),
        }

    def log(self, message: str) -> None:
        if self.dist.is_main or self.cfg.run.log_all_ranks:
            print(message, flush=True)

    def _install_signal_handlers(self) -> None:
        """SIGUSR1 (SLURM's warning before a time limit) and SIGTERM checkpoint and stop at
        the end of the current step."""
        def handler(signum: int, _frame: Any) -> None:
            self._stop_signal = signum

        for sig in (signal.SIGUSR1, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                signal.signal(sig, handler)


def refresh_stats(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Refresh counts and switch statistics per layer group (self_attn, mlp)."""
    if not isinstance(optimizer, LotusAdamW):
        return {}
    groups: dict[str, list[dict[str, float]]] = {}
    for name, t in optimizer.telemetry().items():
        kind = "self_attn" if "self_attn" in name else "mlp" if "mlp" in name else "other"
        groups.setdefault(kind, []).append(t)
    out = {}
    for kind, rows in groups.items():
        out[f"refreshes/{kind}"] = sum(r["refresh_count"] for r in rows)
        for key in ("energy", "switch_metric"):
            vals = [r[key] for r in rows if math.isfinite(r[key])]
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
