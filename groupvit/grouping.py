"""GroupViT's grouping: AssignAttention (hard token-to-group assignment) and GroupingBlock (S tokens -> G segments).

The core of AssignAttention -- softmax over the *group* axis, straight-through one-hot, normalisation by the
per-group token count + eps -- runs through :func:`groupvit.ops.assign_attention`, i.e. the eager reference or the
fused Triton kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
from torch import Tensor

from groupvit import ops
from groupvit.layers import CrossAttnBlock, MixerMlp, Mlp
from kernels.reference import gumbel_like


@dataclass
class GroupingMaps:
    """Maps reported by one grouping block, each ``[B, G, N]``: ``soft`` = noise-free softmax over groups
    (used for segmentation), ``hard`` = the assignment before normalisation (one-hot when hard)."""

    soft: Tensor
    hard: Tensor


class AssignAttention(nn.Module):
    """Single-head assignment of N image tokens to G groups (bias on all projections, scale C^-1/2).

    Training: Gumbel noise on the logits; eval: plain argmax. Both use the hard straight-through one-hot.
    """

    def __init__(self, dim: int, hard: bool = True, tau: float = 1.0, eps: float = 1.0) -> None:
        super().__init__()
        self.hard, self.tau, self.eps = hard, tau, eps
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, query: Tensor, key: Tensor, *, return_maps: bool = False, noise: Tensor | None = None
    ) -> tuple[Tensor, GroupingMaps | None]:
        q = self.q_proj(query)  # [B, G, C]
        k = self.k_proj(key)  # [B, N, C]
        v = self.v_proj(key)  # [B, N, C]
        gumbel = self.training
        maps = None
        if return_maps:
            if gumbel and noise is None:  # one noise draw shared by the op and the reported map
                noise = gumbel_like(q.new_empty(q.shape[0], q.shape[1], k.shape[1]))
            soft, hard = ops.assignment_maps(q, k, tau=self.tau, hard=self.hard, gumbel=gumbel, noise=noise)
            maps = GroupingMaps(soft=soft, hard=hard)
        out = ops.assign_attention(
            q, k, v, tau=self.tau, hard=self.hard, gumbel=gumbel, noise=noise if gumbel else None, eps=self.eps
        )  # [B, G, C]
        return self.proj(out), maps


class GroupingBlock(nn.Module):
    """Merge image tokens ``x [B, N, C]`` into G segments, guided by group tokens ``t [B, G_in, C]``.

    Order: LN both; token-mix the group tokens G_in -> G; cross-attend them to the image tokens (unless
    ``pre_assign=False``); assign image tokens to the resulting G queries (AssignAttention); residual add; channel MLP.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        num_group_tokens: int,
        num_output_groups: int,
        mlp_ratio: tuple[float, float] = (0.5, 4.0),
        hard: bool = True,
        tau: float = 1.0,
        eps: float = 1.0,
        pre_assign: bool = True,
    ) -> None:
        super().__init__()
        tokens_hidden, channels_hidden = int(mlp_ratio[0] * dim), int(mlp_ratio[1] * dim)
        self.norm_tokens = nn.LayerNorm(dim)
        self.mlp_inter = MixerMlp(num_group_tokens, tokens_hidden, num_output_groups)
        self.norm_post_tokens = nn.LayerNorm(dim)
        self.norm_x = nn.LayerNorm(dim)
        self.pre_assign_attn = CrossAttnBlock(dim, heads, mlp_ratio=mlp_ratio[1]) if pre_assign else None
        self.assign = AssignAttention(dim, hard=hard, tau=tau, eps=eps)
        self.norm_new_x = nn.LayerNorm(dim)
        self.mlp_channels = Mlp(dim, channels_hidden)

    def forward(
        self, x: Tensor, group_tokens: Tensor, *, return_maps: bool = False, noise: Tensor | None = None
    ) -> tuple[Tensor, GroupingMaps | None]:
        t = self.norm_tokens(group_tokens)  # [B, G_in, C]
        x = self.norm_x(x)  # [B, N, C]
        p = self.norm_post_tokens(self.mlp_inter(t))  # [B, G, C]
        if self.pre_assign_attn is not None:
            p = self.pre_assign_attn(p, x)  # [B, G, C]
        o, maps = self.assign(p, x, return_maps=return_maps, noise=noise)  # [B, G, C]
        o = o + p
        o = o + self.mlp_channels(self.norm_new_x(o))
        return o, maps
