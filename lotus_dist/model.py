"""LLaMA decoder for pre-training, with HF-compatible module names.

The architecture is Hugging Face's ``LlamaForCausalLM`` (RMSNorm, rotary embeddings in the
``rotate_half`` convention, SwiGLU MLP, no biases, untied output head), and the module names
match it, so ``hf_export`` is a rename and a reader can compare against HF line by line.

Construction is always on the meta device, followed by ``to_empty()`` and ``init_weights()``:

    model = build_model_on_meta(cfg)           # no memory, no RNG
    ...apply parallelism (fully_shard per block, then the root)...
    model.to_empty(device=device)              # allocate (local shards under FSDP)
    model.init_weights(seed)                   # fill every tensor deterministically

``build_model`` does the three steps for a single process. ``init_weights`` draws each tensor
in full from its own generator seeded by (seed, tensor name) and keeps this rank's shard, so
the weights do not depend on the world size, the sharding, or the global RNG.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from lotus_dist.precision import upcast

INIT_STD = 0.02
"""Std of the normal init of every linear and embedding weight (HF ``initializer_range``)."""

# Path segments that wrappers insert into parameter names (torch.compile, activation
# checkpointing, FSDP1); dropping them gives the names of a bare ``Llama``.
_WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})


@dataclass
class LlamaConfig:
    """Shape of a LLaMA model. Field names are ours; ``hf_export`` maps them to HF's."""

    dim: int
    """Hidden size (HF ``hidden_size``)."""
    n_layers: int
    """Number of transformer blocks (HF ``num_hidden_layers``)."""
    n_heads: int
    """Attention heads; keys and values have as many (no grouped-query attention)."""
    intermediate_size: int
    """Width of the SwiGLU MLP."""
    vocab_size: int = 32000
    """Vocabulary size; 32000 is the LLaMA / T5 tokenizer size GaLore trains with."""
    max_seq_len: int = 1024
    """Longest sequence the rotary tables cover (HF ``max_position_embeddings``)."""
    norm_eps: float = 1e-6
    """Epsilon inside RMSNorm's square root (HF ``rms_norm_eps``)."""
    rope_theta: float = 10000.0
    """Base wavelength of the rotary embedding."""

    def __post_init__(self) -> None:
        if self.dim % self.n_heads != 0:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def num_params(self) -> int:
        """Parameter count, from the shapes alone (works for sizes never materialised)."""
        attn = 4 * self.dim * self.dim
        mlp = 3 * self.dim * self.intermediate_size
        norms = 2 * self.dim
        embed_and_head = 2 * self.vocab_size * self.dim
        return embed_and_head + self.n_layers * (attn + mlp + norms) + self.dim


MODEL_SIZES: dict[str, LlamaConfig] = {
    # "tiny" is the CPU default; with a small tokenizer it has a couple of million parameters.
    "tiny": LlamaConfig(dim=128, n_layers=4, n_heads=4, intermediate_size=352),
    # The rest are GaLore's LLaMA configs (configs/llama_*.json in jiaweizzhao/GaLore).
    "20m": LlamaConfig(dim=256, n_layers=4, n_heads=4, intermediate_size=688),
    "35m": LlamaConfig(dim=384, n_layers=6, n_heads=8, intermediate_size=1024),
    "60m": LlamaConfig(dim=512, n_layers=8, n_heads=8, intermediate_size=1376),
    "130m": LlamaConfig(dim=768, n_layers=12, n_heads=12, intermediate_size=2048),
    "350m": LlamaConfig(dim=1024, n_layers=24, n_heads=16, intermediate_size=2736),
    "1b": LlamaConfig(dim=2048, n_layers=24, n_heads=32, intermediate_size=5461),
    "3b": LlamaConfig(dim=2560, n_layers=32, n_heads=32, intermediate_size=6848),
    "7b": LlamaConfig(dim=4096, n_layers=32, n_heads=32, intermediate_size=11008),
}


def canonical_name(name: str) -> str:
    """The name a parameter has in a bare ``Llama``, whatever wrappers surround it.

    Init seeds and HF keys are derived from this, so compiling the model, wrapping blocks for
    activation checkpointing or in DDP (leading ``module.``) changes neither.
    """
    parts = [p for p in name.split(".") if p not in _WRAPPER_SEGMENTS]
    if parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the scale, as HF does."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: Tensor) -> Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.eps)


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm that saves its input and 1/rms (T x 1), not its output: the backward
    recomputes the normalised x. The linears after a norm save their input only when they
    need it (RSO's save x P instead, ``lotus_dist.rso``), so the norm must not keep it.
    Same values as autograd through ``weight * (x * rsqrt(mean(x^2) + eps))``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        x32 = upcast(x)  # fp32 under bf16, fp64 in an fp64 model
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, rstd, weight)
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, rstd, weight = ctx.saved_tensors
        x32 = upcast(x)
        normed = (x32 * rstd).to(x.dtype)
        dweight = None
        if ctx.needs_input_grad[1]:
            dweight = (dy * normed).reshape(-1, normed.shape[-1]).sum(0).to(weight.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            dn = (dy * weight).to(x32.dtype)  # through normed.to(x.dtype)
            # d(x rstd) = dn rstd - x rstd^3 mean(dn x)
            dx = (dn * rstd - x32 * rstd.pow(3) * (dn * x32).mean(-1, keepdim=True)).to(x.dtype)
        return dx, dweight, None


def rope_tables(
    head_dim: int, max_seq_len: int, theta: float, device: torch.device
) -> tuple[Tensor, Tensor]:
    """cos and sin, each [max_seq_len, head_dim], in HF's layout (frequencies repeated twice).

    ``rotate_half`` pairs channel i with channel i + head_dim/2, so both halves carry the
    same frequency; that is why HF checkpoints need no q/k permutation to load these weights.
    """
    channels = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)
    inv_freq = 1.0 / (theta ** (channels / head_dim))
    positions = torch.arange(max_seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, H, T, head_dim] by the position angles; cos/sin are [T, head_dim].

    The rotation runs in the tables' precision (fp32, fp64 in an fp64 model) and the
    result is cast back to x's dtype once: in bf16, tables and products would each round
    to 3 digits, on every position's angle."""
    dtype = torch.promote_types(x.dtype, cos.dtype)
    x_up = x.to(dtype)
    return (x_up * cos + rotate_half(x_up) * sin).to(x.dtype)


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary positions."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.o_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        batch, seq_len, dim = x.shape
        shape = (batch, seq_len, self.n_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq_len, dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm transformer block; FSDP shards each one as a unit."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """LLaMA causal language model: tokens [B, T] -> fp32 logits [B, T, vocab].

    Construct on the meta device (see ``build_model_on_meta``); the constructor leaves every
    tensor uninitialised and ``init_weights`` fills them.
    """

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # Derived from the config, so kept out of checkpoints; filled by init_weights.
        rope_shape = (cfg.max_seq_len, cfg.head_dim)
        self.register_buffer("rope_cos", torch.empty(rope_shape), persistent=False)
        self.register_buffer("rope_sin", torch.empty(rope_shape), persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        seq_len, max_seq_len = tokens.shape[1], self.cfg.max_seq_len
        if seq_len > max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds max_seq_len {max_seq_len}")
        h = self.embed_tokens(tokens)
        # at least fp32, even where the module itself was cast to bf16 (DeepSpeed's bf16)
        cos, sin = upcast(self.rope_cos[:seq_len]), upcast(self.rope_sin[:seq_len])
        for layer in self.layers:
            h = layer(h, cos, sin)
        return upcast(self.lm_head(self.norm(h)))

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Fill every parameter and buffer: N(0, 0.02) for linear/embedding, ones for norms.

        Each weight is drawn in full on the CPU from a generator seeded by (seed, canonical
        name), then this rank copies its shard to its device. The values depend only on the
        seed, never on the device (CUDA's ``randn`` depends on the GPU model's SM count, so
        replicas on mixed GPUs would start apart), the world size, the global RNG or the
        other tensors (adding a layer leaves the rest unchanged).
        """
        if self.rope_cos.device.type == "meta":
            raise RuntimeError("init_weights needs allocated tensors: call model.to_empty() first")
        for name, module in self.named_modules():
            init_module_weights(module, name, seed)
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Fill the rotary tables, which the config determines and checkpoints leave out:
        all a model whose weights are then loaded (export, eval) needs besides ``to_empty``."""
        cfg = self.cfg
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token, for MFU: 6N + 12 * n_layers * dim * seq_len.

        6N counts forward and backward matmuls of every weight but the input embedding (a
        lookup, not a matmul); the second term is attention scores and values (PaLM, app. B).
        """
        cfg = self.cfg
        matmul_params = cfg.num_params - cfg.vocab_size * cfg.dim
        return 6 * matmul_params + 12 * cfg.n_layers * cfg.dim * seq_len


@torch.no_grad()
def init_module_weights(module: nn.Module, name: str, seed: int = 0) -> None:
    """Fill ``module``'s own weight as ``Llama.init_weights`` does (``name`` is the module's
    name in the model); other modules have none to fill. One module at a time, for engines
    that materialise one module's parameters at a time (DeepSpeed ZeRO-3)."""
    if isinstance(module, RMSNorm):
        _copy_full_(module.weight, _empty_full(module.weight).fill_(1.0))
    elif isinstance(module, (nn.Linear, nn.Embedding)):
        full = _empty_full(module.weight)
        weight_seed = _tensor_seed(seed, f"{canonical_name(name)}.weight")
        generator = torch.Generator().manual_seed(weight_seed)
        _copy_full_(module.weight, full.normal_(0.0, INIT_STD, generator=generator))


def _tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed mixing all bits of (seed, name) into the low 32.

    The CPU generator keeps only the low 32 bits of its seed, so they must carry everything;
    sha256 rather than hash() because str hashing is salted per process.
    """
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _empty_full(param: Tensor) -> Tensor:
    """An fp32 CPU tensor of param's full (unsharded) shape, to draw or fill it in.

    Drawing in fp32 whatever the parameter dtype keeps bf16 and fp32 models' values alike.
    """
    return torch.empty(param.shape, dtype=torch.float32)


def _copy_full_(param: Tensor, full: Tensor) -> None:
    """Copy a full-size tensor into param, which under FSDP is a DTensor holding one shard.

    Every rank built the same ``full``, so each keeps its piece without communication
    (``src_data_rank=None``).
    """
    if isinstance(param, DTensor):
        local = param.to_local()
        full = distribute_tensor(full.to(local.device), param.device_mesh, param.placements,
                                 src_data_rank=None)
    param.copy_(full)


def build_model_on_meta(cfg: LlamaConfig) -> Llama:
    """An unallocated model, for callers that shard before materialising (FSDP).

    Next: apply parallelism, ``model.to_empty(device=...)``, then ``model.init_weights(seed)``.
    """
    with torch.device("meta"):
        return Llama(cfg)


def build_model(cfg: LlamaConfig, device: torch.device | str = "cpu", seed: int = 0,
                dtype: torch.dtype = torch.float32) -> Llama:
    """A ready-to-train model on one device: meta construction, to_empty, init_weights.
    Weights are drawn in fp32 whatever ``dtype``, so an fp64 model starts from the
    fp32 model's values."""
    model = build_model_on_meta(cfg).to(dtype)
    model.to_empty(device=device)
    model.init_weights(seed)
    return model
