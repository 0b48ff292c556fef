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

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .config import AdaSpaConfig
from .selection import BlockLayout, Selection, select_blocks

__all__ = ["Scored", "Selector", "ExactMass", "PooledEstimate", "StaticWindow", "make_selector",
           "pooled_mass", "window_scores", "block_recall"]


@dataclass(frozen=True)
class Scored:
    """The exact block ``mass`` of one search and a selector's ``scores`` of the same blocks
    (the same tensor for :class:`ExactMass`). Adding two sums both: the block scores of two CFG
    branches for one shared mask (``cfg_mask="sum"``)."""

    mass: torch.Tensor
    scores: torch.Tensor

    def __add__(self, other: "Scored") -> "Scored":
        mass = self.mass + other.mass
        return Scored(mass, mass if self.scores is self.mass else self.scores + other.scores)

    def nbytes(self) -> int:
        extra = 0 if self.scores is self.mass else self.scores.nbytes
        return self.mass.nbytes + extra


class Selector:
    """Chooses a site's block mask at a search step from the exact block ``mass``.

    Subclasses say what the blocks are ranked by (:meth:`scores`); the budget, tiers and text
    sink are :func:`select_blocks`'s, so selectors differ only in which blocks they keep.
    """

    def __init__(self, cfg: AdaSpaConfig) -> None:
        self.cfg = cfg

    def scores(self, mass: torch.Tensor, q: torch.Tensor, k: torch.Tensor, scale: float,
               layout: BlockLayout) -> torch.Tensor:
        """``[B, H, nb, nb]`` scores: higher is kept first."""
        raise NotImplementedError

    def score(self, mass: torch.Tensor, q: torch.Tensor, k: torch.Tensor, scale: float,
              layout: BlockLayout) -> Scored:
        """The exact ``mass`` with this selector's scores."""
        return Scored(mass, self.scores(mass, q, k, scale, layout))

    def choose(self, scored: Scored, layout: BlockLayout,
               head_group: Optional[str] = None) -> Selection:
        """The mask of the best ``scored.scores``, its density, and the recall of the exact
        ``scored.mass`` that it keeps."""
        chosen = select_blocks(scored.scores, layout, self.cfg, head_group=head_group)
        recall = block_recall(chosen.mask.to_dense(), scored.mass)
        return dataclasses.replace(chosen, recall=recall)


class ExactMass(Selector):
    """AdaSpa: the exact block mass; the selection's own recall is already exact."""

    def scores(self, mass, q, k, scale, layout):
        return mass

    def choose(self, scored, layout, head_group=None):
        return select_blocks(scored.mass, layout, self.cfg, head_group=head_group)


class PooledEstimate(Selector):
    """Softmax of mean-pooled ``q . k`` per block, re-estimated at every search step."""

    def scores(self, mass, q, k, scale, layout):
        return pooled_mass(q, k, scale, layout)


class StaticWindow(Selector):
    """The nearest key blocks in the video grid, the same count in every head (a window has no
    recall to split a budget by)."""

    def __init__(self, cfg: AdaSpaConfig) -> None:
        super().__init__(cfg.replace(head_budget="uniform"))

    def scores(self, mass, q, k, scale, layout):
        return window_scores(layout, self.cfg.video_grid, mass.device).expand_as(mass)


SELECTOR_CLASSES = {"adaspa": ExactMass, "pooled": PooledEstimate, "window": StaticWindow}


def make_selector(cfg: AdaSpaConfig) -> Selector:
    """The selector ``cfg.selector`` names."""
    return SELECTOR_CLASSES[cfg.selector](cfg)


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
