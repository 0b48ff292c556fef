"""Pure-PyTorch reference of the AdaSpa kernels: their specification and the CPU path.

Every function works one query block at a time, so memory stays O(L * block_size) per (batch,
head): no L x L matrix is ever built. Arithmetic runs in fp32 (float64 for float64 inputs).

Shared conventions:
- ``q, k, v`` are ``[B, H, L, D]`` (any strides); ``key_valid`` is ``None`` or bool ``[B, L]``,
  True where the key takes part.
- A query row with no valid key has output 0 and LSE ``-inf``; its block mass is 0.
- The LSE is the natural-log log-sum-exp of ``scale * q.k`` over the valid keys, fp32.

FP8 block-sparse attention (``precision="fp8"``) is specified by :func:`quantize_fp8_ref` and
:func:`block_sparse_attention_fp8_ref`: Q, K and V are rounded to ``float8_e4m3fn`` with fp32
scales (Q and K per block of tokens, V per channel; K first smoothed by subtracting its mean over
tokens, which softmax ignores), and so are the attention probabilities.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

__all__ = ["attention_with_lse_ref", "block_mass_ref", "block_sparse_attention_ref",
           "Fp8Qkv", "quantize_fp8_ref", "block_sparse_attention_fp8_ref", "FP8_DTYPE", "FP8_MAX"]

FP8_DTYPE = torch.float8_e4m3fn
# The largest finite float8_e4m3fn: a block's largest magnitude is scaled to it, and the
# probabilities (at most 1) are multiplied by it before rounding.
FP8_MAX = 448.0


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


def _kept_blocks(k: torch.Tensor, v: torch.Tensor, counts: torch.Tensor, indices: torch.Tensor,
                 block_size: int, key_valid: Optional[torch.Tensor]):
    """Per query block ``(lo, hi, keys, values, valid)``: the kept key blocks of each (batch,
    head) gathered into ``[B, H, max_kept * block_size, D]`` and the keys that take part
    (kept, valid and inside the sequence) as bool ``[B, H, 1, max_kept * block_size]``."""
    B, H, L, D = k.shape
    nb = -(-L // block_size)
    pad = nb * block_size - L
    k_blocks = torch.nn.functional.pad(k, (0, 0, 0, pad)).view(B, H, nb, block_size, D)
    v_blocks = torch.nn.functional.pad(v, (0, 0, 0, pad)).view(B, H, nb, block_size, D)
    token_valid = torch.ones(B, L, dtype=torch.bool, device=k.device) if key_valid is None \
        else key_valid
    token_valid = torch.nn.functional.pad(token_valid, (0, pad)).view(B, 1, nb, block_size)
    token_valid = token_valid.expand(B, H, nb, block_size)
    b_idx = torch.arange(B, device=k.device)[:, None, None]
    h_idx = torch.arange(H, device=k.device)[None, :, None]
    slots = torch.arange(indices.shape[-1], device=k.device)
    for i, (lo, hi) in enumerate(_query_blocks(L, block_size)):
        idx = indices[:, :, i].long()
        kept = slots < counts[:, :, i, None]
        keys = k_blocks[b_idx, h_idx, idx].flatten(2, 3)
        values = v_blocks[b_idx, h_idx, idx].flatten(2, 3)
        valid = (token_valid[b_idx, h_idx, idx] & kept[..., None]).flatten(2, 3)
        yield lo, hi, keys, values, valid[:, :, None, :]


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
    out = torch.empty_like(q)
    for lo, hi, keys, values, valid in _kept_blocks(k.to(acc), v.to(acc), counts, indices,
                                                    block_size, key_valid):
        s = _scores(q[:, :, lo:hi].to(acc), keys, scale, valid)
        row_lse = torch.logsumexp(s, dim=-1)
        out[:, :, lo:hi] = torch.matmul(_probs(s, row_lse), values).to(q.dtype)
    return out


class Fp8Qkv(NamedTuple):
    """Q, K, V rounded to ``float8_e4m3fn`` ``[B, H, L, D]`` and their fp32 scales: the value of
    an entry is its fp8 value times its scale. ``q_scale [B, H, nq]`` and ``k_scale [B, H, nk]``
    are per block of ``block_size`` tokens; ``v_scale [B, H, D]`` is per channel; ``k`` holds K
    minus its mean over tokens."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    q_scale: torch.Tensor
    k_scale: torch.Tensor
    v_scale: torch.Tensor


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """The scale that maps a largest magnitude ``amax`` to :data:`FP8_MAX` (1 where it is 0)."""
    amax = amax.float()
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


def _quantize_blocks(x: torch.Tensor, block_size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``x [B, H, L, D]`` (fp32) rounded per block of tokens: ``(fp8 [B, H, L, D], scale)``."""
    B, H, L, D = x.shape
    nb = -(-L // block_size)
    blocks = torch.nn.functional.pad(x, (0, 0, 0, nb * block_size - L))
    blocks = blocks.reshape(B, H, nb, block_size * D)
    scale = fp8_scale(blocks.abs().amax(-1))
    fp8 = (blocks / scale[..., None]).to(FP8_DTYPE).view(B, H, nb * block_size, D)[:, :, :L]
    return fp8, scale


def quantize_fp8_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     block_size: int) -> Fp8Qkv:
    """Round Q and K (smoothed) per block of ``block_size`` tokens and V per channel to
    ``float8_e4m3fn``, each block's (or channel's) largest magnitude to :data:`FP8_MAX`."""
    k = k.float()
    q8, q_scale = _quantize_blocks(q.float(), block_size)
    k8, k_scale = _quantize_blocks(k - k.mean(dim=2, keepdim=True), block_size)
    v_scale = fp8_scale(v.abs().amax(dim=2))
    v8 = (v.float() / v_scale[:, :, None, :]).to(FP8_DTYPE)
    return Fp8Qkv(q8, k8, v8, q_scale, k_scale, v_scale)


def _row_max(s: torch.Tensor) -> torch.Tensor:
    """Max over the last dim, keeping it; ``-inf`` where it is empty (nothing kept)."""
    if s.shape[-1] == 0:
        return s.new_full((*s.shape[:-1], 1), float("-inf"))
    return s.amax(-1, keepdim=True)


def _dequantized(x8: torch.Tensor, scale: torch.Tensor, block_size: int) -> torch.Tensor:
    """fp32 ``x8 * scale`` with a per-block ``scale [B, H, nb]``."""
    per_token = scale.repeat_interleave(block_size, dim=2)[:, :, :x8.shape[2], None]
    return x8.float() * per_token


def block_sparse_attention_fp8_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   counts: torch.Tensor, indices: torch.Tensor, scale: float,
                                   block_size: int,
                                   key_valid: Optional[torch.Tensor] = None, *,
                                   round_probs: bool = True) -> torch.Tensor:
    """:func:`block_sparse_attention_ref` on the :func:`quantize_fp8_ref` values of Q, K, V, with
    each row's probabilities ``exp(s - max)`` also rounded to fp8 (times :data:`FP8_MAX`) before
    they weigh V; the row sums use the unrounded probabilities. Output in ``q.dtype``.

    The kernel rounds each tile's probabilities against the row's running max, not its final
    max, so the two differ by that rounding; ``round_probs=False`` leaves the probabilities
    unrounded (the kernel under Triton's interpreter, which cannot round to fp8 correctly)."""
    fp8 = quantize_fp8_ref(q, k, v, block_size)
    qd = _dequantized(fp8.q, fp8.q_scale, block_size)
    kd = _dequantized(fp8.k, fp8.k_scale, block_size)
    out = torch.empty_like(q)
    for lo, hi, keys, values, valid in _kept_blocks(kd, fp8.v.float(), counts, indices,
                                                    block_size, key_valid):
        s = _scores(qd[:, :, lo:hi], keys, scale, valid)
        row_max = _row_max(s)
        p = torch.where(torch.isfinite(row_max), torch.exp(s - row_max), torch.zeros_like(s))
        rows = p.sum(-1, keepdim=True)
        p8 = (p * FP8_MAX).to(FP8_DTYPE).float() if round_probs else p * FP8_MAX
        o = torch.matmul(p8, values) * fp8.v_scale[:, :, None, :]
        out[:, :, lo:hi] = (o / (FP8_MAX * torch.where(rows > 0, rows, 1.0))).to(q.dtype)
    return out
