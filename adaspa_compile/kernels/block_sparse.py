"""Block-sparse attention: each query block attends only its kept key blocks.

One program owns ``Q_BLOCKS`` consecutive query blocks of one (batch, head) — one block, or a
pair, so the tensor cores see 128-row tiles with 64-blocks — and walks one ascending list of key
blocks: the row's own ``indices[b, h, i, :counts[b, h, i]]``, or for a pair the union of the two
rows' lists, in which each query block masks out the key blocks it does not keep (read from the
mask's packed bits). The masked half of a tile costs compute but never changes the result: the
output is exactly that of :func:`adaspa_compile.reference.block_sparse_attention_ref`.

Programs are launched heaviest list first (a stable sort of the counts), so the long lists start
early and the short ones fill the tail; lists of equal length keep their (batch, head, block)
order, which keeps a head's K/V hot in L2. On a GPU, 64-row programs also walk their lists
*rotated* (:func:`default_rotate_period`): program ``p`` starts at the fraction ``(p mod P) / P``
of its list and wraps around, so the programs resident together read the same stretch of K/V
instead of all of it (on random masks a head's K/V exceed L2: the HunyuanVideo mask took 21%
less time on an H100).

- dtypes: fp16 / bf16 (fp32 accumulation) or fp32 (IEEE fp32 dots; the interpreter path).
- head dims 1..128; 64 and 128 are tuned, others are padded to a power of two (>= 16) by masks.
- block sizes 64 and 128; key tiles are the mask's blocks.
- K and V are read through tensor descriptors (TMA) on Hopper (sm90+) for bf16 / fp16 with head
  dim 64 or 128, when their strides allow it (10-20% faster on an H100 than pointer loads).
- 128-row pair programs are used by ``ops.sparse_forward`` only where :func:`prefer_pairs` says
  (head dim 128, union lists adding at most ``PAIR_MAX_OVERHEAD`` work: dense masks, as in
  recall mode); at density 1.0 they are 16-19% faster than 64-row ones.
- a row whose kept keys are all padded (or that keeps no block) gets output 0.
- caveat: index entries below the count must lie in ``[0, nk)`` and ascend (as
  ``BlockMask.to_indices`` and ``mask_indices`` give them); they are not checked on the device
  (that would need a host sync). Without key padding, a ragged last key block is masked only in
  the last slot.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..blockmask import pair_union
from . import _common
from ._tiles import (MASK_ALL, MASK_NONE, biased_scores, load_block, load_rows,
                     online_softmax_step, rotated_slot, store_rows, unbiased_blocks)
from .mask_indices import mask_indices

__all__ = ["block_sparse_attention", "pair_lists", "prefer_pairs", "PAIR_MAX_OVERHEAD"]

# Largest ``BlockMask.pair_overhead`` at which pair programs are used (see ``prefer_pairs``).
PAIR_MAX_OVERHEAD = 1.15


# ----------------------------------------------------------------------------- inner loop
@triton.jit
def _pair_row_bias(bits_lo, bits_hi, has_hi, j, offs_local, BLOCK_SIZE: tl.constexpr):
    """Per row of a pair's tile: ``0`` where its query block keeps key block ``j``, else ``-inf``."""
    keep_lo = (tl.load(bits_lo + j // 8).to(tl.int32) >> (j % 8)) & 1
    keep_hi = (tl.load(bits_hi + j // 8, mask=has_hi, other=0).to(tl.int32) >> (j % 8)) & 1
    keep = tl.where(offs_local < BLOCK_SIZE, keep_lo, keep_hi)
    return tl.where(keep != 0, 0.0, float("-inf"))


@triton.jit
def _sparse_loop(acc, l_i, m_i, q, K, V, k_base, v_base, bias_base, idx_base, bits_lo, bits_hi,
                 has_hi, off_z, off_h, t_start, t_end, rot, offs_local, offs_n, offs_d,
                 stride_kn, stride_kd, stride_vn, stride_vd, stride_ik, seq_len, qk_scale,
                 HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                 Q_BLOCKS: tl.constexpr, USE_TMA: tl.constexpr, APPLY_BIAS: tl.constexpr,
                 DOT_PREC: tl.constexpr, ROTATE: tl.constexpr):
    """Key blocks ``indices[t_start:t_end]`` of one list; with ``ROTATE`` (and ``t_start`` 0)
    in the order ``rot, rot + 1, ..., t_end - 1, 0, ..., rot - 1``."""
    for t in range(t_start, t_end):
        j = tl.load(idx_base + rotated_slot(t, rot, t_end, ROTATE) * stride_ik)
        k = load_block(K, k_base, off_z, off_h, j, offs_n, offs_d, stride_kn, stride_kd, seq_len,
                       HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, USE_TMA)
        qk = biased_scores(q, k, bias_base, j * BLOCK_SIZE + offs_n, APPLY_BIAS, DOT_PREC)
        if Q_BLOCKS == 2:
            # Scaled before the row bias: with the unscaled form the sm_90 code of the pair tile
            # waits between its two halves' score wgmmas, and ran 1-3% slower on the H100.
            qk = qk * qk_scale + _pair_row_bias(bits_lo, bits_hi, has_hi, j, offs_local,
                                                BLOCK_SIZE)[:, None]
            step_scale = 1.0
        else:
            step_scale = qk_scale
        v = load_block(V, v_base, off_z, off_h, j, offs_n, offs_d, stride_vn, stride_vd, seq_len,
                       HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, USE_TMA)
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, qk, step_scale, v, DOT_PREC)
    return acc, l_i, m_i


# ----------------------------------------------------------------------------- kernel
@triton.jit(do_not_specialize=["rotate_period"])
def _block_sparse_kernel(Q, K, V, Out, Counts, Indices, Order, Bias, Bits,
                         stride_qz, stride_qh, stride_qm, stride_qd,
                         stride_kz, stride_kh, stride_kn, stride_kd,
                         stride_vz, stride_vh, stride_vn, stride_vd,
                         stride_oz, stride_oh, stride_om, stride_od,
                         stride_cz, stride_ch, stride_cm,
                         stride_iz, stride_ih, stride_im, stride_ik,
                         stride_bz, stride_bh, stride_bm,
                         H, seq_len, n_q_blocks, n_lists, n_k_blocks, qk_scale, rotate_period,
                         HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, Q_BLOCKS: tl.constexpr,
                         MASK_MODE: tl.constexpr, USE_TMA: tl.constexpr,
                         DOT_PREC: tl.constexpr, ROTATE: tl.constexpr):
    item = tl.load(Order + tl.program_id(0))
    lst = item % n_lists
    pid_zh = item // n_lists
    z32 = pid_zh // H
    h32 = pid_zh % H
    off_z = z32.to(tl.int64)
    off_h = h32.to(tl.int64)
    q_block = lst * Q_BLOCKS

    ROWS: tl.constexpr = BLOCK_SIZE * Q_BLOCKS
    offs_local = tl.arange(0, ROWS)
    offs_m = q_block * BLOCK_SIZE + offs_local
    offs_n = tl.arange(0, BLOCK_SIZE)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    count = tl.load(Counts + off_z * stride_cz + off_h * stride_ch + lst * stride_cm)
    idx_base = Indices + off_z * stride_iz + off_h * stride_ih + lst.to(tl.int64) * stride_im
    bits_lo = Bits + off_z * stride_bz + off_h * stride_bh + q_block.to(tl.int64) * stride_bm
    bits_hi = bits_lo + stride_bm
    has_hi = q_block + 1 < n_q_blocks

    q = load_rows(Q + off_z * stride_qz + off_h * stride_qh, offs_m, offs_d, stride_qm,
                  stride_qd, seq_len, HEAD_DIM, HEAD_DIM_PAD)
    m_i = tl.full([ROWS], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM_PAD], dtype=tl.float32)
    if USE_TMA:
        k_base = Q  # unused: the descriptors carry the addresses
        v_base = Q
    else:
        k_base = K + off_z * stride_kz + off_h * stride_kh
        v_base = V + off_z * stride_vz + off_h * stride_vh
    bias_base = Bias + off_z * n_k_blocks * BLOCK_SIZE
    # Ascending lists put the ragged last key block, if kept, in the last slot.
    n_clean = unbiased_blocks(count, MASK_MODE)
    rot = 0
    if ROTATE:
        # Program p starts the walk that begins at slot 0 (the clean slots, or with key padding
        # the whole list) at the fraction (p mod P) / P of it: programs launched P apart start
        # in phase, so with P programs resident they all read the same part of K/V together.
        n_walk = count if MASK_MODE == MASK_ALL else n_clean
        rot = ((tl.program_id(0) % rotate_period) * n_walk) // rotate_period
    acc, l_i, m_i = _sparse_loop(acc, l_i, m_i, q, K, V, k_base, v_base, bias_base, idx_base,
                                 bits_lo, bits_hi, has_hi, z32, h32, 0, n_clean, rot, offs_local,
                                 offs_n, offs_d, stride_kn, stride_kd, stride_vn, stride_vd,
                                 stride_ik, seq_len, qk_scale, HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE,
                                 Q_BLOCKS, USE_TMA, False, DOT_PREC,
                                 ROTATE and MASK_MODE != MASK_ALL)
    if MASK_MODE != MASK_NONE:
        acc, l_i, m_i = _sparse_loop(acc, l_i, m_i, q, K, V, k_base, v_base, bias_base, idx_base,
                                     bits_lo, bits_hi, has_hi, z32, h32, n_clean, count, rot,
                                     offs_local, offs_n, offs_d, stride_kn, stride_kd, stride_vn,
                                     stride_vd, stride_ik, seq_len, qk_scale, HEAD_DIM,
                                     HEAD_DIM_PAD, BLOCK_SIZE, Q_BLOCKS, USE_TMA, True, DOT_PREC,
                                     ROTATE and MASK_MODE == MASK_ALL)
    out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    store_rows(Out + off_z * stride_oz + off_h * stride_oh, out.to(Out.dtype.element_ty), offs_m,
               offs_d, stride_om, stride_od, seq_len, HEAD_DIM, HEAD_DIM_PAD)


# ----------------------------------------------------------------------------- launcher
def _check_lists(counts: torch.Tensor, indices: torch.Tensor, n_lists: int, nk: int,
                 q: torch.Tensor, what: str) -> None:
    B, H = q.shape[:2]
    if counts.dtype not in (torch.int32, torch.int64) or tuple(counts.shape) != (B, H, n_lists):
        raise ValueError(f"counts must be int32 [B, H, {what}] = {(B, H, n_lists)}; got "
                         f"{counts.dtype} {tuple(counts.shape)}")
    if indices.dtype not in (torch.int32, torch.int64) or indices.dim() != 4 \
            or tuple(indices.shape[:3]) != (B, H, n_lists) or indices.shape[3] > nk:
        raise ValueError(f"indices must be int32 [B, H, {what}, max_kept] with {what}={n_lists}, "
                         f"max_kept <= {nk}; got {indices.dtype} {tuple(indices.shape)}")
    if counts.device != q.device or indices.device != q.device:
        raise ValueError(f"counts and indices must be on {q.device}")


def _check_pair_bits(bits: torch.Tensor, q: torch.Tensor, nb: int, block_size: int) -> None:
    if block_size != 64:
        raise ValueError(f"pair programs (pair_bits) need block_size 64 (128-row tiles); got "
                         f"{block_size}")
    B, H = q.shape[:2]
    shape = (B, H, nb, -(-nb // 8))
    if bits.dtype != torch.uint8 or tuple(bits.shape) != shape or bits.device != q.device:
        raise ValueError(f"pair_bits must be the mask's uint8 bits {shape} on {q.device}; got "
                         f"{bits.dtype} {tuple(bits.shape)} on {bits.device}")


def pair_lists(bits: torch.Tensor, num_kv_blocks: int, max_kept: int):
    """``(counts, indices)`` of the pairs' union lists, from a mask's packed bits (no host sync)."""
    return mask_indices(pair_union(bits), num_kv_blocks, min(num_kv_blocks, 2 * max_kept))


def prefer_pairs(pair_overhead: float, head_dim: int, block_size: int, dtype: torch.dtype) -> bool:
    """Whether pair programs that share key blocks (:mod:`.shared_pairs`) beat 64-row ones for
    a mask with this ``pair_overhead`` (``2 - pair_overhead`` of its kept blocks are shared).

    Measured on an H100 (bf16, TMA, block size 64, ``benchmarks/block_sparse_variants.py``,
    benchmarks/RESULTS.md, seventh run): at head dim 128 and density 1.0 (overhead 1.0) they take
    0.82-0.85x the time of 64-row programs; on masks sharing 0.6-0.7 of their blocks they are
    level, sharing 0.25 they are 1.2-1.3x slower (their state for two query blocks spills
    registers); at head dim 64 they are slower. They exist at block size 64, for 16-bit inputs.
    """
    return (head_dim > 64 and block_size == 64 and dtype in (torch.float16, torch.bfloat16)
            and pair_overhead <= PAIR_MAX_OVERHEAD)


def work_order(counts: torch.Tensor) -> torch.Tensor:
    """Flattened (b, h, list) items, heaviest first; ties keep their order (a stable sort)."""
    _, order = torch.sort(counts.reshape(-1), descending=True, stable=True)
    return order.to(torch.int32)


def _launch(q, k, v, counts, indices, scale, block_size, key_valid, out, bits=None,
            use_tma: Optional[bool] = None, num_warps: Optional[int] = None,
            num_stages: Optional[int] = None,
            rotate_period: Optional[int] = None) -> torch.Tensor:
    """``rotate_period``: program ``p`` walks its list from the fraction ``(p mod P) / P``
    onward and wraps around, so that the programs resident together read nearby K/V blocks at
    the same time (random masks re-read K/V from DRAM otherwise: a head's K/V can exceed L2).
    None = :func:`default_rotate_period`, 0 = no rotation, or the period ``P``. The result is
    the same up to summation order."""
    if rotate_period is not None and (not isinstance(rotate_period, int) or rotate_period < 0):
        raise ValueError(f"rotate_period must be an int >= 0 or None, got {rotate_period!r}")
    _common.check_qk(q, k, block_size, v)
    _common.check_scale(scale)
    _common.check_key_valid(key_valid, q)
    B, H, L, D = q.shape
    nb = -(-L // block_size)
    q_blocks = 1 if bits is None else 2
    n_lists = -(-nb // q_blocks)
    _check_lists(counts, indices, n_lists, nb, q, "nq" if bits is None else "ceil(nq / 2)")
    if bits is not None:
        _check_pair_bits(bits, q, nb, block_size)
    _common.check_out("out", out, tuple(q.shape), q.dtype, q.device)
    if out is None:
        out = torch.empty_like(q)
    if L == 0 or B * H == 0:
        return out
    if indices.shape[3] == 0:  # no row keeps anything: every output row is 0
        indices = torch.zeros(B, H, n_lists, 1, dtype=torch.int32, device=q.device)
    head_dim_pad = _common.padded_head_dim(D)
    descs = _common.tma_descriptors((k, v), block_size, head_dim_pad, use_tma)
    k_arg, v_arg = descs if descs is not None else (k, v)
    bias = _common.key_bias(key_valid, B, L, block_size, q.device)
    kernel = "sparse" if bits is None else "sparse_pair"
    default_warps, default_stages = _common.launch_config(kernel, head_dim_pad, block_size)
    bits_arg = counts if bits is None else bits  # never read with one query block per program
    bits_strides = (0, 0, 0) if bits is None else bits.stride()[:3]
    if rotate_period is None:
        rotate_period = default_rotate_period(q, q_blocks)
    _block_sparse_kernel[(B * H * n_lists,)](
        q, k_arg, v_arg, out, counts, indices, work_order(counts), bias, bits_arg,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        counts.stride(0), counts.stride(1), counts.stride(2),
        indices.stride(0), indices.stride(1), indices.stride(2), indices.stride(3),
        *bits_strides,
        H, L, nb, n_lists, nb, _common.log2_scale(scale), rotate_period or 1,
        HEAD_DIM=D, HEAD_DIM_PAD=head_dim_pad, BLOCK_SIZE=block_size, Q_BLOCKS=q_blocks,
        MASK_MODE=_common.mask_mode(key_valid, L, block_size), USE_TMA=descs is not None,
        DOT_PREC=_common.dot_precision(q.dtype), ROTATE=rotate_period != 0,
        num_warps=num_warps or default_warps, num_stages=num_stages or default_stages,
    )
    return out


# Programs per SM in the default rotate period. Measured on the H100 (benchmarks/RESULTS.md,
# seventh run): at head dim 128 (2 programs resident per SM) periods of 3-6 per SM ran the
# HunyuanVideo random mask alike (80.4-80.9 ms, 102.5 unrotated) and 2 per SM slower (86.5); at
# head dim 64 (4 resident) 4 per SM was best and 8 per SM 7-14% slower.
ROTATE_PROGRAMS_PER_SM = 4


def default_rotate_period(q: torch.Tensor, q_blocks: int) -> int:
    """The rotate period ``rotate_period=None`` gives: ``ROTATE_PROGRAMS_PER_SM`` times the
    GPU's SMs for 64-row programs on a GPU; 0 (no rotation) for pair programs (no gain measured)
    and under the interpreter."""
    if not q.is_cuda or _common.interpreting() or q_blocks != 1:
        return 0
    return ROTATE_PROGRAMS_PER_SM * torch.cuda.get_device_properties(q.device).multi_processor_count


# ----------------------------------------------------------------------------- public
def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           counts: torch.Tensor, indices: torch.Tensor, scale: float,
                           block_size: int, key_valid: Optional[torch.Tensor], *,
                           pair_bits: Optional[torch.Tensor] = None, tma: Optional[bool] = None,
                           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of each query block over ``indices[b, h, i, :counts[b, h, i]]``.

    Args:
        q, k, v: ``[B, H, L, D]``, one dtype among fp16 / bf16 / fp32, any strides.
        counts: int32 ``[B, H, nq]``; indices: int32 ``[B, H, nq, max_kept]``, ascending key
            blocks in ``[0, nk)`` below each count.
        scale: softmax scale.
        block_size: 64 or 128.
        key_valid: ``None`` or bool ``[B, L]`` (True = attend).
        pair_bits: the mask's packed bits ``[B, H, nq, ceil(nk / 8)]``. When given, programs
            own pairs of query blocks and ``counts`` / ``indices`` are the pairs' union lists
            ``[B, H, ceil(nq / 2), ...]`` from :func:`pair_lists`.
        tma: read K and V through tensor descriptors: None = on sm90+ GPUs for bf16 / fp16 with
            head dim 64 or 128, True = wherever their strides allow (also under the
            interpreter), False = pointer loads.
        out: optional preallocated output (tests poison it); default ``torch.empty_like(q)``.
    """
    return _launch(q, k, v, counts, indices, scale, block_size, key_valid, out, bits=pair_bits,
                   use_tma=tma)
