"""Generic transformer layers: MLPs, self/cross attention, pre-LN blocks, drop-path.

Module and parameter names follow the official GroupViT state-dict layout (``qkv``, ``proj``, ``fc1``, ...), so
official checkpoints load without renaming. All attention math goes through :func:`groupvit.ops.attention`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from groupvit import ops


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)`` (CLIP's text encoder activation)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class DropPath(nn.Module):
    """Stochastic depth per sample (identity at p = 0 or in eval)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device, dtype=x.dtype).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """Linear -> GELU -> Linear along the last axis."""

    def __init__(self, dim: int, hidden: int, out: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MixerMlp(Mlp):
    """MLP along the *token* axis: ``[B, T_in, C] -> [B, T_out, C]``."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


def _split_heads(x: Tensor, heads: int) -> Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)  # [B, H, N, Dh]


def _merge_heads(x: Tensor) -> Tensor:
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)  # [B, N, C]


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` projection (rows ordered q, k, v)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (_split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        return self.proj(_merge_heads(ops.attention(q, k, v)))


class CrossAttention(nn.Module):
    """Multi-head attention of queries ``q [B, Lq, C]`` over ``kv [B, Lk, C]`` with separate projections."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, q: Tensor, kv: Tensor) -> Tensor:
        h = self.heads
        out = ops.attention(
            _split_heads(self.q_proj(q), h), _split_heads(self.k_proj(kv), h), _split_heads(self.v_proj(kv), h)
        )
        return self.proj(_merge_heads(out))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + DropPath(MHA(LN x))``, then ``x + DropPath(MLP(LN x))``."""

    def __init__(
        self, dim: int, heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class CrossAttnBlock(nn.Module):
    """GroupViT's post-norm cross-attention block: ``y = q + MHA(q, kv)``; ``y + MLP(LN y)``; ``LN_post``.
    Queries and keys are not normalised on entry."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True) -> None:
        super().__init__()
        self.attn = CrossAttention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm_post = nn.LayerNorm(dim)

    def forward(self, q: Tensor, kv: Tensor) -> Tensor:
        y = q + self.attn(q, kv)
        y = y + self.mlp(self.norm2(y))
        return self.norm_post(y)


class TextAttention(nn.Module):
    """Causal multi-head self-attention with CLIP's packed ``in_proj_weight`` / ``out_proj`` layout."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = (_split_heads(t, self.heads) for t in qkv.chunk(3, dim=-1))
        return self.out_proj(_merge_heads(ops.attention(q, k, v, causal=True)))


class TextBlock(nn.Module):
    """Pre-LN causal block with QuickGELU MLP (names as CLIP: ln_1, attn, ln_2, mlp.c_fc, mlp.c_proj)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = TextAttention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(dim, hidden))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))
