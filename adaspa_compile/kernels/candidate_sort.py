"""Block selection, first pass: each row's candidate masses, sorted, with the row's other sums.

Per mass-map row ``(b, h, i)`` (one program each), from the block mass ``[B, H, nb, nb]``, the
text-block flags ``[nb]`` and the valid-key-block flags ``[B, nb]``:

- a key block ``j`` is *forced* when it is valid and block ``i`` or ``j`` holds text, and a
  *candidate* when it is valid and neither does;
- ``sorted[b, h, i]``: the candidates' masses, the diagonal block first (when it is a
  candidate), then descending; zeros after the last candidate;
- ``row_forced[b, h, i]``: the forced blocks' mass; ``row_total[b, h, i]``: the row's mass.

Semantics are those of :func:`adaspa_compile.selection.sorted_candidate_rows` (the PyTorch
reference and CPU path): ``sorted`` equals it exactly, the two sums up to summation order. The
whole row is sorted in registers (``tl.sort``, a bitonic network on the row padded to a power of
two), so rows are limited to :data:`MAX_BLOCKS` key blocks.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _common

__all__ = ["sorted_candidate_mass", "MAX_BLOCKS", "check_selection_inputs"]

# Longest mass-map row one program sorts (HunyuanVideo 720p: 1861 blocks of 64).
MAX_BLOCKS = 8192


@triton.jit
def row_scores(Mass, Text, Valid, row, i, b, cols, nb):
    """Row ``i`` of batch ``b``: ``(mass, score, candidate, forced)`` over ``cols``.

    ``score`` is the mass of candidates, ``+inf`` on a candidate diagonal (kept first) and
    ``-inf`` elsewhere, so a descending sort of it is the row's order of preference.
    """
    live = cols < nb
    mass = tl.load(Mass + row.to(tl.int64) * nb + cols, mask=live, other=0.0)
    text_i = tl.load(Text + i) != 0
    text_j = tl.load(Text + cols, mask=live, other=0) != 0
    valid_j = tl.load(Valid + b.to(tl.int64) * nb + cols, mask=live, other=0) != 0
    touches_text = text_j | text_i
    candidate = valid_j & ~touches_text
    forced = valid_j & touches_text
    score = tl.where(candidate, mass, float("-inf"))
    score = tl.where(candidate & (cols == i), float("inf"), score)
    return mass, score, candidate, forced


@triton.jit
def _candidate_sort_kernel(Mass, Text, Valid, Sorted, RowForced, RowTotal, H, nb,
                           NB_PAD: tl.constexpr):
    row = tl.program_id(0)
    i = row % nb
    b = row // nb // H
    cols = tl.arange(0, NB_PAD)
    mass, score, candidate, forced = row_scores(Mass, Text, Valid, row, i, b, cols, nb)
    ranked = tl.sort(score, descending=True)
    diagonal = tl.sum(tl.where(cols == i, mass, 0.0))
    ranked = tl.where(ranked == float("inf"), diagonal, ranked)
    ranked = tl.where(ranked == float("-inf"), 0.0, ranked)
    tl.store(Sorted + row.to(tl.int64) * nb + cols, ranked, mask=cols < nb)
    tl.store(RowForced + row, tl.sum(tl.where(forced, mass, 0.0)))
    tl.store(RowTotal + row, tl.sum(mass))


def check_selection_inputs(mass: torch.Tensor, text_blocks: torch.Tensor,
                           valid_blocks: torch.Tensor) -> None:
    """``ValueError`` unless the kernels can take this mass map and these block flags."""
    if mass.dtype != torch.float32 or mass.dim() != 4 or mass.shape[2] != mass.shape[3]:
        raise ValueError(f"mass must be fp32 [B, H, nb, nb], got {mass.dtype} {tuple(mass.shape)}")
    B, _, nb, _ = mass.shape
    if nb > MAX_BLOCKS:
        raise ValueError(f"{nb} blocks per row: the selection kernels sort at most {MAX_BLOCKS}")
    if not mass.is_cuda and not _common.interpreting():
        raise ValueError(f"mass on {mass.device}: the kernels need CUDA (or TRITON_INTERPRET=1)")
    if text_blocks.dtype != torch.bool or tuple(text_blocks.shape) != (nb,):
        raise ValueError(f"text_blocks must be bool [{nb}], got {text_blocks.dtype} "
                         f"{tuple(text_blocks.shape)}")
    if valid_blocks.dtype != torch.bool or tuple(valid_blocks.shape) != (B, nb):
        raise ValueError(f"valid_blocks must be bool [{B}, {nb}], got {valid_blocks.dtype} "
                         f"{tuple(valid_blocks.shape)}")
    if text_blocks.device != mass.device or valid_blocks.device != mass.device:
        raise ValueError("mass, text_blocks and valid_blocks must be on one device")


def launch_shape(nb: int) -> Tuple[int, int]:
    """``(NB_PAD, num_warps)`` for rows of ``nb`` key blocks."""
    pad = max(16, triton.next_power_of_2(nb))
    return pad, 4 if pad <= 1024 else 8


def sorted_candidate_mass(mass: torch.Tensor, text_blocks: torch.Tensor,
                          valid_blocks: torch.Tensor, *, out: Optional[torch.Tensor] = None
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sorted, row_forced, row_total)`` of a block mass map (see the module docstring).

    Args:
        mass: fp32 ``[B, H, nb, nb]`` (copied if not contiguous), ``nb <= MAX_BLOCKS``.
        text_blocks: bool ``[nb]``, the blocks holding text (all False without a text sink).
        valid_blocks: bool ``[B, nb]``, the key blocks holding at least one unpadded key.
        out: optional preallocated contiguous ``sorted`` (tests poison it).
    """
    check_selection_inputs(mass, text_blocks, valid_blocks)
    B, H, nb, _ = mass.shape
    ranked = _common.contiguous_out("out", out, tuple(mass.shape), torch.float32, mass.device)
    row_forced = torch.empty(B, H, nb, dtype=torch.float32, device=mass.device)
    row_total = torch.empty(B, H, nb, dtype=torch.float32, device=mass.device)
    if mass.numel() == 0:
        return ranked, row_forced, row_total
    pad, warps = launch_shape(nb)
    _candidate_sort_kernel[(B * H * nb,)](
        mass.contiguous(), text_blocks.to(torch.uint8), valid_blocks.to(torch.uint8).contiguous(),
        ranked, row_forced, row_total, H, nb, NB_PAD=pad, num_warps=warps)
    return ranked, row_forced, row_total
