"""Engine construction defaults: DDP reduces into bucket views without broadcasting
buffers, and ``parallel.mixed_precision=auto`` is FSDP's bf16 on CUDA only, accepted
wherever it means nothing (other engines, fp64 runs)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from launcher.capabilities import check_supported
from launcher.config import ConfigError, load_config
from launcher.distributed import DistInfo
from launcher.engines.ddp import DDPEngine
from launcher.engines.fsdp import uses_bf16
from lotus_dist.model import MODEL_SIZES, build_model

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def config(*sets: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_config(None, list(sets))


def _loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def test_ddp_accumulates_into_bucket_views_like_plain_autograd():
    """Two micro-batches (the first under ``no_sync``) on a one-rank group give the
    gradients plain autograd gives; the gradients are DDP's bucket views, and the rotary
    buffers are not broadcast."""
    raw = build_model(MODEL_SIZES["tiny"], seed=0)
    plain = copy.deepcopy(raw)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        optimizer = torch.optim.SGD(raw.parameters(), lr=0.1)
        engine = DDPEngine(raw, optimizer, DistInfo(0, 1, 0, CPU))
        assert engine.model.gradient_as_bucket_view and not engine.model.forward_sync_buffers
        tokens = torch.randint(0, raw.cfg.vocab_size, (2, 2, 17),
                               generator=torch.Generator().manual_seed(0))
        for i, micro in enumerate(tokens):
            with engine.micro_batch(last=i == 1):
                engine.backward(_loss(engine.model, micro) / 2)
            _loss(plain, micro).div(2).backward()
        for (name, p), q in zip(raw.named_parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, msg=name)
        # bucket views: the gradients share a few flat buffers instead of one each
        storages = {p.grad.untyped_storage().data_ptr() for p in raw.parameters()}
        assert len(storages) < len(list(raw.parameters()))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("mixed_precision", "dtype", "device", "bf16"), [
    ("auto", "auto", CUDA, True),
    ("auto", "bf16", CUDA, True),
    ("auto", "fp32", CUDA, False),  # an explicit fp32 run stays fp32
    ("auto", "fp64", CUDA, False),
    ("auto", "auto", CPU, False),
    ("auto", "bf16", CPU, False),
    ("bf16", "auto", CPU, True),
    ("none", "auto", CUDA, False),
])
def test_fsdp_mixed_precision_auto_is_bf16_on_cuda_when_the_compute_is(mixed_precision, dtype,
                                                                       device, bf16):
    cfg = config("parallel.engine=fsdp", f"parallel.mixed_precision={mixed_precision}",
                 f"training.dtype={dtype}")
    assert uses_bf16(cfg, device) is bf16


def test_auto_is_the_default_and_fp64_accepts_it():
    cfg = config("parallel.engine=fsdp", "training.dtype=fp64")
    assert cfg.parallel.mixed_precision == "auto"
    with pytest.raises(ConfigError, match=r"parallel\.mixed_precision=auto or none"):
        config("parallel.engine=fsdp", "training.dtype=fp64", "parallel.mixed_precision=bf16")


@pytest.mark.parametrize("engine", ["single", "ddp", "ddp_lowrank", "deepspeed_zero1"])
def test_auto_runs_on_every_engine_and_bf16_only_on_fsdp(engine):
    check_supported(config("training.grad_clip=0"), engine)
    with pytest.raises(ConfigError, match=r"parallel\.mixed_precision=bf16"):
        check_supported(config("training.grad_clip=0", "parallel.mixed_precision=bf16"), engine)
    check_supported(config("training.grad_clip=0", "parallel.mixed_precision=bf16"), "fsdp")
