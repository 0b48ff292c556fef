"""Mask to index lists: packed block-mask bits -> per-row ``(counts, indices)`` on the device.

The block-sparse kernels walk ``indices[b, h, i, :counts[b, h, i]]``; a ``BlockMask`` keeps only
the packed bits (1/8 byte per block) so that every layer's mask can stay cached, and this kernel
expands them at every sparse call. One program owns ``ROWS`` rows ``(b, h, i)`` and walks the key
blocks in chunks of ``BLOCK`` columns: a ``tl.cumsum`` of the kept flags (plus the count of
earlier chunks) gives each kept block's slot; a second loop writes 0 past the row's count. Every
output element is written exactly once (the outputs can be ``torch.empty``), with no host sync.

Semantics are those of :meth:`adaspa_compile.blockmask.BlockMask.to_indices` (the reference):
bit ``j % 8`` of byte ``j // 8`` is key block ``j``; bits past ``num_kv_blocks`` are ignored.

Caveat: ``max_kept`` must be at least the largest row count (``BlockMask.from_dense`` guarantees
it). It is not checked on the device (that would need a host sync); a longer row is truncated to
``max_kept`` slots and its count clamped to ``max_kept`` (where the reference's scatter fails),
so the block-sparse kernels never read past a row.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _common

__all__ = ["mask_to_indices"]

# One chunk covers up to MAX_BLOCK key blocks (columns); short rows are batched ROWS to a program
# so that each program works on a tile of about TILE bits.
MAX_BLOCK = 2048
TILE = 2048


@triton.jit
def _mask_indices_kernel(Bits, Counts, Indices, n_rows, n_kv_blocks, n_bytes, max_kept,
                         ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    bits_row = Bits + rows64 * n_bytes
    idx_row = Indices + rows64 * max_kept
    offs = tl.arange(0, BLOCK)
    count = tl.zeros([ROWS], dtype=tl.int32)
    for start in range(0, n_kv_blocks, BLOCK):
        cols = start + offs
        live = row_ok[:, None] & (cols < n_kv_blocks)[None, :]
        byte = tl.load(bits_row[:, None] + (cols // 8)[None, :], mask=live, other=0)
        keep = ((byte.to(tl.int32) >> (cols % 8)[None, :]) & 1) * live.to(tl.int32)
        slot = count[:, None] + tl.cumsum(keep, axis=1) - 1
        tl.store(idx_row[:, None] + slot, tl.broadcast_to(cols[None, :], [ROWS, BLOCK]),
                 mask=(keep != 0) & (slot < max_kept))
        count += tl.sum(keep, axis=1)
    count = tl.minimum(count, max_kept)
    tl.store(Counts + rows64, count, mask=row_ok)
    for start in range(0, max_kept, BLOCK):
        slots = start + offs
        tail = row_ok[:, None] & (slots[None, :] >= count[:, None]) & (slots < max_kept)[None, :]
        tl.store(idx_row[:, None] + slots[None, :], tl.zeros([ROWS, BLOCK], dtype=tl.int32),
                 mask=tail)


def _check_bits(bits: torch.Tensor, num_kv_blocks: int, max_kept: int) -> None:
    if not isinstance(bits, torch.Tensor) or bits.dtype != torch.uint8 or bits.dim() != 4:
        got = f"{bits.dtype} {tuple(bits.shape)}" if isinstance(bits, torch.Tensor) else type(bits)
        raise ValueError(f"bits must be uint8 [B, H, nq, ceil(nk / 8)], got {got}")
    if not isinstance(num_kv_blocks, int) or num_kv_blocks < 0 \
            or bits.shape[3] != -(-num_kv_blocks // 8):
        raise ValueError(f"bits last dim {bits.shape[3]} must be ceil(num_kv_blocks / 8) for "
                         f"num_kv_blocks={num_kv_blocks!r}")
    if not isinstance(max_kept, int) or not 0 <= max_kept <= num_kv_blocks:
        raise ValueError(f"max_kept must be an int in [0, {num_kv_blocks}], got {max_kept!r}")
    if not bits.is_cuda and not _common.interpreting():
        raise ValueError(f"bits on {bits.device}: the kernel needs a CUDA tensor (or "
                         "TRITON_INTERPRET=1); use BlockMask.to_indices() elsewhere")


def mask_to_indices(bits: torch.Tensor, num_kv_blocks: int, max_kept: int, *,
                    counts: Optional[torch.Tensor] = None,
                    indices: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(counts, indices)`` of a packed block mask, as ``BlockMask.to_indices()`` gives them.

    Args:
        bits: uint8 ``[B, H, nq, ceil(nk / 8)]`` (``BlockMask.bits``), on CUDA (or any device
            under ``TRITON_INTERPRET=1``); copied if not contiguous.
        num_kv_blocks: ``nk``.
        max_kept: the padding width of ``indices`` (``BlockMask.max_kept``), >= every row's count.
        counts, indices: optional preallocated contiguous outputs, int32 ``[B, H, nq]`` and
            ``[B, H, nq, max_kept]`` (tests poison them); default ``torch.empty``.
    """
    _check_bits(bits, num_kv_blocks, max_kept)
    B, H, nq, _ = bits.shape
    counts = _common.contiguous_out("counts", counts, (B, H, nq), torch.int32, bits.device)
    indices = _common.contiguous_out("indices", indices, (B, H, nq, max_kept), torch.int32,
                                     bits.device)
    n_rows = B * H * nq
    if n_rows == 0:
        return counts, indices
    if num_kv_blocks == 0:
        return counts.zero_(), indices
    bits = bits.contiguous()
    # A row keeping nothing anywhere (max_kept == 0) still writes its count; the kernel then
    # stores no index, so any valid pointer does.
    idx_arg = indices if max_kept > 0 else counts
    block = min(max(16, triton.next_power_of_2(max(num_kv_blocks, 1))), MAX_BLOCK)
    rows = max(1, TILE // block)
    num_warps = 8 if block * rows >= 2048 else 4
    grid = (triton.cdiv(n_rows, rows),)
    _mask_indices_kernel[grid](bits, counts, idx_arg, n_rows, num_kv_blocks, bits.shape[3],
                               max_kept, ROWS=rows, BLOCK=block, num_warps=num_warps)
    return counts, indices
