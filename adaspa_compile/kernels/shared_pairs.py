"""Block-sparse attention by pairs of query blocks that load their common key blocks once.

One program owns query blocks ``2p`` and ``2p + 1`` (two 64-row halves of one (batch, head)) and
walks three ascending lists of key blocks (:func:`shared_pair_lists`):

- ``both``: blocks both halves keep: each K/V block is read once and serves 128 rows (the two
  halves keep separate score tiles and softmax states);
- ``lo`` / ``hi``: blocks only one half keeps: 64-row steps for that half alone.

The work is exactly the kept blocks (programs over the union of the two lists, an earlier
design, paid for the blocks one half does not keep), and the K/V read from L2 shrinks by the
shared blocks. At density 1.0 they take 15-18% less time than 64-row programs on an H100; on
sparse masks they are level or slower (the state of two query blocks spills registers, and three
walks per program break the rotated walk's phase; ``split=True`` is an experiment on that), so
``ops`` uses them for dense masks only (:func:`prefer_pairs`), where the Gluon kernel of
:mod:`.block_sparse_hopper` does not run (on Hopper at head dim 128 it is faster on dense masks
too). The output is that of
:func:`adaspa_compile.reference.block_sparse_attention_ref`.

- dtypes, head dims, key padding, TMA and the rotated walk as in :mod:`.block_sparse`; block size
  64 only.
- caveat: list entries must lie in ``[0, nk)`` and ascend (not checked on the device).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _common
from ._tiles import (MASK_ALL, MASK_NONE, biased_scores, kv_bases, load_block, load_rows,
                     online_softmax_step, rotated_slot, store_normalized, store_state,
                     unbiased_blocks, walk_start, work_item)
from ..blockmask import pair_rows
from .block_sparse import (_launch, check_inputs, check_lists, kernel_inputs, walk_list,
                           work_order)
from .mask_indices import mask_indices

__all__ = ["shared_pair_attention", "shared_pair_lists", "prefer_pairs", "PAIR_MAX_OVERHEAD"]

BLOCK_SIZE = 64
# Largest ``BlockMask.pair_overhead`` (``2 -`` the shared fraction of the kept blocks) at which
# ``ops`` runs pair programs (see ``prefer_pairs``).
PAIR_MAX_OVERHEAD = 1.15


# ----------------------------------------------------------------------------- inner loop
@triton.jit
def _shared_loop(acc_lo, l_lo, m_lo, acc_hi, l_hi, m_hi, q_lo, q_hi, K, V, k_base, v_base,
                 bias_base, idx_base, off_z, off_h, t_start, t_end, rot, offs_n, offs_d,
                 stride_kn, stride_kd, stride_vn, stride_vd, stride_ik, seq_len, qk_scale,
                 HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK: tl.constexpr,
                 USE_TMA: tl.constexpr, APPLY_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
                 ROTATE: tl.constexpr):
    """Key blocks ``indices[t_start:t_end]`` of the ``both`` list, each read once for both
    halves."""
    for t in range(t_start, t_end):
        j = tl.load(idx_base + rotated_slot(t, rot, t_end, ROTATE) * stride_ik)
        k = load_block(K, k_base, off_z, off_h, j, offs_n, offs_d, stride_kn, stride_kd, seq_len,
                       HEAD_DIM, HEAD_DIM_PAD, BLOCK, USE_TMA)
        cols = j * BLOCK + offs_n
        qk_lo = biased_scores(q_lo, k, bias_base, cols, APPLY_BIAS, DOT_PREC)
        qk_hi = biased_scores(q_hi, k, bias_base, cols, APPLY_BIAS, DOT_PREC)
        v = load_block(V, v_base, off_z, off_h, j, offs_n, offs_d, stride_vn, stride_vd, seq_len,
                       HEAD_DIM, HEAD_DIM_PAD, BLOCK, USE_TMA)
        acc_lo, l_lo, m_lo = online_softmax_step(acc_lo, l_lo, m_lo, qk_lo, qk_scale, v, DOT_PREC)
        acc_hi, l_hi, m_hi = online_softmax_step(acc_hi, l_hi, m_hi, qk_hi, qk_scale, v, DOT_PREC)
    return acc_lo, l_lo, m_lo, acc_hi, l_hi, m_hi


# ----------------------------------------------------------------------------- kernel
@triton.jit(do_not_specialize=["rotate_period"])
def _shared_pair_kernel(Q, K, V, Out, Counts, Indices, Order, Bias, State, M, Lsum,
                        stride_qz, stride_qh, stride_qm, stride_qd,
                        stride_kz, stride_kh, stride_kn, stride_kd,
                        stride_vz, stride_vh, stride_vn, stride_vd,
                        stride_oz, stride_oh, stride_om, stride_od,
                        stride_cz, stride_ch, stride_cp, stride_cl,
                        stride_iz, stride_ih, stride_ip, stride_il, stride_ik,
                        H, seq_len, n_pairs, n_k_blocks, qk_scale, rotate_period,
                        HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                        MASK_MODE: tl.constexpr, USE_TMA: tl.constexpr, DOT_PREC: tl.constexpr,
                        ROTATE: tl.constexpr, SHARED_ONLY: tl.constexpr):
    BLOCK: tl.constexpr = 64
    pair, z32, h32 = work_item(Order, n_pairs, H)
    off_z = z32.to(tl.int64)
    off_h = h32.to(tl.int64)
    offs_n = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    rows_lo = pair * (2 * BLOCK) + offs_n
    rows_hi = rows_lo + BLOCK
    q_base = Q + off_z * stride_qz + off_h * stride_qh
    count_base = Counts + off_z * stride_cz + off_h * stride_ch + pair.to(tl.int64) * stride_cp
    idx_both = Indices + off_z * stride_iz + off_h * stride_ih + pair.to(tl.int64) * stride_ip
    k_base, v_base = kv_bases(Q, K, V, off_z, off_h, stride_kz, stride_kh, stride_vz, stride_vh,
                              USE_TMA)
    bias_base = Bias + off_z * n_k_blocks * BLOCK
    o_base = Out + off_z * stride_oz + off_h * stride_oh

    # The walks are ordered so that a half's state is live only while needed: the first half's
    # own blocks, the shared ones (both halves live), the first half stored, the second's own.
    # (``Bias`` stands in for walk_list's bias range, read only under MASK_RANGE, never here.)
    q_lo = load_rows(q_base, rows_lo, offs_d, stride_qm, stride_qd, seq_len, HEAD_DIM,
                     HEAD_DIM_PAD)
    m_lo = tl.full([BLOCK], -1.0e30, dtype=tl.float32)
    l_lo = tl.zeros([BLOCK], dtype=tl.float32)
    acc_lo = tl.zeros([BLOCK, HEAD_DIM_PAD], dtype=tl.float32)
    if not SHARED_ONLY:
        acc_lo, l_lo, m_lo = walk_list(acc_lo, l_lo, m_lo, q_lo, K, V, k_base, v_base, bias_base,
                                       idx_both + stride_il, tl.load(count_base + stride_cl),
                                       Bias, z32, h32, rotate_period, offs_n, offs_d, stride_kn,
                                       stride_kd, stride_vn, stride_vd, stride_ik, seq_len,
                                       qk_scale, HEAD_DIM, HEAD_DIM_PAD, BLOCK, MASK_MODE,
                                       USE_TMA, DOT_PREC, ROTATE)

    q_hi = load_rows(q_base, rows_hi, offs_d, stride_qm, stride_qd, seq_len, HEAD_DIM,
                     HEAD_DIM_PAD)
    m_hi = tl.full([BLOCK], -1.0e30, dtype=tl.float32)
    l_hi = tl.zeros([BLOCK], dtype=tl.float32)
    acc_hi = tl.zeros([BLOCK, HEAD_DIM_PAD], dtype=tl.float32)
    n_both = tl.load(count_base)
    n_clean = unbiased_blocks(n_both, MASK_MODE)
    rot = walk_start(n_both if MASK_MODE == MASK_ALL else n_clean, rotate_period, ROTATE)
    acc_lo, l_lo, m_lo, acc_hi, l_hi, m_hi = _shared_loop(
        acc_lo, l_lo, m_lo, acc_hi, l_hi, m_hi, q_lo, q_hi, K, V, k_base, v_base, bias_base,
        idx_both, z32, h32, 0, n_clean, rot, offs_n, offs_d, stride_kn, stride_kd, stride_vn,
        stride_vd, stride_ik, seq_len, qk_scale, HEAD_DIM, HEAD_DIM_PAD, BLOCK, USE_TMA, False,
        DOT_PREC, ROTATE and MASK_MODE != MASK_ALL)
    if MASK_MODE != MASK_NONE:
        acc_lo, l_lo, m_lo, acc_hi, l_hi, m_hi = _shared_loop(
            acc_lo, l_lo, m_lo, acc_hi, l_hi, m_hi, q_lo, q_hi, K, V, k_base, v_base, bias_base,
            idx_both, z32, h32, n_clean, n_both, rot, offs_n, offs_d, stride_kn, stride_kd,
            stride_vn, stride_vd, stride_ik, seq_len, qk_scale, HEAD_DIM, HEAD_DIM_PAD, BLOCK,
            USE_TMA, True, DOT_PREC, ROTATE and MASK_MODE == MASK_ALL)
    if SHARED_ONLY:  # the own blocks follow in a 64-row launch that resumes this state
        store_state(State, M, Lsum, acc_lo, m_lo, l_lo, z32 * H + h32, rows_lo, offs_d, seq_len,
                    HEAD_DIM_PAD)
        store_state(State, M, Lsum, acc_hi, m_hi, l_hi, z32 * H + h32, rows_hi, offs_d, seq_len,
                    HEAD_DIM_PAD)
    else:
        store_normalized(o_base, acc_lo, l_lo, rows_lo, offs_d, stride_om, stride_od, seq_len,
                         HEAD_DIM, HEAD_DIM_PAD)
        acc_hi, l_hi, m_hi = walk_list(acc_hi, l_hi, m_hi, q_hi, K, V, k_base, v_base, bias_base,
                                       idx_both + 2 * stride_il,
                                       tl.load(count_base + 2 * stride_cl), Bias, z32, h32,
                                       rotate_period, offs_n, offs_d, stride_kn, stride_kd,
                                       stride_vn, stride_vd, stride_ik, seq_len, qk_scale,
                                       HEAD_DIM, HEAD_DIM_PAD, BLOCK, MASK_MODE, USE_TMA,
                                       DOT_PREC, ROTATE)
        store_normalized(o_base, acc_hi, l_hi, rows_hi, offs_d, stride_om, stride_od, seq_len,
                         HEAD_DIM, HEAD_DIM_PAD)


# ----------------------------------------------------------------------------- launcher
def prefer_pairs(pair_overhead: float, head_dim: int, block_size: int, dtype: torch.dtype) -> bool:
    """Whether these pair programs beat 64-row ones (:mod:`.block_sparse`) for a mask with this
    ``pair_overhead`` (``2 - pair_overhead`` of its kept blocks are shared by both rows).

    Measured on an H100 (bf16, TMA, block size 64, ``research/block_sparse_variants.py``,
    benchmarks/RESULTS.md, seventh run): at head dim 128 and density 1.0 (overhead 1.0) they take
    0.82-0.85x the time of 64-row programs; on masks sharing 0.6-0.7 of their blocks they are
    level, sharing 0.25 they are 1.2-1.3x slower (their state for two query blocks spills
    registers); at head dim 64 they are slower. They exist at block size 64, for 16-bit inputs.
    """
    return (head_dim > 64 and block_size == BLOCK_SIZE
            and dtype in (torch.float16, torch.bfloat16) and pair_overhead <= PAIR_MAX_OVERHEAD)


def _split_bits(bits: torch.Tensor) -> torch.Tensor:
    """``[B, H, ceil(nq / 2), 3, nbytes]``: per pair the bits both rows keep, only the first
    keeps, only the second keeps (an odd last row stands alone)."""
    lo, hi = pair_rows(bits)
    return torch.stack([lo & hi, lo & ~hi, hi & ~lo], dim=3)


def shared_pair_lists(bits: torch.Tensor, num_kv_blocks: int,
                      max_kept: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(counts, indices)`` of the pairs' three lists from a mask's packed bits, without a host
    sync: counts int32 ``[B, H, ceil(nq / 2), 3]`` (both, first only, second only), indices
    int32 ``[B, H, ceil(nq / 2), 3, max_kept]``, ascending, 0 past each count."""
    split = _split_bits(bits)
    B, H, n_pairs = split.shape[:3]
    counts, indices = mask_indices(split.reshape(B, H, n_pairs * 3, -1), num_kv_blocks, max_kept)
    return counts.view(B, H, n_pairs, 3), indices.view(B, H, n_pairs, 3, max_kept)


def _check_shared_lists(counts: torch.Tensor, indices: torch.Tensor, q: torch.Tensor,
                        n_pairs: int, nk: int) -> None:
    if counts.dim() != 4 or counts.shape[3] != 3 or indices.dim() != 5 or indices.shape[3] != 3:
        raise ValueError(f"counts must be [B, H, n_pairs, 3] and indices [B, H, n_pairs, 3, "
                         f"max_kept] (shared_pair_lists); got {tuple(counts.shape)} and "
                         f"{tuple(indices.shape)}")
    check_lists(counts[..., 0], indices[:, :, :, 0], n_pairs, nk, q, "ceil(nq / 2)")


def pair_work_order(counts: torch.Tensor, shared_only: bool = False) -> torch.Tensor:
    """Pairs heaviest first (a shared block counts twice; only those with ``shared_only``); ties
    keep their order."""
    return work_order(counts[..., 0] if shared_only
                      else 2 * counts[..., 0] + counts[..., 1] + counts[..., 2])


def own_lists(counts: torch.Tensor, indices: torch.Tensor,
              n_q_blocks: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per query block, the blocks it keeps and its pair partner does not: 64-row lists
    ``[B, H, nq]`` / ``[B, H, nq, max_kept]`` cut from :func:`shared_pair_lists`' output."""
    B, H, n_pairs = counts.shape[:3]
    own_counts = counts[..., 1:].reshape(B, H, 2 * n_pairs)[:, :, :n_q_blocks].contiguous()
    own_indices = indices[:, :, :, 1:].reshape(B, H, 2 * n_pairs, -1)[:, :, :n_q_blocks]
    return own_counts, own_indices.contiguous()


def shared_pair_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          counts: torch.Tensor, indices: torch.Tensor, scale: float,
                          key_valid: Optional[torch.Tensor], *, tma: Optional[bool] = None,
                          out: Optional[torch.Tensor] = None, num_warps: Optional[int] = None,
                          num_stages: Optional[int] = None, rotate_period: Optional[int] = None,
                          split: bool = False) -> torch.Tensor:
    """Block-sparse attention (block size 64) over the pairs' lists of
    :func:`shared_pair_lists`; arguments as :func:`.block_sparse._launch`, except that
    ``rotate_period=None`` means no rotation (it gained nothing here on the H100).

    ``split`` (an experiment, off by default): two launches, each walking one list per program
    so that the rotated walk keeps resident programs in step: pair programs over the shared
    blocks write their fp32 softmax state, then 64-row programs (rotated by default) resume it
    over each row's own blocks. Costs an fp32 ``[B, H, L, D]`` state in memory."""
    check_inputs(q, k, v, scale, BLOCK_SIZE, key_valid, rotate_period)
    B, H, L, D = q.shape
    nb = -(-L // BLOCK_SIZE)
    n_pairs = -(-nb // 2)
    _check_shared_lists(counts, indices, q, n_pairs, nb)
    out = _common.output_like(q, out)
    if L == 0 or B * H == 0:
        return out
    if indices.shape[4] == 0:  # no row keeps anything: every output row is 0
        indices = torch.zeros(B, H, n_pairs, 3, 1, dtype=torch.int32, device=q.device)
    head_dim_pad, k_arg, v_arg, bias = kernel_inputs(q, k, v, BLOCK_SIZE, key_valid, tma)
    default_warps, default_stages = _common.launch_config("sparse_shared", head_dim_pad,
                                                          BLOCK_SIZE)
    state = (torch.empty(B, H, L, head_dim_pad, dtype=torch.float32, device=q.device),
             torch.empty(B, H, L, dtype=torch.float32, device=q.device),
             torch.empty(B, H, L, dtype=torch.float32, device=q.device)) if split else (bias,) * 3
    _shared_pair_kernel[(B * H * n_pairs,)](
        q, k_arg, v_arg, out, counts, indices, pair_work_order(counts, split), bias, *state,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        *counts.stride(), *indices.stride(),
        H, L, n_pairs, nb, _common.log2_scale(scale), rotate_period or 1,
        HEAD_DIM=D, HEAD_DIM_PAD=head_dim_pad,
        MASK_MODE=_common.mask_mode(key_valid, L, BLOCK_SIZE), USE_TMA=k_arg is not k,
        DOT_PREC=_common.dot_precision(q.dtype), ROTATE=bool(rotate_period), SHARED_ONLY=split,
        num_warps=num_warps or default_warps, num_stages=num_stages or default_stages,
    )
    if split:
        _launch(q, k, v, *own_lists(counts, indices, nb), scale, BLOCK_SIZE, key_valid, out,
                use_tma=tma, resume=state)
    return out
