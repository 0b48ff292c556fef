"""Block scores of each selector: what ``select_blocks`` ranks the key blocks by.

- ``"adaspa"``: the exact block mass (from the fused or the LSE-cached search).
- ``"pooled"``: softmax of mean-pooled ``q . k`` per block, re-estimated at every search step
  (the SpargeAttn / XAttention / VSA family).
- ``"window"``: a static 3D local window: key blocks ranked by the distance of their centre to the
  query block's centre in the video's token grid ``(frames, height, width)`` (Sliding-Tile /
  Radial style); 1D distance along the sequence when ``video_grid`` is not given.

All three share the schedule, the budget and the kernels, so only the choice of blocks differs.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .config import SELECTORS
from .selection import BlockLayout

__all__ = ["SELECTORS", "selector_scores", "pooled_mass", "window_scores", "block_recall"]


def selector_scores(selector: str, mass: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                    scale: float, layout: BlockLayout,
                    video_grid: Optional[Tuple[int, int, int]]) -> torch.Tensor:
    """``[B, H, nb, nb]`` scores (higher = keep first) for ``selector``."""
    if selector == "adaspa":
        return mass
    if selector == "pooled":
        return pooled_mass(q, k, scale, layout)
    if selector == "window":
        return window_scores(layout, video_grid, mass.device).expand_as(mass)
    raise ValueError(f"unknown selector {selector!r}; valid: {SELECTORS}")


def _block_means(x: torch.Tensor, layout: BlockLayout, valid: torch.Tensor) -> torch.Tensor:
    B, H, L, D = x.shape
    nb, bs = layout.num_blocks, layout.block_size
    pad = nb * bs - L
    xs = torch.nn.functional.pad(x.float(), (0, 0, 0, pad)).view(B, H, nb, bs, D)
    w = torch.nn.functional.pad(valid.float(), (0, pad)).view(valid.shape[0], 1, nb, bs, 1)
    return (xs * w).sum(3) / w.sum(3).clamp(min=1)


def pooled_mass(q: torch.Tensor, k: torch.Tensor, scale: float,
                layout: BlockLayout) -> torch.Tensor:
    """Estimated block mass: ``softmax_j(scale * mean(q_i) . mean(k_j))`` over valid key blocks."""
    B, L = q.shape[0], q.shape[2]
    all_tokens = torch.ones(1, L, dtype=torch.bool, device=q.device)
    key_valid = all_tokens if layout.key_valid is None else layout.key_valid
    qm = _block_means(q, layout, all_tokens)
    km = _block_means(k, layout, key_valid)
    scores = torch.matmul(qm, km.transpose(-1, -2)) * scale
    valid_blocks = layout.valid_key_blocks(B, q.device)[:, None, None, :]
    return torch.softmax(scores.masked_fill(~valid_blocks, float("-inf")), dim=-1).nan_to_num(0.0)


def window_scores(layout: BlockLayout, video_grid: Optional[Tuple[int, int, int]],
                  device: torch.device) -> torch.Tensor:
    """``[nb, nb]``: minus the distance between block centres in the video token grid."""
    bs, L = layout.block_size, layout.seq_len
    starts = torch.arange(layout.num_blocks, device=device) * bs
    centres = (starts + (torch.clamp(starts + bs, max=L) - 1)).double() / 2
    text = layout.text_span
    if text is not None and text[0] == 0:
        centres = centres - text[1]  # video positions count from the end of a leading text
    if video_grid is None:
        coords = centres[:, None]
    else:
        _, height, width = video_grid
        t = torch.div(centres, height * width, rounding_mode="floor")
        rest = centres - t * height * width
        h = torch.div(rest, width, rounding_mode="floor")
        coords = torch.stack([t, h, rest - h * width], dim=-1)
    return -torch.cdist(coords, coords).float()


def block_recall(dense_mask: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Share of the exact attention mass that a bool block mask keeps, per (batch, head)."""
    total = mass.sum(dim=(-2, -1))
    kept = (mass * dense_mask).sum(dim=(-2, -1))
    return torch.where(total > 0, kept / total.clamp(min=1e-30), torch.ones_like(total))
