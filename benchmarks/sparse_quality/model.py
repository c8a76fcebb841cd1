"""A small byte-level causal LM for measuring sparse decode attention against dense attention.

Decoder-only: RoPE, grouped-query attention, RMSNorm, SwiGLU. Two ways to run it:

- :meth:`ByteLM.forward` -- the whole sequence at once (training, dense prefill), SDPA causal attention;
  with ``return_kv=True`` it also returns every layer's rotated keys and values for a KV cache.
- :meth:`ByteLM.decode` -- one token per sequence; every layer hands its query and its new key and
  value to a caller-supplied ``attend(layer, q, k, v)``, which owns the KV cache and the attention.
  That is where the evaluation puts the paged cache and the sparse attention.

Weights are saved as safetensors (bf16) with the config in the file's metadata.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LMConfig:
    vocab: int = 256  # bytes
    dim: int = 384
    layers: int = 6
    q_heads: int = 6
    kv_heads: int = 2
    head_dim: int = 64
    hidden: int = 768  # SwiGLU inner width
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.q_heads % self.kv_heads:
            raise ValueError(f"q_heads ({self.q_heads}) must be a multiple of kv_heads ({self.kv_heads})")


def rope_tables(positions: torch.Tensor, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[..., head_dim // 2]`` (float32) for integer ``positions``."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.float()[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., head_dim]`` (rotate-half layout); cos/sin broadcast against ``x[..., :head_dim // 2]``."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.wq = nn.Linear(cfg.dim, cfg.q_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.q_heads * cfg.head_dim, cfg.dim, bias=False)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """``x [..., dim]`` -> rotated q ``[..., q_heads, D]``, rotated k and v ``[..., kv_heads, D]``."""
        c = self.cfg
        q = self.wq(x).unflatten(-1, (c.q_heads, c.head_dim))
        k = self.wk(x).unflatten(-1, (c.kv_heads, c.head_dim))
        v = self.wv(x).unflatten(-1, (c.kv_heads, c.head_dim))
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class MLP(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.dim, cfg.hidden, bias=False)
        self.up = nn.Linear(cfg.dim, cfg.hidden, bias=False)
        self.down = nn.Linear(cfg.hidden, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)


class ByteLM(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)

    def init_weights(self, generator: torch.Generator) -> None:
        """Normal(0, 0.02) weights, output projections scaled by ``1 / sqrt(2 * layers)``, unit norms."""
        out_std = 0.02 / math.sqrt(2 * self.cfg.layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            else:
                std = out_std if name.endswith(("wo.weight", "down.weight")) else 0.02
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=generator) * std)

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.cfg.head_dim)

    def forward(self, tokens: torch.Tensor, return_kv: bool = False):
        """Logits ``[B, T, vocab]`` for ``tokens [B, T]`` (positions 0..T-1); with ``return_kv`` also
        a list per layer of rotated keys and values ``[B, kv_heads, T, D]``."""
        c = self.cfg
        batch, length = tokens.shape
        cos, sin = rope_tables(torch.arange(length, device=tokens.device), c.head_dim, c.rope_base)
        group = c.q_heads // c.kv_heads
        x = self.embed(tokens)
        kv = []
        for block in self.blocks:
            q, k, v = block.attn.qkv(block.attn_norm(x), cos, sin)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
            if return_kv:
                kv.append((k, v))
            k_rep = k.repeat_interleave(group, dim=1) if group > 1 else k
            v_rep = v.repeat_interleave(group, dim=1) if group > 1 else v
            o = F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=True, scale=self.scale)
            x = x + block.attn.wo(o.transpose(1, 2).reshape(batch, length, c.q_heads * c.head_dim))
            x = x + block.mlp(block.mlp_norm(x))
        logits = self.head(self.norm(x))
        return (logits, kv) if return_kv else logits

    def decode(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        attend: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """One decode step: ``tokens [B]`` at ``positions [B]`` -> logits ``[B, vocab]``.

        ``attend(layer, q [B, q_heads, D], k [B, kv_heads, D], v [B, kv_heads, D])`` stores the new
        key and value and returns the attention output ``[B, q_heads, D]``."""
        c = self.cfg
        cos, sin = rope_tables(positions, c.head_dim, c.rope_base)
        x = self.embed(tokens)
        for layer, block in enumerate(self.blocks):
            q, k, v = block.attn.qkv(block.attn_norm(x), cos, sin)
            o = attend(layer, q, k, v)
            x = x + block.attn.wo(o.reshape(x.shape[0], c.q_heads * c.head_dim).to(x.dtype))
            x = x + block.mlp(block.mlp_norm(x))
        return self.head(self.norm(x))


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_model(model: ByteLM, path: str, meta: dict | None = None) -> None:
    """bf16 safetensors with ``config`` (and ``meta``) as JSON in the metadata."""
    from safetensors.torch import save_file

    tensors = {name: t.detach().to(torch.bfloat16).cpu().contiguous() for name, t in model.state_dict().items()}
    metadata = {"config": json.dumps(asdict(model.cfg), sort_keys=True)}
    if meta:
        metadata["meta"] = json.dumps(meta, sort_keys=True)
    save_file(tensors, path, metadata=metadata)


def load_model(path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16) -> ByteLM:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        cfg = LMConfig(**json.loads(f.metadata()["config"]))
        state = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    model = ByteLM(cfg)
    model.load_state_dict(state)
    return model.to(device=device, dtype=dtype).eval()


def file_meta(path: str) -> dict:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return json.loads(f.metadata().get("meta", "{}"))
