"""`lotus-train bench activations`: what one transformer block saves for backward, and
the optimizer state, for RSO against the methods that keep ordinary linears.

AdamW, GaLore and Lotus (and GrassWalk/GrassJump) run ordinary linears, which save each
input x (s x in) for the weight gradient; they differ in optimizer state only. RSO's
linears save x P (s x r) instead, and the linears that read one tensor share it
(``lotus_dist.rso``). Per config size and sequence length one real block (random
weights, CPU, fp32, one sequence) runs its forward under saved-tensor hooks; each
storage autograd keeps is counted once, the block's parameters and buffers and the
rotary tables left out. Rows with ``--checkpointing`` recompute the block in backward
(``parallel.activation_checkpointing``, the 3b/7b configs): the block then keeps only
its input, for every method.

The expected RSO saving per block is s (2n + I) - 4 s r elements: the inputs of q/k/v,
gate/up and down are replaced by four x P (q/k/v, o, gate/up, down); the attention output
that o_proj reads is kept by scaled_dot_product_attention's own backward whatever the
method (the paper's 7bsn - 4bsr counts it too, with I = 4n). Each row checks the
measurement against that formula.

Optimizer state per size (whole model, one rank, fp32): AdamW's two moments; GaLore and
Lotus from ``bench memory``'s layout (moments in R's shape, the basis, Lotus's R_0); RSO's
two moments of every B and of the untargeted parameters, plus the P's (in x r, one per
shared input), plus B itself (a parameter that AdamW does not have).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace

import torch
from torch import nn

from launcher.config import load_config
from lotus_dist.model import MODEL_SIZES, Block, LlamaConfig, build_model_on_meta, rope_tables
from lotus_dist.rso import install_rso, projections, rso_layers

FP32 = 4


def saved_bytes(block: nn.Module, cfg: LlamaConfig, x: torch.Tensor) -> int:
    """Bytes of the distinct storages one block's forward on ``x`` saves for backward,
    the block's parameters and buffers and the rotary tables left out."""
    cos, sin = rope_tables(cfg.head_dim, x.shape[1], cfg.rope_theta, x.device)
    own = {t.untyped_storage().data_ptr()
           for t in [*block.parameters(), *block.buffers(), cos, sin]}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, cos, sin)
    return sum(seen.values())


def blocks(cfg: LlamaConfig, rank: int, checkpointing: bool) -> tuple[nn.Module, nn.Module]:
    """(ordinary block, RSO block) with the same random weights."""
    torch.manual_seed(0)
    plain = Block(cfg)
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0, 0.02)
    rso = copy.deepcopy(plain)
    install_rso(rso, rank, ["self_attn", "mlp"])  # period 0: P drawn, B zero
    if checkpointing:
        from torch.distributed._composable import checkpoint

        checkpoint(plain)
        checkpoint(rso)
    return plain, rso


def state_bytes(size: str) -> dict[str, int]:
    """Whole-model optimizer state per method for ``configs/<size>.yaml`` (its ranks)."""
    from launcher.bench.memory import Method, derived_layout, method_config, per_rank_usage

    out = {}
    for name in ("adamw", "galore", "lotus"):
        layouts = derived_layout(method_config(size, Method(name, name))).values()
        out[name] = per_rank_usage(layouts, False, "ddp", 1).state
    cfg = load_config(f"configs/{size}.yaml", ["optim.name=rso"])
    model = build_model_on_meta(replace(MODEL_SIZES[size], vocab_size=cfg.model.vocab_size
                                        or cfg.data.tokenizer_vocab_size))
    install_rso(model, cfg.optim.rank, cfg.optim.target_modules)
    moments = 2 * sum(p.numel() for p in model.parameters() if p.requires_grad) * FP32
    ps = sum(proj.p.numel() for _, proj in projections(model)) * FP32
    bs = sum(linear.rso_b.numel() for _, linear, _ in rso_layers(model)) * FP32
    out["rso"] = moments + ps + bs
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lotus-train bench activations", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="60m,130m,350m,1b",
                        help="config sizes (their optim.rank is RSO's r)")
    parser.add_argument("--seq-lens", default="256,1024", help="tokens per sequence")
    parser.add_argument("--checkpointing", default="off,on",
                        help="off, on or both: activation checkpointing of the block")
    args = parser.parse_args(argv)
    sizes = [s for s in args.sizes.split(",") if s]
    seq_lens = [int(s) for s in args.seq_lens.split(",") if s]
    modes = [m == "on" for m in args.checkpointing.split(",") if m]
    unknown = [s for s in sizes if s not in MODEL_SIZES]
    if unknown:
        parser.error(f"unknown size(s) {unknown}; known: {', '.join(MODEL_SIZES)}")

    rows, states = [], {}
    start = time.perf_counter()
    for size in sizes:
        rank = load_config(f"configs/{size}.yaml", ["optim.name=rso"]).optim.rank
        cfg = MODEL_SIZES[size]
        states[size] = state_bytes(size)
        for ckpt in modes:
            plain, rso = blocks(cfg, rank, ckpt)
            for s in seq_lens:
                x = torch.randn(1, s, cfg.dim, requires_grad=True)
                before, after = saved_bytes(plain, cfg, x), saved_bytes(rso, cfg, x)
                expected = None if ckpt else (s * (2 * cfg.dim + cfg.intermediate_size)
                                              - 4 * s * rank) * FP32
                rows.append({"size": size, "rank": rank, "seq_len": s, "checkpointing": ckpt,
                             "adamw_galore_lotus_bytes": before, "rso_bytes": after,
                             "rso_over_adamw": after / before, "saving_bytes": before - after,
                             "formula_saving_bytes": expected,
                             "formula_holds": None if expected is None
                             else before - after == expected})
    print("saved activations per block and sequence (fp32, CPU; each storage once)")
    print(f"{'size':>5} {'r':>5} {'seq':>5} {'ckpt':>5} {'adamw/galore/lotus MB':>22} "
          f"{'rso MB':>8} {'rso/adamw':>10} {'formula':>8}")
    for r in rows:
        formula = "-" if r["formula_holds"] is None else ("holds" if r["formula_holds"]
                                                          else "FAILS")
        print(f"{r['size']:>5} {r['rank']:>5} {r['seq_len']:>5} "
              f"{'on' if r['checkpointing'] else 'off':>5} "
              f"{r['adamw_galore_lotus_bytes'] / 2**20:22.2f} {r['rso_bytes'] / 2**20:8.2f} "
              f"{r['rso_over_adamw']:10.3f} {formula:>8}")
    print("\noptimizer state, whole model on one rank (fp32; rso includes its P's and B's)")
    print(f"{'size':>5} " + " ".join(f"{m + ' GB':>10}" for m in ("adamw", "galore", "lotus",
                                                                    "rso"))
          + f" {'rso/adamw':>10} {'rso/galore':>11}")
    for size, st in states.items():
        print(f"{size:>5} " + " ".join(f"{st[m] / 1e9:10.3f}" for m in ("adamw", "galore",
                                                                       "lotus", "rso"))
              + f" {st['rso'] / st['adamw']:10.3f} {st['rso'] / st['galore']:11.3f}")
    print(f"({time.perf_counter() - start:.1f} s)")
    print(json.dumps({"bench": "activations", "unit": "bytes", "rows": rows,
                      "optimizer_state": states}))
