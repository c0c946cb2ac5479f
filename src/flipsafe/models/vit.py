"""A small pre-norm Vision Transformer written with plain modules."""

from __future__ import annotations

import torch
from torch import nn


def patch_size_for(image_size: int) -> int:
    """Patch side: about 8x8 patches (32 -> 4, 64 -> 8), never single pixels (8 -> 2).

    One-pixel tokens carry a single value each and left the model near chance on
    8x8 digits after several epochs; 2x2 patches learn several times faster.
    """
    return max(2, image_size // 8)


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v Linears so each can be hooked."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.softmax = nn.Softmax(dim=-1)
        self.proj = nn.Linear(dim, dim)

    def split(self, t):
        # (batch, tokens, dim) -> (batch, heads, tokens, head_dim)
        return t.reshape(t.shape[0], t.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x):
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        weights = self.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale)
        out = torch.matmul(weights, v).transpose(1, 2)
        return self.proj(out.reshape(x.shape[0], x.shape[1], self.heads * self.head_dim))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim)
        )

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Pre-norm ViT; pixels past the last whole patch are ignored (Conv2d stride = patch)."""

    def __init__(self, num_classes: int, in_channels: int, image_size: int,
                 dim: int = 128, depth: int = 4, heads: int = 4, mlp_ratio: int = 4):
        super().__init__()
        self.patch_size = patch_size_for(image_size)
        grid = image_size // self.patch_size
        self.patch_embed = nn.Conv2d(in_channels, dim, self.patch_size, self.patch_size)
        self.flatten = nn.Flatten(start_dim=2)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        tokens = self.flatten(self.patch_embed(x)).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed
        return self.fc(self.norm(self.blocks(tokens))[:, 0])


def vit_tiny(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return ViT(num_classes, in_channels, image_size)
