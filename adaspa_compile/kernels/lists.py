"""Host-side helpers of the block-sparse kernels: list checks, launch order, key-bias ranges."""

from __future__ import annotations

from typing import Optional

import torch

from . import _common


def check_sparse_inputs(q, k, v, scale: float, block_size: int,
                        key_valid: Optional[torch.Tensor]) -> None:
    """``ValueError`` for anything the block-sparse kernels cannot take (before any launch)."""
    _common.check_qk(q, k, block_size, v)
    _common.check_scale(scale)
    _common.check_key_valid(key_valid, q)


def check_lists(counts: torch.Tensor, indices: torch.Tensor, n_lists: int, nk: int,
                q: torch.Tensor) -> None:
    B, H = q.shape[:2]
    if counts.dtype not in (torch.int32, torch.int64) or tuple(counts.shape) != (B, H, n_lists):
        raise ValueError(f"counts must be int32 [B, H, nq] = {(B, H, n_lists)}; got "
                         f"{counts.dtype} {tuple(counts.shape)}")
    if indices.dtype not in (torch.int32, torch.int64) or indices.dim() != 4 \
            or tuple(indices.shape[:3]) != (B, H, n_lists) or indices.shape[3] > nk:
        raise ValueError(f"indices must be int32 [B, H, nq, max_kept] with nq={n_lists}, "
                         f"max_kept <= {nk}; got {indices.dtype} {tuple(indices.shape)}")
    if counts.device != q.device or indices.device != q.device:
        raise ValueError(f"counts and indices must be on {q.device}")


def launch_lists(q, counts: torch.Tensor, indices: torch.Tensor, block_size: int, out):
    """``(out, indices, nb)`` for a launch of one program per query block: the lists checked
    against ``q``, ``out`` as given (checked) or new, and ``indices`` given one slot where no
    row keeps anything (every output row is then 0; the kernels still take a slot's address)."""
    B, H, L = q.shape[:3]
    nb = -(-L // block_size)
    check_lists(counts, indices, nb, nb, q)
    out = _common.output_like(q, out)
    if indices.shape[3] == 0:
        indices = torch.zeros(B, H, nb, 1, dtype=torch.int32, device=q.device)
    return out, indices, nb


def work_order(counts: torch.Tensor) -> torch.Tensor:
    """Flattened (b, h, list) items by their work ``counts``, heaviest first; ties keep their
    order (a stable sort), which keeps a head's K/V hot in L2."""
    _, order = torch.sort(counts.reshape(-1), descending=True, stable=True)
    return order.to(torch.int32)


def bias_block_range(bias: torch.Tensor, block_size: int) -> torch.Tensor:
    """int32 ``[B, 2]``: per batch the range ``[lo, hi)`` of key blocks holding any key with a
    non-zero bias (padded, or past the sequence end); ``[nb, nb)`` when none does."""
    B = bias.shape[0]
    need = (bias != 0).view(B, -1, block_size).any(-1)
    nb = need.shape[1]
    blocks = torch.arange(nb, device=bias.device)
    lo = torch.where(need, blocks, nb).amin(-1)
    hi = torch.maximum(torch.where(need, blocks + 1, 0).amax(-1), lo)
    return torch.stack([lo, hi], dim=-1).to(torch.int32).contiguous()
