"""MFU and throughput per device: the FLOP formula, the peak table, metrics rows, summary."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from small_runs import small_run
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from launcher import trainer
from launcher.config import load_config
from launcher.flops import cuda_memory_bytes, device_peak_flops, peak_bf16_flops, throughput
from launcher.train import run
from lotus_dist.model import MODEL_SIZES, build_model

TINY = dataclasses.replace(MODEL_SIZES["tiny"], vocab_size=512, max_seq_len=32)


def test_flops_per_token_matches_a_hand_count_of_the_tiny_model():
    d, layers, width, vocab, seq = TINY.dim, TINY.n_layers, TINY.intermediate_size, 512, 32
    # Multiply-adds per token in forward: q, k, v, o; gate, up, down; the head; then
    # scores (q . k over seq positions) and values (weights x v) per layer. Backward costs
    # twice forward, and a multiply-add is 2 FLOPs: x 6.
    matmuls = layers * (4 * d * d + 3 * d * width) + d * vocab
    attention = layers * 2 * seq * d
    norms = layers * 2 * d + d  # RMSNorm weights: in N (6N's convention), not matmuls
    expected = 6 * (matmuls + norms) + 6 * attention
    assert build_model(TINY).flops_per_token(seq) == expected == 5_413_632


def test_flops_per_token_matches_what_torch_counts_in_forward_and_backward():
    model, seq = build_model(TINY), 32
    tokens = torch.randint(0, TINY.vocab_size, (2, seq))
    # The math backend runs attention as bmm's, which FlopCounterMode counts (causal
    # masking does not halve them, as the formula's 12 L d T assumes).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(tokens).logsumexp(-1).mean().backward()
    norms = TINY.n_layers * 2 * TINY.dim + TINY.dim
    assert counter.get_total_flops() / tokens.numel() == model.flops_per_token(seq) - 6 * norms


def test_peak_table_tells_the_variants_apart_and_knows_no_cpu():
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12  # SXM
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA H100 NVL") == 835e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16_flops("NVIDIA L40S") == 362e12
    assert peak_bf16_flops("NVIDIA L40") == 181e12
    assert peak_bf16_flops("NVIDIA L4") == 121e12
    assert peak_bf16_flops("NVIDIA GeForce RTX 4090") == 165e12
    assert peak_bf16_flops("Tesla T4") is None  # unlisted: no MFU rather than a guess
    assert device_peak_flops(torch.device("cpu")) is None
    assert cuda_memory_bytes(torch.device("cpu")) == {}


def test_mfu_is_achieved_flops_per_device_over_the_peak():
    got = throughput(tokens_per_s=8000.0, world_size=4, flops_per_token=6e9, peak_flops=1e14)
    assert got["tokens_per_s_per_device"] == 2000.0
    assert got["tflops_per_device"] == pytest.approx(12.0)  # 2000 x 6e9 / 1e12
    assert got["mfu"] == pytest.approx(0.12)
    assert "mfu" not in throughput(8000.0, 4, 6e9, peak_flops=None)


def test_rows_and_summary_carry_throughput_per_device_and_mfu(small_corpus, tmp_path,
                                                              monkeypatch):
    peak = 1e11  # a fake device, so that the CPU run reports an MFU
    monkeypatch.setattr(trainer, "device_peak_flops", lambda device: peak)
    summary = run(load_config("configs/tiny.yaml", small_run(
        *small_corpus, tmp_path, "training.steps=4", "training.warmup_steps=1",
        "training.log_interval=2", "eval.interval=0", "eval.batches=1",
        "checkpoint.interval=0")))
    per_token = build_model(TINY).flops_per_token(32)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if "loss" in row]
    assert [row["step"] for row in train] == [2, 4]
    for row in train:
        assert row["tokens_per_s_per_device"] == row["tokens_per_s"]  # one process
        assert row["tflops_per_device"] == pytest.approx(
            per_token * row["tokens_per_s"] / 1e12)
        assert row["mfu"] == pytest.approx(row["tflops_per_device"] * 1e12 / peak)
        assert "cuda_max_reserved_bytes" not in row  # CPU
    assert summary["tokens_per_s_per_device"] == summary["tokens_per_s"]
    assert summary["mfu"] == pytest.approx(per_token * summary["tokens_per_s"] / peak)
    assert json.loads((tmp_path / "summary.json").read_text())["mfu"] == summary["mfu"]
