"""DeepSpeed: ZeRO stages 0-3 from a JSON config; AdamW everywhere, Lotus where it is exact.

Wiring, top to bottom (``build_deepspeed_engine``):

1. Read ``parallel.deepspeed_config`` and fill the keys lotus-train owns from ``training.*``
   (``deepspeed_config``): a JSON that sets one of them to another value is an error, not
   a silent override, and so is an ``optimizer``, ``scheduler`` or ``fp16`` block.
2. Refuse, before anything is built, every combination that cannot give the algorithm
   the config asks for (``launcher.capabilities``); the message names the engine to use.
3. Build the model: whole on every rank at stages 0-2; at ZeRO-3 partitioned as it is
   built (``build_zero3_model``), so that no rank ever holds all of it.
4. Build the optimizer: torch AdamW, or ``ZeroLotusAdamW`` from the single-process param
   groups (so every matrix keeps its index and refresh seed), regrouped at ZeRO-1/2 so
   that each rank's partition of a projected group is whole matrices (plus zero padding),
   balanced by bytes.
5. ``deepspeed.initialize`` (with the padding registered on the model meanwhile); then
   ``bind`` maps what DeepSpeed handed the optimizer back to matrices and fails if a
   partition cuts one.

DeepSpeed owns gradient reduction, the gradient norm, clipping (``gradient_clipping`` =
``training.grad_clip``), skipping a step whose gradients are not finite, and the update
(all inside ``step``, which therefore runs in ``clip_grad_norm``); the trainer's
learning-rate schedule writes into the client optimizer's param groups, which DeepSpeed
reads. Checkpoints are DeepSpeed's own files inside our atomic ``step-N`` directory
(``DeepSpeedCheckpoint``): its fp32 master partitions and per-rank optimizer state do not
fit DCP's one-tensor-per-name model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from launcher.checkpoint import CheckpointError
from launcher.compile import maybe_compile
from launcher.config import Config, ConfigError
from launcher.distributed import DistInfo, join_one_process_group
from launcher.engines.base import Engine, param_dtype
from launcher.optimizer import build_optimizer
from lotus_dist.comm import DataParallelComm
from lotus_dist.deepspeed import PartitionLayoutError, ZeroLotusAdamW
from lotus_dist.model import Llama, LlamaConfig, build_model, init_module_weights

_FORBIDDEN_BLOCKS = {
    "optimizer": "the optimizer comes from optim.*",
    "scheduler": "the learning-rate schedule comes from training.warmup_steps and "
                 "training.min_lr_ratio",
    "fp16": "training.dtype offers fp32 and bf16; use training.dtype=bf16",
}
#: Switches that would stop DeepSpeed from reporting the gradient norm or from skipping a
#: step whose gradients are not finite: the engine relies on both (``clip_grad_norm``).
_REQUIRED_ON = {
    ("zero_optimization", "compute_grad_norm"): "lotus-train logs DeepSpeed's gradient norm "
                                                "and skips a step on a non-finite one",
    ("bf16", "check_grad_overflow"): "DeepSpeed must skip a step whose gradients are not "
                                     "finite (lotus-train and LotusAdamW rely on it)",
}


def deepspeed_config(cfg: Config, accum_steps: int, device: torch.device) -> dict[str, Any]:
    """The JSON at ``parallel.deepspeed_config`` with lotus-train's keys filled in.

    Filled: ``train_batch_size`` = training.batch_size, ``train_micro_batch_size_per_gpu``
    = training.micro_batch_size, ``gradient_accumulation_steps`` = micro-batches per rank
    per step, ``gradient_clipping`` = training.grad_clip and ``bf16.enabled`` from
    training.dtype (auto: bf16 on CUDA, fp32 on CPU). The JSON may leave them out or
    repeat the same values; a different value is a ConfigError naming both keys.

    Defaulted where the JSON leaves them out (its own value is kept): gradients reduced
    (``communication_data_type``) and, at ZeRO-1/2/3 under bf16, accumulated
    (``data_types.grad_accum_dtype``) in fp32, as FSDP does; DeepSpeed's default is bf16.
    Not accumulation at ZeRO-0: DeepSpeed refuses bf16 weights with fp32 accumulation.
    """
    path = cfg.parallel.deepspeed_config
    if path is None:
        raise ConfigError("parallel.engine=deepspeed needs parallel.deepspeed_config, e.g. "
                          "configs/deepspeed/zero1.json")
    try:
        ds = json.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"parallel.deepspeed_config={path}: cannot read it: {e.strerror}") \
            from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"parallel.deepspeed_config={path}: malformed JSON: {e}") from e
    ds = {k: v for k, v in ds.items() if not k.startswith("_")}  # "_comment" keys
    for block, why in _FORBIDDEN_BLOCKS.items():
        if block in ds and (block != "fp16" or ds[block].get("enabled", False)):
            raise ConfigError(f"{path}: remove the {block!r} block: {why}")
    for (section, key), why in _REQUIRED_ON.items():
        if ds.get(section, {}).get(key, True) is False:
            raise ConfigError(f"{path}: remove {section}.{key}=false: {why}")
    t = cfg.training
    bf16 = t.dtype == "bf16" or (t.dtype == "auto" and device.type == "cuda")
    filled = {
        ("train_batch_size",): (t.batch_size, "training.batch_size"),
        ("train_micro_batch_size_per_gpu",): (t.micro_batch_size, "training.micro_batch_size"),
        ("gradient_accumulation_steps",): (accum_steps, "training.batch_size / "
                                           "(training.micro_batch_size x world size)"),
        ("gradient_clipping",): (t.grad_clip, "training.grad_clip"),
        ("bf16", "enabled"): (bf16, "training.dtype"),
    }
    for keys, (value, source) in filled.items():
        section = ds
        for key in keys[:-1]:
            section = section.setdefault(key, {})
        given = section.get(keys[-1], value)
        if given != value:
            raise ConfigError(f"{path}: {'.'.join(keys)}={given!r} disagrees with {source} "
                              f"({value!r}); lotus-train fills it, so remove it from the JSON")
        section[keys[-1]] = value
    ds.setdefault("communication_data_type", "fp32")
    if bf16 and zero_stage(ds) > 0:
        ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    return ds


def zero_stage(ds: dict[str, Any]) -> int:
    """The ZeRO stage a DeepSpeed JSON asks for (0 when it says none)."""
    try:
        return int(ds.get("zero_optimization", {}).get("stage", 0))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"zero_optimization.stage must be 0, 1, 2 or 3: {e}") from e


def build_deepspeed_engine(cfg: Config, model_cfg: LlamaConfig, dist_info: DistInfo,
                           ds_cfg: dict[str, Any]) -> DeepSpeedEngine:
    """Steps 3-5 of the module docstring, on the JSON ``deepspeed_config`` filled and
    ``launcher.capabilities`` checked: every refusal happened before this."""
    stage = zero_stage(ds_cfg)
    try:
        import deepspeed  # optional dependency: only this engine needs it
    except ImportError as e:
        raise ConfigError("parallel.engine=deepspeed needs DeepSpeed: "
                          "pip install -c constraints.txt -e '.[deepspeed]'") from e

    _quiet_deepspeed(dist_info.device)
    join_one_process_group(dist_info.device, cfg.parallel.timeout_s)
    dtype = param_dtype(cfg.training.dtype)
    if stage == 3 and dtype != torch.float64:  # zero.Init holds fp32, bf16 and fp16 only
        model = build_zero3_model(model_cfg, cfg.training.seed, ds_cfg, dist_info.device)
    else:  # fp64 is for exactness runs of small models, built whole as at stages 0-2
        model = build_model(model_cfg, device=dist_info.device, seed=cfg.training.seed,
                            dtype=dtype)
    maybe_compile(model, cfg)
    # ZeRO-0 replicates every matrix: like plain DDP, the replicas average their switch
    # statistics and keep rank 0's bases, so they cannot drift apart on mixed GPUs
    comm = DataParallelComm() if stage == 0 and dist_info.world_size > 1 else None
    optimizer = build_optimizer(cfg.optim, model, seed=cfg.training.seed, comm=comm)
    if isinstance(optimizer, torch.optim.AdamW):
        client: torch.optim.Optimizer = optimizer
    else:
        client = ZeroLotusAdamW.from_lotus(optimizer)
        if stage in (1, 2):
            client.regroup_for_zero(dist_info.world_size)
    with (client.padding_registered(model) if isinstance(client, ZeroLotusAdamW)
          else contextlib.nullcontext()):
        ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=client, config=ds_cfg)
    if isinstance(client, ZeroLotusAdamW):
        _or_config_error(client.bind, ds_engine.optimizer)
    return DeepSpeedEngine(ds_engine, client, dist_info, stage)


def build_zero3_model(model_cfg: LlamaConfig, seed: int, ds_cfg: dict[str, Any],
                      device: torch.device) -> Llama:
    """``build_model(model_cfg, seed=seed)``'s weights, partitioned over the ranks as the
    model is built: no rank holds more than its partitions plus one module's parameters.

    Under ``deepspeed.zero.Init`` each module's parameters are partitioned as soon as its
    constructor returns (torch's own init of them draws from the global RNG, forked here
    so that the run's stream stays as the other engines leave it). Each module's
    parameters are then gathered in turn and rank 0 fills them as ``init_weights`` does;
    leaving ``GatheredParameters`` broadcasts its values into every rank's partition.
    The parameters are bf16 where the config enables it, else fp32; ``device`` is this
    rank's (DeepSpeed's ``LOCAL_RANK`` device, where zero.Init builds).
    """
    import deepspeed

    deepspeed.init_distributed()  # DeepSpeed's handle on the group already joined
    # no dtype= here: DeepSpeed 0.19 takes it from the config, and ignores an explicit one
    # on accelerators without fp16 (the CPU)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            deepspeed.zero.Init(config_dict_or_path=ds_cfg,
                                data_parallel_group=dist.group.WORLD):  # every rank: no TP or PP
        model = Llama(model_cfg)
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if own:
            with deepspeed.zero.GatheredParameters(own, modifier_rank=0):
                if dist.get_rank() == 0:
                    init_module_weights(module, name, seed)
    for buffer in model.buffers():  # zero.Init made the rotary tables bf16 as well
        buffer.data = buffer.data.float()
    model.init_buffers()
    return model


class DeepSpeedEngine(Engine):
    """The trainer's calls mapped onto a ``deepspeed.DeepSpeedEngine``.

    ``micro_batch`` tells DeepSpeed where the accumulation boundary is, so gradients are
    reduced once per optimizer step; ``backward`` leaves the loss unscaled (the trainer
    already divides by the accumulation steps).
    """

    name = "deepspeed"

    def __init__(self, ds_engine: Any, optimizer: torch.optim.Optimizer, dist_info: DistInfo,
                 stage: int) -> None:
        super().__init__(ds_engine, ds_engine.module, optimizer, dist_info)
        self.ds, self.stage = ds_engine, stage
        self.name = f"deepspeed_zero{stage}"
        self._stepped = True
        #: Whether DeepSpeed's step computes the global gradient norm and skips a step
        #: whose gradients are not finite: everywhere but at stage 0 in fp32.
        self.norm_in_step = stage > 0 or ds_engine.bfloat16_enabled()

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        self.ds.set_gradient_accumulation_boundary(last)
        self._stepped = False
        yield

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss, scale_wrt_gas=False)

    def clip_grad_norm(self, max_norm: float) -> float:
        """Global norm of the averaged gradient before clipping; inf when it is not finite.

        DeepSpeed computes this norm inside ``step``, where it also clips (with
        ``gradient_clipping``, which ``deepspeed_config`` set to ``max_norm``) and skips a
        step whose norm is not finite, so the step runs here and the norm is read after it
        (``get_global_grad_norm``): computing it beforehand would repeat DeepSpeed's
        reductions. A non-finite loss comes with non-finite gradients, so every step the
        trainer skips DeepSpeed skipped too. At stage 0 in fp32 DeepSpeed neither reports
        a norm nor skips, so the norm of the gradients (whole and already all-reduced on
        every rank) is computed here and ``optimizer_step`` steps when the trainer asks."""
        if self.norm_in_step:
            self.ds.step()
            self._stepped = True
            norm = self.ds.get_global_grad_norm()
        else:
            norms = [torch.linalg.vector_norm(p.grad, dtype=torch.float32)
                     for p in self.raw_model.parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack(norms))  # fp32 even for bf16 grads
        norm = float(norm)
        return norm if norm >= 0 else math.inf  # DeepSpeed reports inf/nan as -1

    def optimizer_step(self) -> None:
        """The step, where ``clip_grad_norm`` has not run it (stage 0 in fp32)."""
        if not self._stepped:
            self.ds.step()
            self._stepped = True

    def zero_grad(self) -> None:
        """DeepSpeed clears gradients in ``step``; a step the trainer skipped at stage 0 in
        fp32 (non-finite loss or norm) never reached it, so its gradients are dropped here."""
        if not self._stepped:
            self.ds.zero_grad()
            self._stepped = True

    def checkpoint_items(self) -> dict[str, Any]:
        return {"deepspeed": DeepSpeedCheckpoint(self.ds, self.stage)}

    def comm_bytes_per_step(self) -> dict[str, int]:
        """Payload per rank per optimizer step: gradients are reduced in full at every
        stage, in ``communication_data_type``; ZeRO-1/2 all-gather updated parameters
        once, ZeRO-3 gathers them for the forward and again for the backward. Lotus's
        zero padding at ZeRO-1/2 travels with the rest. (Lotus's telemetry table is
        all-reduced on log steps only, so it is not counted per step.)"""
        numel = sum(_numel(p) for p in self.raw_model.parameters())
        if isinstance(self.optimizer, ZeroLotusAdamW):
            numel += self.optimizer.padding_numel
        width = 2 if self.ds.bfloat16_enabled() else 4
        out = {"full_gradients": numel * self.ds.communication_data_type.itemsize}
        if self.stage in (1, 2):
            out["parameter_allgathers"] = numel * width
        elif self.stage == 3:
            out["parameter_allgathers"] = 2 * numel * width
        return out


class DeepSpeedCheckpoint:
    """DeepSpeed's own checkpoint files as one entry of our checkpoint (``NativeCheckpoint``).

    ``launcher.checkpoint`` calls ``save_native``/``load_native`` on every rank with the
    ``deepspeed/`` folder of the step directory, so the files share its atomic publish and
    pruning (this engine always has a process group, even for one rank). They hold the
    model, the fp32 master partitions and each rank's optimizer state, so a resume needs
    the same world size and ZeRO stage; ``layout.json`` records both and a mismatch is a
    CheckpointError before DeepSpeed reads anything.
    """

    TAG = "state"

    def __init__(self, ds_engine: Any, stage: int) -> None:
        self.ds, self.stage = ds_engine, stage

    def _layout(self) -> dict[str, Any]:
        return {"zero_stage": self.stage, "world_size": dist.get_world_size(),
                "bf16": bool(self.ds.bfloat16_enabled())}

    def save_native(self, path: Path) -> None:
        self.ds.save_checkpoint(str(path), tag=self.TAG, save_latest=False)
        if dist.get_rank() == 0:
            (path / "layout.json").write_text(json.dumps(self._layout()) + "\n")

    def load_native(self, path: Path) -> None:
        try:
            saved = json.loads((path / "layout.json").read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path.parent} has no readable DeepSpeed "
                                  f"layout.json ({e}); it was not written by this engine") from e
        if saved != self._layout():
            raise CheckpointError(
                f"checkpoint {path.parent} was written by DeepSpeed with {saved}, this run is "
                f"{self._layout()}: DeepSpeed's per-rank files resume only on the same world "
                "size, ZeRO stage and dtype. Relaunch with those, or set checkpoint.resume=never")
        loaded, _ = self.ds.load_checkpoint(str(path), tag=self.TAG, load_optimizer_states=True,
                                            load_lr_scheduler_states=False)
        if loaded is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint under {path}")


# --------------------------------------------------------------------- helpers


def _or_config_error(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except PartitionLayoutError as e:
        raise ConfigError(f"parallel.engine=deepspeed: {e}") from e


def _quiet_deepspeed(device: torch.device) -> None:
    """Warnings only from DeepSpeed's logger (our trainer prints progress), and on CPU skip
    the shared-memory all-reduce kernel: only DeepSpeed's inference all-reduce uses it, and
    building it costs a C++ compile (about a minute on two cores) on every fresh machine."""
    import deepspeed.ops
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    if device.type == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 empties partitioned parameters
