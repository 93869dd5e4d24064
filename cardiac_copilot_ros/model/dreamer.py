"""Cardiac Dreamer I: imagine the encoder feature of the plane reached by an action.

``f' = I(F, a, q)``: a small pre-norm transformer encoder over

* the trunk's spatial feature map ``F`` (B, C, h, w), average-pooled to a fixed ``grid x grid``
  and projected to ``dim``-d tokens with a learned position embedding,
* one action token (the normalised 6-d relative action through a linear layer),
* one plane token (a learned embedding per target plane),
* one output token (learned), whose final state, projected back to C, is added to the pooled
  feature ``mean(F)`` (a residual: an untrained Dreamer imagines "no change").

Attention is written out with plain tensor ops so the module scripts, exports and gives the
same numbers in TorchScript, torch.export and eager mode.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _Block(nn.Module):
    """Pre-norm transformer block: multi-head self-attention + MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} not divisible by heads {heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))
        att = F.softmax(att, dim=-1)
        y = torch.matmul(att, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(y)
        return x + self.mlp(self.norm2(x))


class CardiacDreamer(nn.Module):
    """I(F, a, q) -> imagined pooled feature f' (B, C)."""

    def __init__(self, feat_channels: int = 512, n_planes: int = 3, dim: int = 256, depth: int = 2,
                 heads: int = 4, grid: int = 4) -> None:
        super().__init__()
        self.grid = grid
        self.feat_in = nn.Linear(feat_channels, dim)
        self.pos = nn.Parameter(torch.zeros(1, grid * grid, dim))
        self.action_in = nn.Sequential(nn.Linear(6, dim), nn.GELU(), nn.Linear(dim, dim))
        self.plane_tok = nn.Embedding(n_planes, dim)
        self.out_tok = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList([_Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.feat_out = nn.Linear(dim, feat_channels)
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.out_tok, std=0.02)
        nn.init.normal_(self.feat_out.weight, std=1e-3)
        nn.init.zeros_(self.feat_out.bias)

    def forward(self, fmap: torch.Tensor, action_norm: torch.Tensor, plane: torch.Tensor) -> torch.Tensor:
        """fmap (B, C, h, w), normalised action (B, 6), plane (B,) int64 -> f' (B, C)."""
        b = fmap.shape[0]
        pooled = F.adaptive_avg_pool2d(fmap, (self.grid, self.grid))
        tokens = self.feat_in(pooled.flatten(2).transpose(1, 2)) + self.pos
        a_tok = self.action_in(action_norm).unsqueeze(1)
        q_tok = self.plane_tok(plane).unsqueeze(1)
        o_tok = self.out_tok.expand(b, -1, -1)
        x = torch.cat([o_tok, a_tok, q_tok, tokens], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return fmap.mean(dim=(2, 3)) + self.feat_out(self.norm(x[:, 0]))
