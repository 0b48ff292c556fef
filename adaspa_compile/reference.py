"""Pure-PyTorch reference of the three AdaSpa kernels: their specification and the CPU path.

Every function works one query block at a time, so memory stays O(L * block_size) per (batch,
head): no L x L matrix is ever built. Arithmetic runs in fp32 (float64 for float64 inputs).

Shared conventions:
- ``q, k, v`` are ``[B, H, L, D]`` (any strides); ``key_valid`` is ``None`` or bool ``[B, L]``,
  True where the key takes part.
- A query row with no valid key has output 0 and LSE ``-inf``; its block mass is 0.
- The LSE is the natural-log log-sum-exp of ``scale * q.k`` over the valid keys, fp32.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["attention_with_lse_ref", "block_mass_ref", "block_sparse_attention_ref"]


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _query_blocks(length: int, block_size: int):
    for start in range(0, length, block_size):
        yield start, min(start + block_size, length)


def _scores(q_blk: torch.Tensor, keys: torch.Tensor, scale: float,
            valid: Optional[torch.Tensor]) -> torch.Tensor:
    """``scale * q.k`` in the accumulation dtype, ``-inf`` where ``valid`` is False."""
    s = torch.matmul(q_blk, keys.transpose(-1, -2)) * scale
    if valid is not None:
        s = s.masked_fill(~valid, float("-inf"))
    return s


def _probs(s: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``exp(s - lse)`` with rows of ``lse == -inf`` (nothing valid) giving 0, not NaN."""
    finite = torch.isfinite(lse).unsqueeze(-1)
    return torch.where(finite, torch.exp(s - lse.unsqueeze(-1)), torch.zeros_like(s))


def attention_with_lse_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                           key_valid: Optional[torch.Tensor] = None,
                           block_size: int = 64) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense attention; returns ``(out [B,H,L,D] in q.dtype, lse [B,H,L] fp32)``."""
    acc = _acc_dtype(q)
    kf, vf = k.to(acc), v.to(acc)
    valid = None if key_valid is None else key_valid[:, None, None, :]
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    for lo, hi in _query_blocks(q.shape[2], block_size):
        s = _scores(q[:, :, lo:hi].to(acc), kf, scale, valid)
        row_lse = torch.logsumexp(s, dim=-1)
        out[:, :, lo:hi] = torch.matmul(_probs(s, row_lse), vf).to(q.dtype)
        lse[:, :, lo:hi] = row_lse.float()
    return out, lse


def block_mass_ref(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float,
                   block_size: int, key_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention mass per (query block, key block) from a given LSE: fp32 ``[B,H,nq,nk]``."""
    acc = _acc_dtype(q)
    B, H, L, _ = q.shape
    nb = -(-L // block_size)
    kf = k.to(acc)
    valid = None if key_valid is None else key_valid[:, None, None, :]
    mass = torch.empty(B, H, nb, nb, dtype=torch.float32, device=q.device)
    for i, (lo, hi) in enumerate(_query_blocks(L, block_size)):
        s = _scores(q[:, :, lo:hi].to(acc), kf, scale, valid)
        col_mass = _probs(s, lse[:, :, lo:hi].to(acc)).sum(dim=2)
        col_mass = torch.nn.functional.pad(col_mass, (0, nb * block_size - L))
        mass[:, :, i] = col_mass.view(B, H, nb, block_size).sum(-1).float()
    return mass


def block_sparse_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               counts: torch.Tensor, indices: torch.Tensor, scale: float,
                               block_size: int,
                               key_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of each query block over its kept key blocks only.

    ``counts`` int ``[B,H,nq]`` and ``indices`` int ``[B,H,nq,max_kept]`` as produced by
    :meth:`BlockMask.to_indices`. Keys are gathered block by block, so the work is proportional to
    the number of kept blocks.
    """
    acc = _acc_dtype(q)
    B, H, L, D = q.shape
    nb = -(-L // block_size)
    pad = nb * block_size - L
    k_blocks = torch.nn.functional.pad(k.to(acc), (0, 0, 0, pad)).view(B, H, nb, block_size, D)
    v_blocks = torch.nn.functional.pad(v.to(acc), (0, 0, 0, pad)).view(B, H, nb, block_size, D)
    token_valid = torch.ones(B, L, dtype=torch.bool, device=q.device) if key_valid is None \
        else key_valid
    token_valid = torch.nn.functional.pad(token_valid, (0, pad)).view(B, 1, nb, block_size)
    token_valid = token_valid.expand(B, H, nb, block_size)
    b_idx = torch.arange(B, device=q.device)[:, None, None]
    h_idx = torch.arange(H, device=q.device)[None, :, None]
    slots = torch.arange(indices.shape[-1], device=q.device)
    out = torch.empty_like(q)
    for i, (lo, hi) in enumerate(_query_blocks(L, block_size)):
        idx = indices[:, :, i].long()
        kept = slots < counts[:, :, i, None]
        keys = k_blocks[b_idx, h_idx, idx].flatten(2, 3)
        values = v_blocks[b_idx, h_idx, idx].flatten(2, 3)
        valid = (token_valid[b_idx, h_idx, idx] & kept[..., None]).flatten(2, 3)
        s = _scores(q[:, :, lo:hi].to(acc), keys, scale, valid[:, :, None, :])
        row_lse = torch.logsumexp(s, dim=-1)
        out[:, :, lo:hi] = torch.matmul(_probs(s, row_lse), values).to(q.dtype)
    return out
