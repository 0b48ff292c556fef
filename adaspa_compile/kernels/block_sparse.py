"""Block-sparse attention in Triton: each query block attends only its kept key blocks.

One program owns one query block of one (batch, head) and walks its ascending list of key
blocks ``indices[b, h, i, :counts[b, h, i]]``. The output is exactly that of
:func:`adaspa_compile.reference.block_sparse_attention_ref`; the conventions are in
:mod:`adaspa_compile.kernels`.

Programs are launched heaviest list first (:func:`._common.work_order`), so the long lists start
early and the short ones fill the tail; with a ``rotate_period`` the programs resident together
start their walks in phase (:func:`._tiles.walk_start`). Which options a call gets, and whether
the Gluon kernel of :mod:`.block_sparse_hopper` runs instead, is decided in :mod:`.dispatch`.

Caveat: index entries below the count must lie in ``[0, nk)`` and ascend (as
``BlockMask.to_indices`` and ``mask_to_indices`` give them); they are not checked on the device
(that would need a host sync).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import reference
from . import _common
from ._tiles import (MASK_ALL, MASK_NONE, MASK_RANGE, biased_scores, load_block, load_rows,
                     load_value_block, online_softmax_step, online_softmax_step_fp8,
                     slots_below, store_rows, unbiased_blocks, walk_start)
from .dispatch import FP8_HEAD_DIMS, LaunchOptions
from .fp8_operands import Fp8Operands, quantize_fp8

__all__ = ["block_sparse_triton", "block_sparse_fp8"]

# The FP8 kernel's probabilities are taken times 448 (the largest FP8 value): 2 ** this.
LOG2_P_SCALE = tl.constexpr(math.log2(reference.FP8_MAX))



@triton.jit
def sparse_loop(acc, l_i, m_i, q, K, V, k_base, v_base, bias_base, idx_base, ks_base, off_z,
                off_h, t_start, t_end, rot, gap_at, gap, offs_n, offs_d, stride_kn, stride_kd,
                stride_vn, stride_vd, stride_ik, seq_len, qk_scale, HEAD_DIM: tl.constexpr,
                HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, USE_TMA: tl.constexpr,
                APPLY_BIAS: tl.constexpr, DOT_PREC: tl.constexpr, ROTATE: tl.constexpr,
                GAP: tl.constexpr, FP8: tl.constexpr, ROUND_P: tl.constexpr):
    """Key blocks ``indices[t_start:t_end]`` of one list; with ``ROTATE`` (and ``t_start`` 0)
    in the order ``rot, rot + 1, ..., t_end - 1, 0, ..., rot - 1``; with ``GAP``, slots from
    ``gap_at`` on are read ``gap`` further on (skipping the slots walked with the bias). With
    ``FP8``, key block ``j``'s scores are scaled by its scale ``ks_base[j]`` too."""
    for t in range(t_start, t_end):
        slot = t
        if ROTATE:
            slot = t + rot
            slot = tl.where(slot >= t_end, slot - t_end, slot)
        if GAP:
            slot = tl.where(slot >= gap_at, slot + gap, slot)
        j = tl.load(idx_base + slot * stride_ik)
        k = load_block(K, k_base, off_z, off_h, j, offs_n, offs_d, stride_kn, stride_kd, seq_len,
                       HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, USE_TMA)
        qk = biased_scores(q, k, bias_base, j * BLOCK_SIZE + offs_n, APPLY_BIAS, DOT_PREC)
        v = load_value_block(V, v_base, off_z, off_h, j, offs_n, offs_d, stride_vn, stride_vd,
                             seq_len, HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, USE_TMA, FP8)
        if FP8:
            acc, l_i, m_i = online_softmax_step_fp8(acc, l_i, m_i, qk,
                                                    qk_scale * tl.load(ks_base + j), v,
                                                    LOG2_P_SCALE, ROUND_P)
        else:
            acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, qk, qk_scale, v, DOT_PREC)
    return acc, l_i, m_i


@triton.jit
def walk_list(acc, l_i, m_i, q, K, V, k_base, v_base, bias_base, idx_base, ks_base, count,
              bias_range, off_z, off_h, rotate_period, offs_n, offs_d, stride_kn, stride_kd,
              stride_vn, stride_vd, stride_ik, seq_len, qk_scale, HEAD_DIM: tl.constexpr,
              HEAD_DIM_PAD: tl.constexpr, BLOCK: tl.constexpr, MASK_MODE: tl.constexpr,
              USE_TMA: tl.constexpr, DOT_PREC: tl.constexpr, ROTATE: tl.constexpr,
              FP8: tl.constexpr, ROUND_P: tl.constexpr):
    """A whole list of ``count`` key blocks: the clean ones, then those needing the bias. With
    ``ROTATE`` the walk that starts at slot 0 is rotated (:func:`walk_start`): the clean slots,
    or under ``MASK_ALL`` the whole list. ``bias_range`` (``MASK_RANGE`` only): this batch's
    ``[lo, hi)`` key-block range needing the bias."""
    if MASK_MODE == MASK_RANGE:
        s0, s1 = slots_below(idx_base, count, stride_ik, tl.load(bias_range),
                             tl.load(bias_range + 1), 128)
        n_clean = count - (s1 - s0)
        rot = walk_start(n_clean, rotate_period, ROTATE)
        acc, l_i, m_i = sparse_loop(acc, l_i, m_i, q, K, V, k_base, v_base, bias_base, idx_base,
                                    ks_base, off_z, off_h, 0, n_clean, rot, s0, s1 - s0, offs_n,
                                    offs_d, stride_kn, stride_kd, stride_vn, stride_vd, stride_ik,
                                    seq_len, qk_scale, HEAD_DIM, HEAD_DIM_PAD, BLOCK, USE_TMA,
                                    False, DOT_PREC, ROTATE, True, FP8, ROUND_P)
        acc, l_i, m_i = sparse_loop(acc, l_i, m_i, q, K, V, k_base, v_base, bias_base, idx_base,
                                    ks_base, off_z, off_h, s0, s1, 0, 0, 0, offs_n, offs_d,
                                    stride_kn, stride_kd, stride_vn, stride_vd, stride_ik, seq_len,
                                    qk_scale, HEAD_DIM, HEAD_DIM_PAD, BLOCK, USE_TMA, True,
                                    DOT_PREC, False, False, FP8, ROUND_P)
    else:
        n_clean = unbiased_blocks(count, MASK_MODE)
        rot = walk_start(count if MASK_MODE == MASK_ALL else n_clean, rotate_period, ROTATE)
        acc, l_i, m_i = sparse_loop(acc, l_i, m_i, q, K, V, k_base, v_base, bias_base, idx_base,
                                    ks_base, off_z, off_h, 0, n_clean, rot, 0, 0, offs_n, offs_d,
                                    stride_kn, stride_kd, stride_vn, stride_vd, stride_ik,
                                    seq_len, qk_scale, HEAD_DIM, HEAD_DIM_PAD, BLOCK, USE_TMA,
                                    False, DOT_PREC, ROTATE and MASK_MODE != MASK_ALL, False,
                                    FP8, ROUND_P)
        if MASK_MODE != MASK_NONE:
            acc, l_i, m_i = sparse_loop(acc, l_i, m_i, q, K, V, k_base, v_base, bias_base,
                                        idx_base, ks_base, off_z, off_h, n_clean, count, rot,
                                        0, 0, offs_n, offs_d, stride_kn, stride_kd, stride_vn,
                                        stride_vd, stride_ik, seq_len, qk_scale, HEAD_DIM,
                                        HEAD_DIM_PAD, BLOCK, USE_TMA, True, DOT_PREC,
                                        ROTATE and MASK_MODE == MASK_ALL, False, FP8, ROUND_P)
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["rotate_period"])
def _block_sparse_kernel(Q, K, V, Out, Counts, Indices, Order, Bias, BiasRange, QScale, KScale,
                         VScale,
                         stride_qz, stride_qh, stride_qm, stride_qd,
                         stride_kz, stride_kh, stride_kn, stride_kd,
                         stride_vz, stride_vh, stride_vn, stride_vd,
                         stride_oz, stride_oh, stride_om, stride_od,
                         stride_cz, stride_ch, stride_cm,
                         stride_iz, stride_ih, stride_im, stride_ik,
                         H, seq_len, n_lists, n_k_blocks, qk_scale, rotate_period,
                         HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, MASK_MODE: tl.constexpr, USE_TMA: tl.constexpr,
                         DOT_PREC: tl.constexpr, ROTATE: tl.constexpr, FP8: tl.constexpr,
                         ROUND_P: tl.constexpr):
    flat = tl.load(Order + tl.program_id(0))  # (batch * H + head) * n_lists + list
    zh = flat // n_lists
    lst = flat % n_lists
    z32 = zh // H
    h32 = zh % H
    off_z = z32.to(tl.int64)
    off_h = h32.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_SIZE)
    offs_m = lst * BLOCK_SIZE + offs_n
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    count = tl.load(Counts + off_z * stride_cz + off_h * stride_ch + lst * stride_cm)
    idx_base = Indices + off_z * stride_iz + off_h * stride_ih + lst.to(tl.int64) * stride_im

    q = load_rows(Q + off_z * stride_qz + off_h * stride_qh, offs_m, offs_d, stride_qm,
                  stride_qd, seq_len, HEAD_DIM, HEAD_DIM_PAD)
    m_i = tl.full([BLOCK_SIZE], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
    acc = tl.zeros([BLOCK_SIZE, HEAD_DIM_PAD], dtype=tl.float32)
    # With TMA, K and V are descriptors that carry their addresses: the bases are never read.
    k_base = Q if USE_TMA else K + off_z * stride_kz + off_h * stride_kh
    v_base = Q if USE_TMA else V + off_z * stride_vz + off_h * stride_vh
    bias_base = Bias + off_z * n_k_blocks * BLOCK_SIZE
    ks_base = KScale + zh.to(tl.int64) * n_k_blocks
    if FP8:  # Q's block scale goes into the score scale
        qk_scale = qk_scale * tl.load(QScale + zh.to(tl.int64) * n_lists + lst)
    acc, l_i, m_i = walk_list(acc, l_i, m_i, q, K, V, k_base, v_base, bias_base, idx_base,
                              ks_base, count, BiasRange + off_z * 2, z32, h32, rotate_period,
                              offs_n, offs_d,
                              stride_kn, stride_kd, stride_vn, stride_vd, stride_ik, seq_len,
                              qk_scale, HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, MASK_MODE, USE_TMA,
                              DOT_PREC, ROTATE, FP8, ROUND_P)
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # rows that attended nothing get 0
    if FP8:  # V's channel scales
        v_scale = tl.load(VScale + zh.to(tl.int64) * HEAD_DIM + offs_d, mask=offs_d < HEAD_DIM,
                          other=0.0)
        out = out * v_scale[None, :]
    store_rows(Out + off_z * stride_oz + off_h * stride_oh, out.to(Out.dtype.element_ty), offs_m,
               offs_d, stride_om, stride_od, seq_len, HEAD_DIM, HEAD_DIM_PAD)


def block_sparse_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, counts: torch.Tensor,
                        indices: torch.Tensor, scale: float, block_size: int,
                        key_valid: Optional[torch.Tensor], options: LaunchOptions, *,
                        out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of each query block over ``indices[b, h, i, :counts[b, h, i]]``.

    Args:
        q, k, v: ``[B, H, L, D]``, one dtype among fp16 / bf16 / fp32, any strides.
        counts: int32 ``[B, H, nq]``; indices: int32 ``[B, H, nq, max_kept]``, ascending key
            blocks in ``[0, nk)`` below each count.
        scale: softmax scale (positive).
        block_size: 64 or 128.
        key_valid: ``None`` or bool ``[B, L]`` (True = attend).
        options: from :func:`.dispatch.block_sparse_plan` (or chosen by hand): warps, stages,
            ``tma`` (where the strides allow it), ``rotate_period``, ``bias_range``.
        out: optional preallocated output (tests poison it); default ``torch.empty_like(q)``.
    """
    _common.check_attention_inputs(q, k, v, scale, block_size, key_valid)
    out, indices, _ = _common.launch_lists(q, counts, indices, block_size, out)
    if q.shape[2] == 0 or q.shape[0] * q.shape[1] == 0:
        return out
    descs = None
    if options.tma:
        descs = _common.tma_descriptors((k, v), block_size, _common.padded_head_dim(q.shape[3]))
    _launch(q, k, v, descs, out, counts, indices, scale, block_size, key_valid, options)
    return out


def block_sparse_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, counts: torch.Tensor,
                     indices: torch.Tensor, scale: float, block_size: int,
                     key_valid: Optional[torch.Tensor], options: LaunchOptions, *,
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`block_sparse_triton` in FP8: ``q, k, v`` are rounded by :func:`.quantize_fp8`
    (per block, K smoothed; V per channel) and the probabilities to FP8 before ``p @ v``, the
    values of :func:`adaspa_compile.reference.block_sparse_attention_fp8_ref`. Head dims 64 and
    128; the output has ``q``'s dtype. On the GPU this needs FP8 tensor cores (sm89+)."""
    _common.check_attention_inputs(q, k, v, scale, block_size, key_valid)
    if q.shape[-1] not in FP8_HEAD_DIMS:
        raise ValueError(f"the FP8 kernel runs head dims {FP8_HEAD_DIMS}, got {q.shape[-1]}")
    out, indices, _ = _common.launch_lists(q, counts, indices, block_size, out)
    if q.shape[2] == 0 or q.shape[0] * q.shape[1] == 0:
        return out
    fp8 = quantize_fp8(q, k, v, block_size)
    descs = None
    if options.tma:
        descs = _common.tma_descriptors((fp8.k,), block_size, q.shape[3])
        v_desc = _common.tma_descriptors((fp8.v_t,), q.shape[3], block_size)
        descs = descs + v_desc if descs is not None and v_desc is not None else None
    _launch(fp8.q, fp8.k, fp8.v_t.transpose(2, 3), descs, out, counts, indices, scale,
            block_size, key_valid, options, fp8, seq_len=q.shape[2])
    return out


def _launch(q, k, v, descs, out, counts, indices, scale: float, block_size: int,
            key_valid: Optional[torch.Tensor], options: LaunchOptions,
            fp8: Optional[Fp8Operands] = None, seq_len: Optional[int] = None) -> None:
    """One program per query block, heaviest lists first; K and V through ``descs`` (tensor
    descriptors) where given. With ``fp8`` the operands are FP8 and scaled by its scales."""
    B, H, _, D = q.shape
    L = q.shape[2] if seq_len is None else seq_len
    nb = counts.shape[2]
    k_arg, v_arg = descs if descs is not None else (k, v)
    bias = _common.key_bias(key_valid, B, L, block_size, q.device)
    mask_mode = _common.mask_mode(key_valid, L, block_size)
    block_range = bias  # never read unless MASK_RANGE
    if options.bias_range and key_valid is not None:
        mask_mode, block_range = _common.MASK_RANGE, _common.bias_block_range(bias, block_size)
    # Without fp8 the scale pointers are never read.
    scales = (fp8.q_scale, fp8.k_scale, fp8.v_scale) if fp8 is not None else (bias,) * 3
    _block_sparse_kernel[(B * H * nb,)](
        q, k_arg, v_arg, out, counts, indices, _common.work_order(counts), bias, block_range,
        *scales,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        counts.stride(0), counts.stride(1), counts.stride(2),
        indices.stride(0), indices.stride(1), indices.stride(2), indices.stride(3),
        H, L, nb, nb, _common.log2_scale(scale), options.rotate_period or 1,
        HEAD_DIM=D, HEAD_DIM_PAD=_common.padded_head_dim(D), BLOCK_SIZE=block_size,
        MASK_MODE=mask_mode, USE_TMA=descs is not None,
        DOT_PREC=_common.dot_precision(q.dtype), ROTATE=options.rotate_period != 0,
        FP8=fp8 is not None, ROUND_P=not _common.interpreting(),
        num_warps=options.num_warps, num_stages=options.num_stages, **options.compiler_options(),
    )
