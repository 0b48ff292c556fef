"""Block selection, second pass: each row's ``keep[b, h]`` best candidates plus its forced blocks,
as packed mask bits, with the counts that size the block-sparse launch.

One program owns two adjacent rows ``2p, 2p + 1`` of a ``(b, h)``. For each it rebuilds the
row's scores (:func:`candidate_sort.row_scores`: the diagonal first, then candidates by mass),
reads the ``keep``-th best score ``v`` off the first pass's sorted row (no sort here), and keeps
every candidate above ``v`` plus the first ties at ``v`` in column order (what a stable
descending sort keeps), and the forced blocks. Outputs: ``bits`` uint8
``[B, H, nb, ceil(nb / 8)]`` (``BlockMask.bits``) and ``counts`` int32 ``[B, H, nb]``, the kept
blocks per row. Semantics are exactly those of :func:`adaspa_compile.selection.keep_best` (the
PyTorch reference and CPU path).
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from .candidate_sort import check_selection_inputs, launch_shape, row_scores

__all__ = ["kept_block_bits"]


@triton.jit
def _kept(Mass, Text, Valid, Sorted, row, i, b, keep, cols, nb):
    """Bool over ``cols``: the blocks row ``i`` keeps with a budget of ``keep`` candidates."""
    _, score, candidate, forced = row_scores(Mass, Text, Valid, row, i, b, cols, nb)
    n_candidates = tl.sum(candidate.to(tl.int32))
    diagonal_first = tl.sum((candidate & (cols == i)).to(tl.int32)) > 0
    kth = tl.load(Sorted + row.to(tl.int64) * nb + tl.maximum(keep - 1, 0))
    worst = tl.where(diagonal_first & (keep == 1), float("inf"), kth)
    worst = tl.where(keep > n_candidates, float("-inf"), worst)
    above = candidate & (score > worst)
    tie = (candidate & (score == worst)).to(tl.int32)
    earlier_ties = tl.cumsum(tie, 0) - tie
    room = keep - tl.sum(above.to(tl.int32))
    best = (above | ((tie != 0) & (earlier_ties < room))) & (keep > 0)
    return best | forced


@triton.jit
def _store_bits(Bits, row, kept, n_bytes, NB_PAD: tl.constexpr):
    bytes_ = tl.reshape(kept.to(tl.int32), [NB_PAD // 8, 8])
    weights = 1 << tl.arange(0, 8)
    packed = tl.sum(bytes_ * weights[None, :], 1)
    offs = tl.arange(0, NB_PAD // 8)
    tl.store(Bits + row.to(tl.int64) * n_bytes + offs, packed.to(tl.uint8), mask=offs < n_bytes)


@triton.jit
def _keep_blocks_kernel(Mass, Text, Valid, Sorted, Keep, Bits, Counts, H, nb, n_pairs, n_bytes,
                        NB_PAD: tl.constexpr):
    pid = tl.program_id(0)
    bh = pid // n_pairs
    pair = pid % n_pairs
    b = bh // H
    keep = tl.load(Keep + bh)
    cols = tl.arange(0, NB_PAD)
    i0 = 2 * pair
    row0 = bh * nb + i0
    kept0 = _kept(Mass, Text, Valid, Sorted, row0, i0, b, keep, cols, nb) & (cols < nb)
    _store_bits(Bits, row0, kept0, n_bytes, NB_PAD)
    tl.store(Counts + row0, tl.sum(kept0.to(tl.int32)))
    if i0 + 1 < nb:
        kept1 = _kept(Mass, Text, Valid, Sorted, row0 + 1, i0 + 1, b, keep, cols,
                      nb) & (cols < nb)
        _store_bits(Bits, row0 + 1, kept1, n_bytes, NB_PAD)
        tl.store(Counts + row0 + 1, tl.sum(kept1.to(tl.int32)))


def kept_block_bits(mass: torch.Tensor, text_blocks: torch.Tensor, valid_blocks: torch.Tensor,
                    keep: torch.Tensor, sorted_mass: torch.Tensor
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(bits, counts)`` of the mask keeping ``keep[b, h]`` candidates per row.

    Args:
        mass, text_blocks, valid_blocks: as :func:`candidate_sort.sorted_candidate_mass`.
        sorted_mass: that function's first output for them.
        keep: integer ``[B, H]``: candidates kept per row (the diagonal first; 0 keeps only the
            forced blocks).
    """
    check_selection_inputs(mass, text_blocks, valid_blocks)
    B, H, nb, _ = mass.shape
    if keep.dtype not in (torch.int32, torch.int64) or tuple(keep.shape) != (B, H) \
            or keep.device != mass.device:
        raise ValueError(f"keep must be an integer [{B}, {H}] tensor on {mass.device}, got "
                         f"{keep.dtype} {tuple(keep.shape)} on {keep.device}")
    if sorted_mass.dtype != torch.float32 or sorted_mass.shape != mass.shape \
            or sorted_mass.device != mass.device:
        raise ValueError(f"sorted_mass must be fp32 {tuple(mass.shape)} on {mass.device}, got "
                         f"{sorted_mass.dtype} {tuple(sorted_mass.shape)} on {sorted_mass.device}")
    n_bytes, n_pairs = -(-nb // 8), -(-nb // 2)
    bits = torch.empty(B, H, nb, n_bytes, dtype=torch.uint8, device=mass.device)
    counts = torch.empty(B, H, nb, dtype=torch.int32, device=mass.device)
    if mass.numel() == 0:
        return bits, counts
    pad, warps = launch_shape(nb)
    _keep_blocks_kernel[(B * H * n_pairs,)](
        mass.contiguous(), text_blocks.to(torch.uint8), valid_blocks.to(torch.uint8).contiguous(),
        sorted_mass.contiguous(), keep.to(torch.int32).contiguous(), bits, counts,
        H, nb, n_pairs, n_bytes, NB_PAD=pad, num_warps=warps)
    return bits, counts
