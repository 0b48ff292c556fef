"""A hand-written DiT for tests: plain nn.Module, F.scaled_dot_product_attention, joint text."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.cross_q = nn.Linear(dim, dim)
        self.cross_kv = nn.Linear(dim, 2 * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, text: torch.Tensor, temb: torch.Tensor,
                text_mask: torch.Tensor | None) -> torch.Tensor:
        h = self.norm(x) * (1 + temb[:, None])
        joint = torch.cat([h, text], dim=1)  # text last, as HunyuanVideo
        q, k, v = (self._split(t) for t in self.qkv(joint).chunk(3, dim=-1))
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=text_mask)
        attn = attn.transpose(1, 2).flatten(2)[:, : x.shape[1]]
        x = x + self.proj(attn)
        cq = self._split(self.cross_q(x))
        ck, cv = (self._split(t) for t in self.cross_kv(text).chunk(2, dim=-1))
        x = x + F.scaled_dot_product_attention(cq, ck, cv).transpose(1, 2).flatten(2)
        return x + self.mlp(x)


class TinyDiT(nn.Module):
    """Video tokens ``[B, N, C]`` plus text ``[B, T, C]``; self-attention is joint."""

    def __init__(self, dim: int = 32, heads: int = 4, depth: int = 2) -> None:
        super().__init__()
        self.time = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.out = nn.Linear(dim, dim)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        temb = self.time(timestep.to(self.out.weight.dtype).view(-1, 1) / 1000)
        mask = None
        if encoder_attention_mask is not None:
            video = torch.ones(hidden_states.shape[:2], dtype=torch.bool,
                               device=hidden_states.device)
            mask = torch.cat([video, encoder_attention_mask.bool()], dim=1)[:, None, None, :]
        x = hidden_states
        for block in self.blocks:
            x = block(x, encoder_hidden_states, temb, mask)
        return self.out(x)


def tiny_dit_inputs(batch: int = 1, tokens: int = 512, text: int = 40, dim: int = 32,
                    pad: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, text, dtype=torch.bool)
    if pad:
        mask[:, text - pad:] = False
    return dict(hidden_states=torch.randn(batch, tokens, dim, generator=g),
                timestep=torch.tensor([999.0] * batch),
                encoder_hidden_states=torch.randn(batch, text, dim, generator=g),
                encoder_attention_mask=mask)
