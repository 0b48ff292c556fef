"""Block selection from the block mass (docs/method.md, Selection and Head tiers).

Per (batch, head) and query-block row:
- text sink: every block whose query or key side touches a text token is kept, outside the budget;
- row-wise top-k: each row keeps the same number ``k_h`` of video key blocks, the diagonal first;
- head budget: every head keeps the same count per row (``"uniform"``), heads ranked by recall
  get sparsity ``s + d``, ``s`` or ``s - d`` (``"tiers"``), or each row's count summed over the
  heads goes to the blocks of any head that add the most to the layer's recall (``"layer"``);
- ``mode="recall"``: each head keeps the fewest blocks per row that reach the target recall;
- blocks made only of padded keys are dropped.

Every choice is read off one sort of each row, so the recall of any budget is exact.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .blockmask import BlockMask, pack_bits
from .config import AdaSpaConfig
from .logs import log_once

__all__ = ["BlockLayout", "Selection", "keep_best", "keep_best_of_layer", "select_blocks",
           "sorted_candidate_rows", "tier_sparsities"]

logger = logging.getLogger(__name__)

# A head whose recall at the layer's sparsity exceeds this is "easy" (docs/method.md, Head tiers).
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

    On CUDA the two passes over the mass map (:func:`sorted_candidate_rows`, :func:`keep_best`)
    run as Triton kernels; elsewhere, and for rows longer than the kernels sort, in PyTorch.
    ``head_budget="layer"`` runs in PyTorch everywhere (:func:`keep_best_of_layer`).

    ``head_group``: see :func:`tier_sparsities` (the heads are a slice of the layer's; with
    ``head_budget="layer"`` the budget is split over this slice).
    """
    B, H, nq, nk = mass.shape
    if nq != layout.num_blocks or nk != nq:
        raise ValueError(f"mass {tuple(mass.shape)} does not match {layout.num_blocks} blocks")
    mass = mass.float()
    text = layout.text_blocks(mass.device) if cfg.text_sink else \
        torch.zeros(nk, dtype=torch.bool, device=mass.device)
    valid = layout.valid_key_blocks(B, mass.device)
    n_cand = (valid & ~text).sum(-1).clamp(min=1)  # [B]: candidate key blocks per row
    if cfg.mode == "sparsity" and cfg.head_budget == "layer":
        uniform = torch.full((B, 1), float(cfg.sparsity), device=mass.device)
        return _layer_selection(mass, layout, text, valid, _budget(uniform, n_cand)[:, 0])
    kernels = _selection_kernels(mass)
    rows = kernels.sorted_candidate_mass if kernels else sorted_candidate_rows
    sorted_mass, row_forced, row_total = rows(mass, text, valid)
    curve = row_forced.sum(-1)[..., None] + torch.cumsum(sorted_mass.sum(-2), dim=-1)
    total = row_total.sum(-1)
    if cfg.mode == "recall":
        reached = curve >= cfg.recall * total[..., None]
        keep = (~reached).sum(-1) + 1
        keep = torch.minimum(keep, n_cand[:, None].expand(B, H))
        target = 1 - keep.float() / n_cand[:, None]
    else:
        target = torch.full((B, H), float(cfg.sparsity), device=mass.device)
        if cfg.head_budget == "tiers" and (H > 1 or head_group is not None):
            recall_at_s = _recall_at(curve, total, _budget(target, n_cand))
            target = tier_sparsities(recall_at_s, cfg.sparsity, head_group)
        keep = _budget(target, n_cand)
    bits, counts = (kernels.kept_block_bits if kernels else keep_best)(
        mass, text, valid, keep, sorted_mass)
    block_mask = BlockMask.from_bits(bits, counts, num_kv_blocks=nk,
                                     block_size=layout.block_size, seq_len=layout.seq_len)
    return Selection(mask=block_mask, target_sparsity=target.float(),
                     density=counts.sum(-1).float() / (nq * nk),
                     recall=_recall_at(curve, total, keep))


def _budget(sparsity: torch.Tensor, n_cand: torch.Tensor) -> torch.Tensor:
    """Candidate blocks each row keeps at ``sparsity`` ``[B, H]``: at least one."""
    return torch.round((1 - sparsity) * n_cand[:, None]).clamp(min=1).long()


def _layer_selection(mass: torch.Tensor, layout: BlockLayout, text: torch.Tensor,
                     valid: torch.Tensor, keep: torch.Tensor) -> Selection:
    """``head_budget="layer"``: :func:`keep_best_of_layer`, with its density and recall."""
    if mass.is_cuda:
        log_once(logger, "adaspa: head_budget='layer' selects blocks in PyTorch: the selection "
                 "kernels keep one count per head and row")
    dense = keep_best_of_layer(mass, text, valid, keep)
    candidate, _ = _candidates(text, valid)
    counts = dense.sum(-1, dtype=torch.int32)
    block_mask = BlockMask.from_bits(pack_bits(dense), counts,
                                     num_kv_blocks=mass.shape[-1], block_size=layout.block_size,
                                     seq_len=layout.seq_len)
    kept = (dense & candidate).sum((-2, -1)).float()
    total = mass.sum((-2, -1))
    recall = (mass * dense).sum((-2, -1)) / total.clamp(min=1e-30)
    return Selection(mask=block_mask,
                     target_sparsity=1 - kept / candidate.sum((-2, -1)).clamp(min=1).float(),
                     density=counts.sum(-1).float() / mass.shape[-1] ** 2,
                     recall=torch.where(total > 0, recall, torch.ones_like(total)))


def keep_best_of_layer(mass: torch.Tensor, text: torch.Tensor, valid: torch.Tensor,
                       keep: torch.Tensor) -> torch.Tensor:
    """The bool ``[B, H, nb, nb]`` mask of ``head_budget="layer"``: each query-block row keeps
    ``H * keep[b]`` candidate blocks over all its heads (the count of every head keeping
    ``keep[b]``), so the layer's density is that of the uniform split. Every head's candidate
    diagonal comes first; the rest go to the best ``mass / total`` of any head, ``total`` being
    the head's whole mass, which maximises the sum of the heads' recalls; equal values by head,
    then column. Forced blocks (text) are kept outside the budget, as in :func:`keep_best`.
    """
    B, H, nq, nk = mass.shape
    candidate, forced = _candidates(text, valid)
    share = mass / mass.sum((-2, -1), keepdim=True).clamp(min=1e-30)
    rows = _scores(share, candidate).transpose(1, 2).reshape(B, nq, H * nk)
    order = torch.sort(rows, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(H * nk, device=mass.device).expand_as(order))
    best = (rank < H * keep[:, None, None]).view(B, nq, H, nk).transpose(1, 2)
    return (best & candidate) | forced


def _selection_kernels(mass: torch.Tensor):
    """The kernels module when it can run the selection of ``mass``, else ``None`` (logged once
    per reason on CUDA)."""
    if not mass.is_cuda:
        return None
    from . import kernels

    if kernels.TRITON_IMPORT_ERROR is not None:
        reason = kernels.TRITON_IMPORT_ERROR
    elif mass.shape[-1] > kernels.SELECTION_MAX_BLOCKS:
        reason = f"{mass.shape[-1]} blocks per row > {kernels.SELECTION_MAX_BLOCKS}"
    else:
        return kernels
    log_once(logger, f"adaspa: block selection runs in PyTorch: {reason}")
    return None


def sorted_candidate_rows(mass: torch.Tensor, text: torch.Tensor, valid: torch.Tensor
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """First pass of the selection: ``(sorted, row_forced, row_total)``.

    Key block ``j`` of row ``i`` is *forced* when it is valid (``valid`` bool ``[B, nb]``) and
    block ``i`` or ``j`` holds text (``text`` bool ``[nb]``), a *candidate* when it is valid and
    neither does. ``sorted`` fp32 ``[B, H, nb, nb]``: each row's candidate masses, the diagonal
    first (when a candidate), then descending, zeros after the last; ``row_forced`` and
    ``row_total`` ``[B, H, nb]``: each row's forced and total mass. The PyTorch path and the
    reference of ``kernels.sorted_candidate_mass``.
    """
    candidate, forced = _candidates(text, valid)
    order = torch.sort(_scores(mass, candidate), dim=-1, descending=True, stable=True).indices
    return torch.gather(mass * candidate, -1, order), (mass * forced).sum(-1), mass.sum(-1)


def keep_best(mass: torch.Tensor, text: torch.Tensor, valid: torch.Tensor, keep: torch.Tensor,
              sorted_mass: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Second pass: the first ``keep[b, h]`` blocks of each row in the order of
    :func:`sorted_candidate_rows` (its ``sorted_mass``; equal masses by column, as a stable
    sort) plus the row's forced blocks, as ``(bits, counts)`` for :meth:`BlockMask.from_bits`.
    The PyTorch path and the reference of ``kernels.kept_block_bits``.

    The ``keep``-th best score is read off ``sorted_mass``; every candidate scoring above it is
    kept, and the first of those scoring equal to it, by column, until ``keep`` are.
    """
    candidate, forced = _candidates(text, valid)
    nb = mass.shape[-1]
    k = keep[..., None]  # [B, H, 1]
    kth = torch.gather(sorted_mass, -1, (k - 1).clamp(0, max(nb - 1, 0))[..., None]
                       .expand(*mass.shape[:-1], 1))[..., 0]
    diagonal_first = torch.diagonal(candidate, dim1=-2, dim2=-1)  # [B, 1, nb]
    worst = torch.where(diagonal_first & (k == 1), float("inf"), kth)
    worst = torch.where(k > candidate.sum(-1), float("-inf"), worst)[..., None]
    score = _scores(mass, candidate)
    above = candidate & (score > worst)
    tie = candidate & (score == worst)
    earlier_ties = torch.cumsum(tie, -1) - tie.long()
    room = k[..., None] - above.sum(-1, keepdim=True)
    dense = ((above | (tie & (earlier_ties < room))) & (k[..., None] > 0)) | forced
    return pack_bits(dense), dense.sum(-1, dtype=torch.int32)


def _candidates(text: torch.Tensor, valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``candidate`` ``[B,1,nb,nb]`` (competes for the budget) and ``forced`` (kept outside it)."""
    touches_text = text[:, None] | text[None, :]
    valid_cols = valid[:, None, None, :]
    return ~touches_text[None, None] & valid_cols, touches_text[None, None] & valid_cols


def _scores(mass: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """The row's order of preference as values: ``+inf`` on a candidate diagonal, the mass of
    other candidates, ``-inf`` elsewhere."""
    eye = torch.eye(mass.shape[-1], dtype=torch.bool, device=mass.device)
    score = mass.masked_fill(~candidate, float("-inf"))
    return score.masked_fill(eye & candidate, float("inf"))


def _recall_at(curve: torch.Tensor, total: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    kept = torch.gather(curve, -1, (keep - 1).clamp(min=0)[..., None])[..., 0]
    return torch.where(total > 0, kept / total.clamp(min=1e-30), torch.ones_like(total))
