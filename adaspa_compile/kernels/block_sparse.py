"""Block-sparse attention: each query block attends only its kept key blocks.

One program owns one (batch, head, query block) and walks
``indices[b, h, i, :counts[b, h, i]]`` (as produced by
:meth:`adaspa_compile.blockmask.BlockMask.to_indices`); counts differ per head and per row
(head-adaptive tiers, text sink). Programs are launched heaviest row first (a stable sort of the
counts), so the long rows start early and the short ones fill the tail; rows of equal length
keep their (batch, head, block) order, which keeps a head's K/V hot in L2. Semantics are those of
:func:`adaspa_compile.reference.block_sparse_attention_ref`.

- dtypes: fp16 / bf16 (fp32 accumulation) or fp32 (IEEE fp32 dots; the interpreter path).
- head dims 1..128; 64 and 128 are tuned, others are padded to a power of two (>= 16) by masks.
- block sizes 64 and 128; the kernel's tiles are the mask's blocks (``BLOCK_M = BLOCK_N``).
- a row whose kept keys are all padded (or that keeps no block) gets output 0.
- caveat: index entries below the count must lie in ``[0, nk)`` and ascend (as
  ``BlockMask.to_indices`` gives them); they are not checked on the device (that would need a
  host sync). Without key padding, a ragged last key block is masked only in the last slot.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common
from ._tiles import MASK_ALL, MASK_LAST, load_rows, online_softmax_step, scaled_scores, store_rows

__all__ = ["block_sparse_attention"]


# ----------------------------------------------------------------------------- inner loop
@triton.jit
def _sparse_loop(acc, l_i, m_i, q, k_base, v_base, bias_base, idx_base, t_start, t_end, offs_n,
                 offs_d, stride_kn, stride_kd, stride_vn, stride_vd, stride_ik, seq_len, qk_scale,
                 HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                 APPLY_BIAS: tl.constexpr, DOT_PREC: tl.constexpr):
    """Kept blocks ``indices[t_start:t_end]`` of one row."""
    for t in range(t_start, t_end):
        j = tl.load(idx_base + t * stride_ik)
        cols = j * BLOCK_SIZE + offs_n
        k = load_rows(k_base, cols, offs_d, stride_kn, stride_kd, seq_len, HEAD_DIM, HEAD_DIM_PAD)
        qk = scaled_scores(q, k, bias_base, cols, qk_scale, APPLY_BIAS, DOT_PREC)
        v = load_rows(v_base, cols, offs_d, stride_vn, stride_vd, seq_len, HEAD_DIM, HEAD_DIM_PAD)
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, qk, v, DOT_PREC)
    return acc, l_i, m_i


# ----------------------------------------------------------------------------- kernel
@triton.jit
def _block_sparse_kernel(Q, K, V, Out, Counts, Indices, Order, Bias,
                         stride_qz, stride_qh, stride_qm, stride_qd,
                         stride_kz, stride_kh, stride_kn, stride_kd,
                         stride_vz, stride_vh, stride_vn, stride_vd,
                         stride_oz, stride_oh, stride_om, stride_od,
                         stride_cz, stride_ch, stride_cm,
                         stride_iz, stride_ih, stride_im, stride_ik,
                         H, seq_len, n_q_blocks, n_k_blocks, qk_scale,
                         HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, MASK_MODE: tl.constexpr,
                         DOT_PREC: tl.constexpr):
    item = tl.load(Order + tl.program_id(0))
    q_block = item % n_q_blocks
    pid_zh = item // n_q_blocks
    off_z = (pid_zh // H).to(tl.int64)
    off_h = (pid_zh % H).to(tl.int64)

    offs_m = q_block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    offs_n = tl.arange(0, BLOCK_SIZE)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    count = tl.load(Counts + off_z * stride_cz + off_h * stride_ch + q_block * stride_cm)
    idx_base = Indices + off_z * stride_iz + off_h * stride_ih + q_block.to(tl.int64) * stride_im

    q = load_rows(Q + off_z * stride_qz + off_h * stride_qh, offs_m, offs_d, stride_qm,
                  stride_qd, seq_len, HEAD_DIM, HEAD_DIM_PAD)
    m_i = tl.full([BLOCK_SIZE], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    acc = tl.zeros([BLOCK_SIZE, HEAD_DIM_PAD], dtype=tl.float32)
    k_base = K + off_z * stride_kz + off_h * stride_kh
    v_base = V + off_z * stride_vz + off_h * stride_vh
    bias_base = Bias + off_z * n_k_blocks * BLOCK_SIZE
    if MASK_MODE == MASK_ALL:
        acc, l_i, m_i = _sparse_loop(acc, l_i, m_i, q, k_base, v_base, bias_base, idx_base, 0,
                                     count, offs_n, offs_d, stride_kn, stride_kd, stride_vn,
                                     stride_vd, stride_ik, seq_len, qk_scale, HEAD_DIM,
                                     HEAD_DIM_PAD, BLOCK_SIZE, True, DOT_PREC)
    else:
        # Ascending lists put the ragged last key block, if kept, in the last slot.
        n_clean = tl.maximum(count - 1, 0) if MASK_MODE == MASK_LAST else count
        acc, l_i, m_i = _sparse_loop(acc, l_i, m_i, q, k_base, v_base, bias_base, idx_base, 0,
                                     n_clean, offs_n, offs_d, stride_kn, stride_kd, stride_vn,
                                     stride_vd, stride_ik, seq_len, qk_scale, HEAD_DIM,
                                     HEAD_DIM_PAD, BLOCK_SIZE, False, DOT_PREC)
        if MASK_MODE == MASK_LAST:
            acc, l_i, m_i = _sparse_loop(acc, l_i, m_i, q, k_base, v_base, bias_base, idx_base,
                                         n_clean, count, offs_n, offs_d, stride_kn, stride_kd,
                                         stride_vn, stride_vd, stride_ik, seq_len, qk_scale,
                                         HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, True, DOT_PREC)
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    store_rows(Out + off_z * stride_oz + off_h * stride_oh, out.to(Out.dtype.element_ty), offs_m,
               offs_d, stride_om, stride_od, seq_len, HEAD_DIM, HEAD_DIM_PAD)


# ----------------------------------------------------------------------------- launcher
def _check_indices(counts: torch.Tensor, indices: torch.Tensor, q: torch.Tensor,
                   block_size: int) -> None:
    B, H, L, _ = q.shape
    nb = -(-L // block_size)
    if counts.dtype not in (torch.int32, torch.int64) or tuple(counts.shape) != (B, H, nb):
        raise ValueError(f"counts must be int32 [B, H, nq] = {(B, H, nb)} for L={L}, "
                         f"block_size={block_size}; got {counts.dtype} {tuple(counts.shape)}")
    if indices.dtype not in (torch.int32, torch.int64) or indices.dim() != 4 \
            or tuple(indices.shape[:3]) != (B, H, nb) or indices.shape[3] > nb:
        raise ValueError(f"indices must be int32 [B, H, nq, max_kept] with nq={nb}, "
                         f"max_kept <= {nb}; got {indices.dtype} {tuple(indices.shape)}")
    if counts.device != q.device or indices.device != q.device:
        raise ValueError(f"counts and indices must be on {q.device}")


def work_order(counts: torch.Tensor) -> torch.Tensor:
    """Flattened (b, h, i) items, heaviest first; ties keep their order (a stable sort)."""
    _, order = torch.sort(counts.reshape(-1), descending=True, stable=True)
    return order.to(torch.int32)


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, counts: torch.Tensor,
            indices: torch.Tensor, scale: float, block_size: int,
            key_valid: Optional[torch.Tensor], out: Optional[torch.Tensor],
            order: Optional[torch.Tensor] = None, num_warps: Optional[int] = None,
            num_stages: Optional[int] = None) -> torch.Tensor:
    _common.check_qk(q, k, block_size, v)
    _common.check_key_valid(key_valid, q)
    _check_indices(counts, indices, q, block_size)
    B, H, L, D = q.shape
    _common.check_out("out", out, tuple(q.shape), q.dtype, q.device)
    if out is None:
        out = torch.empty_like(q)
    nb = -(-L // block_size)
    if L == 0 or B * H == 0:
        return out
    if indices.shape[3] == 0:  # no row keeps anything: every output row is 0
        indices = torch.zeros(B, H, nb, 1, dtype=torch.int32, device=q.device)
    if order is None:
        order = work_order(counts)
    head_dim_pad = _common.padded_head_dim(D)
    bias = _common.key_bias(key_valid, B, L, block_size, q.device)
    default_warps, default_stages = _common.launch_config("sparse", head_dim_pad, block_size)
    grid = (B * H * nb,)
    _block_sparse_kernel[grid](
        q, k, v, out, counts, indices, order, bias,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        counts.stride(0), counts.stride(1), counts.stride(2),
        indices.stride(0), indices.stride(1), indices.stride(2), indices.stride(3),
        H, L, nb, nb, _common.log2_scale(scale),
        HEAD_DIM=D, HEAD_DIM_PAD=head_dim_pad, BLOCK_SIZE=block_size,
        MASK_MODE=_common.mask_mode(key_valid, L, block_size), DOT_PREC=_common.dot_precision(q.dtype),
        num_warps=num_warps or default_warps,
        num_stages=num_stages or default_stages,
    )
    return out


# ----------------------------------------------------------------------------- public
def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           counts: torch.Tensor, indices: torch.Tensor, scale: float,
                           block_size: int, key_valid: Optional[torch.Tensor], *,
                           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of each query block over ``indices[b, h, i, :counts[b, h, i]]``.

    Args:
        q, k, v: ``[B, H, L, D]``, one dtype among fp16 / bf16 / fp32, any strides.
        counts: int32 ``[B, H, nq]``; indices: int32 ``[B, H, nq, max_kept]``, ascending key
            blocks in ``[0, nk)`` below each count.
        scale: softmax scale.
        block_size: 64 or 128.
        key_valid: ``None`` or bool ``[B, L]`` (True = attend).
        out: optional preallocated output (tests poison it); default ``torch.empty_like(q)``.
    """
    return _launch(q, k, v, counts, indices, scale, block_size, key_valid, out)
