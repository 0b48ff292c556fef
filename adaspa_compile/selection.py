"""Block selection from the block mass (ADASPA.md section 4).

Per (batch, head) and query-block row:
- text sink: every block whose query or key side touches a text token is kept, outside the budget;
- row-wise top-k: each row keeps the same number ``k_h`` of video key blocks, the diagonal first;
- head-adaptive tiers: heads ranked by recall get sparsity ``s + d``, ``s`` or ``s - d``;
- ``mode="recall"``: each head keeps the fewest blocks per row that reach the target recall;
- blocks made only of padded keys are dropped.

Every choice is read off one sort of each row, so the recall of any budget is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .blockmask import BlockMask
from .config import AdaSpaConfig

__all__ = ["BlockLayout", "Selection", "select_blocks", "tier_sparsities"]

# A head whose recall at the layer's sparsity exceeds this is "easy" (ADASPA.md section 4.3).
EASY_HEAD_RECALL = 0.8


@dataclass(frozen=True)
class BlockLayout:
    """Where text and padding sit in one attention call's sequence.

    ``text_span`` is the half-open token range ``(start, end)`` of the text, or ``None``.
    ``key_valid`` is bool ``[B, L]`` (True = real key) or ``None``.
    """

    seq_len: int
    block_size: int
    text_span: Optional[Tuple[int, int]] = None
    key_valid: Optional[torch.Tensor] = None

    @property
    def num_blocks(self) -> int:
        return -(-self.seq_len // self.block_size)

    def text_blocks(self, device: torch.device) -> torch.Tensor:
        """Bool ``[nb]``: the block holds at least one text token."""
        flags = torch.zeros(self.num_blocks, dtype=torch.bool, device=device)
        if self.text_span is not None:
            start, end = self.text_span
            if end > start:
                flags[start // self.block_size: (end - 1) // self.block_size + 1] = True
        return flags

    def valid_key_blocks(self, batch: int, device: torch.device) -> torch.Tensor:
        """Bool ``[B, nb]``: the key block holds at least one unpadded key."""
        if self.key_valid is None:
            return torch.ones(batch, self.num_blocks, dtype=torch.bool, device=device)
        pad = self.num_blocks * self.block_size - self.seq_len
        valid = torch.nn.functional.pad(self.key_valid, (0, pad))
        return valid.view(valid.shape[0], self.num_blocks, self.block_size).any(-1).expand(batch, -1)


@dataclass(frozen=True)
class Selection:
    """A chosen mask and what it achieves, per (batch, head): fp32 ``[B, H]`` tensors."""

    mask: BlockMask
    target_sparsity: torch.Tensor
    density: torch.Tensor
    recall: torch.Tensor


def tier_sparsities(recall_at_s: torch.Tensor, sparsity: float,
                    head_group: Optional[str] = None) -> torch.Tensor:
    """Head-adaptive sparsity per (batch, head) from each head's recall at ``sparsity``.

    With ``n`` heads above recall 0.8 (at most half the heads), the ``n`` best get ``s + d``, the
    ``n`` worst ``s - d``, the rest ``s``, where ``d = (1 - s) / 2`` as in the paper (0.9 / 0.8 /
    0.7 for ``s = 0.8``). ``d`` is capped at ``s`` so no head goes below 0 and the mean stays
    ``s``; at ``s = 0`` every head is dense.

    ``head_group`` (Ulysses context parallelism: this rank holds a slice of the layer's heads)
    names the process group to rank the heads across: the recalls of every rank are gathered in
    rank order, the tiers computed over all heads, and this rank's slice returned.
    """
    if head_group is not None:
        from .distributed import gather_heads

        full, start, stop = gather_heads(recall_at_s, head_group)
        return tier_sparsities(full, sparsity)[:, start:stop]
    B, H = recall_at_s.shape
    delta = min((1 - sparsity) / 2, sparsity)
    n = (recall_at_s > EASY_HEAD_RECALL).sum(-1).clamp(max=H // 2)
    rank = torch.argsort(torch.argsort(recall_at_s, dim=-1, descending=True), dim=-1)
    out = torch.full_like(recall_at_s, sparsity)
    out = torch.where(rank < n[:, None], torch.full_like(out, sparsity + delta), out)
    out = torch.where(rank >= H - n[:, None], torch.full_like(out, sparsity - delta), out)
    return out


def select_blocks(mass: torch.Tensor, layout: BlockLayout, cfg: AdaSpaConfig,
                  head_group: Optional[str] = None) -> Selection:
    """Choose the block mask of one attention call from its block mass ``[B, H, nb, nb]``.

    ``head_group``: see :func:`tier_sparsities` (the heads are a slice of the layer's).
    """
    B, H, nq, nk = mass.shape
    if nq != layout.num_blocks or nk != nq:
        raise ValueError(f"mass {tuple(mass.shape)} does not match {layout.num_blocks} blocks")
    mass = mass.float()
    candidate, forced = _candidates(layout, B, mass.device, cfg.text_sink)
    order = _row_order(mass, candidate)
    curve, total = _recall_curve(mass, candidate, forced, order)
    n_cand = candidate[:, 0].any(-2).sum(-1).clamp(min=1)  # [B]: candidate key blocks per row

    def budget(sparsity: torch.Tensor) -> torch.Tensor:
        return torch.round((1 - sparsity) * n_cand[:, None]).clamp(min=1).long()

    if cfg.mode == "recall":
        reached = curve >= cfg.recall * total[..., None]
        keep = (~reached).sum(-1) + 1
        keep = torch.minimum(keep, n_cand[:, None].expand(B, H))
        target = 1 - keep.float() / n_cand[:, None]
    else:
        target = torch.full((B, H), float(cfg.sparsity), device=mass.device)
        if cfg.head_adaptive and (H > 1 or head_group is not None):
            recall_at_s = _recall_at(curve, total, budget(target))
            target = tier_sparsities(recall_at_s, cfg.sparsity, head_group)
        keep = budget(target)
    dense = _mask_from_order(order, keep, candidate, forced)
    recall = _recall_at(curve, total, keep)
    block_mask = BlockMask.from_dense(dense, block_size=layout.block_size, seq_len=layout.seq_len)
    return Selection(mask=block_mask, target_sparsity=target.float(),
                     density=dense.float().mean(dim=(-2, -1)), recall=recall)


def _candidates(layout: BlockLayout, batch: int, device: torch.device,
                text_sink: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """``candidate`` ``[B,1,nb,nb]`` (competes for the budget) and ``forced`` (kept outside it)."""
    text = layout.text_blocks(device)
    valid_cols = layout.valid_key_blocks(batch, device)[:, None, None, :]
    nb = layout.num_blocks
    if text_sink:
        touches_text = text[:, None] | text[None, :]
    else:
        touches_text = torch.zeros(nb, nb, dtype=torch.bool, device=device)
    forced = touches_text[None, None] & valid_cols
    candidate = ~touches_text[None, None] & valid_cols
    return candidate, forced


def _row_order(mass: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """Key blocks of each row, best first: the diagonal, then candidates by mass."""
    nb = mass.shape[-1]
    eye = torch.eye(nb, dtype=torch.bool, device=mass.device)
    score = mass.masked_fill(~candidate, float("-inf"))
    score = score.masked_fill(eye & candidate, float("inf"))
    return torch.sort(score, dim=-1, descending=True, stable=True).indices


def _recall_curve(mass: torch.Tensor, candidate: torch.Tensor, forced: torch.Tensor,
                  order: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Kept mass when every row keeps its ``k`` best candidates, for ``k = 1..nb``: ``[B,H,nb]``.

    Also returns the total mass ``[B, H]``. Forced blocks count in every entry.
    """
    forced_mass = (mass * forced).sum(dim=(-2, -1))
    candidate_mass = torch.gather(mass * candidate, -1, order)
    curve = forced_mass[..., None] + torch.cumsum(candidate_mass.sum(-2), dim=-1)
    return curve, mass.sum(dim=(-2, -1))


def _recall_at(curve: torch.Tensor, total: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    kept = torch.gather(curve, -1, (keep - 1).clamp(min=0)[..., None])[..., 0]
    return torch.where(total > 0, kept / total.clamp(min=1e-30), torch.ones_like(total))


def _mask_from_order(order: torch.Tensor, keep: torch.Tensor, candidate: torch.Tensor,
                     forced: torch.Tensor) -> torch.Tensor:
    """Bool ``[B,H,nb,nb]``: the first ``keep[b,h]`` entries of each row's order, plus forced."""
    nb = order.shape[-1]
    in_budget = torch.arange(nb, device=order.device) < keep[..., None, None]
    dense = torch.zeros(order.shape, dtype=torch.bool, device=order.device)
    dense.scatter_(-1, order, in_budget.expand(order.shape))
    return (dense & candidate) | forced
