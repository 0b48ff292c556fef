"""Block-sparse attention: each query block attends only its kept key blocks.

One program owns one query block of one (batch, head) and walks its ascending list of key
blocks ``indices[b, h, i, :counts[b, h, i]]``. (Programs owning pairs of query blocks, for masks
whose adjacent rows share most blocks, are in :mod:`.shared_pairs`.) The output is exactly that
of :func:`adaspa_compile.reference.block_sparse_attention_ref`.

Programs are launched heaviest list first (a stable sort of the counts), so the long lists start
early and the short ones fill the tail; lists of equal length keep their (batch, head, block)
order, which keeps a head's K/V hot in L2. On a GPU, programs also walk their lists *rotated*
(:func:`default_rotate_period`): program ``p`` starts at the fraction ``(p mod P) / P`` of its
list and wraps around, so the programs resident together read the same stretch of K/V instead
of all of it (on random masks a head's K/V exceed L2: the HunyuanVideo mask took 21% less time
on an H100). On Hopper at head dim 128 :func:`block_sparse_attention` hands the same work to
the Gluon kernel of :mod:`.block_sparse_hopper` (asynchronous wgmmas, 3 programs per SM; 5-9%
faster there).

- dtypes: fp16 / bf16 (fp32 accumulation) or fp32 (IEEE fp32 dots; the interpreter path).
- head dims 1..128; 64 and 128 are tuned, others are padded to a power of two (>= 16) by masks.
- block sizes 64 and 128; key tiles are the mask's blocks.
- K and V are read through tensor descriptors (TMA) on Hopper (sm90+) for bf16 / fp16 with head
  dim 64 or 128, when their strides allow it (10-20% faster on an H100 than pointer loads).
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

from . import _common
from ._tiles import (MASK_ALL, MASK_NONE, MASK_RANGE, biased_scores, kv_bases, load_block,
                     load_rows, load_state, online_softmax_step, rotated_slot, slots_below,
                     store_normalized, unbiased_blocks, walk_start, work_item)

__all__ = ["block_sparse_attention", "default_rotate_period"]


# ----------------------------------------------------------------------------- inner loop
@triton.jit
def sparse_loop(acc, l_i, m_i, q, K, V, k_base, v_base, bias_base, idx_base, off_z, off_h,
                t_start, t_end, rot, gap_at, gap, offs_n, offs_d, stride_kn, stride_kd,
                stride_vn, stride_vd, stride_ik, seq_len, qk_scale, HEAD_DIM: tl.constexpr,
                HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, USE_TMA: tl.constexpr,
                APPLY_BIAS: tl.constexpr, DOT_PREC: tl.constexpr, ROTATE: tl.constexpr,
                GAP: tl.constexpr):
    """Key blocks ``indices[t_start:t_end]`` of one list; with ``ROTATE`` (and ``t_start`` 0)
    in the order ``rot, rot + 1, ..., t_end - 1, 0, ..., rot - 1``; with ``GAP``, slots from
    ``gap_at`` on are read ``gap`` further on (skipping the slots walked with the bias)."""
    for t in range(t_start, t_end):
        slot = rotated_slot(t, rot, t_end, ROTATE)
        if GAP:
            slot = tl.where(slot >= gap_at, slot + gap, slot)
        j = tl.load(idx_base + slot * stride_ik)
        k = load_block(K, k_base, off_z, off_h, j, offs_n, offs_d, stride_kn, stride_kd, seq_len,
                       HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, USE_TMA)
        qk = biased_scores(q, k, bias_base, j * BLOCK_SIZE + offs_n, APPLY_BIAS, DOT_PREC)
        v = load_block(V, v_base, off_z, off_h, j, offs_n, offs_d, stride_vn, stride_vd, seq_len,
                       HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, USE_TMA)
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, qk, qk_scale, v, DOT_PREC)
    return acc, l_i, m_i


@triton.jit
def walk_list(acc, l_i, m_i, q, K, V, k_base, v_base, bias_base, idx_base, count, bias_range,
              off_z, off_h, rotate_period, offs_n, offs_d, stride_kn, stride_kd, stride_vn,
              stride_vd, stride_ik, seq_len, qk_scale, HEAD_DIM: tl.constexpr,
              HEAD_DIM_PAD: tl.constexpr, BLOCK: tl.constexpr, MASK_MODE: tl.constexpr,
              USE_TMA: tl.constexpr, DOT_PREC: tl.constexpr, ROTATE: tl.constexpr):
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
                                    off_z, off_h, 0, n_clean, rot, s0, s1 - s0, offs_n, offs_d,
                                    stride_kn, stride_kd, stride_vn, stride_vd, stride_ik,
                                    seq_len, qk_scale, HEAD_DIM, HEAD_DIM_PAD, BLOCK, USE_TMA,
                                    False, DOT_PREC, ROTATE, True)
        acc, l_i, m_i = sparse_loop(acc, l_i, m_i, q, K, V, k_base, v_base, bias_base, idx_base,
                                    off_z, off_h, s0, s1, 0, 0, 0, offs_n, offs_d, stride_kn,
                                    stride_kd, stride_vn, stride_vd, stride_ik, seq_len,
                                    qk_scale, HEAD_DIM, HEAD_DIM_PAD, BLOCK, USE_TMA, True,
                                    DOT_PREC, False, False)
    else:
        n_clean = unbiased_blocks(count, MASK_MODE)
        rot = walk_start(count if MASK_MODE == MASK_ALL else n_clean, rotate_period, ROTATE)
        acc, l_i, m_i = sparse_loop(acc, l_i, m_i, q, K, V, k_base, v_base, bias_base, idx_base,
                                    off_z, off_h, 0, n_clean, rot, 0, 0, offs_n, offs_d,
                                    stride_kn, stride_kd, stride_vn, stride_vd, stride_ik,
                                    seq_len, qk_scale, HEAD_DIM, HEAD_DIM_PAD, BLOCK, USE_TMA,
                                    False, DOT_PREC, ROTATE and MASK_MODE != MASK_ALL, False)
        if MASK_MODE != MASK_NONE:
            acc, l_i, m_i = sparse_loop(acc, l_i, m_i, q, K, V, k_base, v_base, bias_base,
                                        idx_base, off_z, off_h, n_clean, count, rot, 0, 0,
                                        offs_n, offs_d, stride_kn, stride_kd, stride_vn,
                                        stride_vd, stride_ik, seq_len, qk_scale, HEAD_DIM,
                                        HEAD_DIM_PAD, BLOCK, USE_TMA, True, DOT_PREC,
                                        ROTATE and MASK_MODE == MASK_ALL, False)
    return acc, l_i, m_i


# ----------------------------------------------------------------------------- kernel
@triton.jit(do_not_specialize=["rotate_period"])
def _block_sparse_kernel(Q, K, V, Out, Counts, Indices, Order, Bias, BiasRange, State, M, Lsum,
                         stride_qz, stride_qh, stride_qm, stride_qd,
                         stride_kz, stride_kh, stride_kn, stride_kd,
                         stride_vz, stride_vh, stride_vn, stride_vd,
                         stride_oz, stride_oh, stride_om, stride_od,
                         stride_cz, stride_ch, stride_cm,
                         stride_iz, stride_ih, stride_im, stride_ik,
                         H, seq_len, n_lists, n_k_blocks, qk_scale, rotate_period,
                         HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, MASK_MODE: tl.constexpr, USE_TMA: tl.constexpr,
                         DOT_PREC: tl.constexpr, ROTATE: tl.constexpr, RESUME: tl.constexpr):
    lst, z32, h32 = work_item(Order, n_lists, H)
    off_z = z32.to(tl.int64)
    off_h = h32.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_SIZE)
    offs_m = lst * BLOCK_SIZE + offs_n
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    count = tl.load(Counts + off_z * stride_cz + off_h * stride_ch + lst * stride_cm)
    idx_base = Indices + off_z * stride_iz + off_h * stride_ih + lst.to(tl.int64) * stride_im

    q = load_rows(Q + off_z * stride_qz + off_h * stride_qh, offs_m, offs_d, stride_qm,
                  stride_qd, seq_len, HEAD_DIM, HEAD_DIM_PAD)
    if RESUME:  # continue the softmax state an earlier launch left (shared_pairs, split)
        acc, l_i, m_i = load_state(State, M, Lsum, z32 * H + h32, offs_m, offs_d, seq_len,
                                   HEAD_DIM_PAD)
    else:
        m_i = tl.full([BLOCK_SIZE], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_SIZE], dtype=tl.float32)
        acc = tl.zeros([BLOCK_SIZE, HEAD_DIM_PAD], dtype=tl.float32)
    k_base, v_base = kv_bases(Q, K, V, off_z, off_h, stride_kz, stride_kh, stride_vz, stride_vh,
                              USE_TMA)
    bias_base = Bias + off_z * n_k_blocks * BLOCK_SIZE
    # Ascending lists put the ragged last key block, if kept, in the last slot.
    acc, l_i, m_i = walk_list(acc, l_i, m_i, q, K, V, k_base, v_base, bias_base, idx_base, count,
                              BiasRange + off_z * 2, z32, h32, rotate_period, offs_n, offs_d,
                              stride_kn, stride_kd, stride_vn, stride_vd, stride_ik, seq_len,
                              qk_scale, HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, MASK_MODE, USE_TMA,
                              DOT_PREC, ROTATE)
    store_normalized(Out + off_z * stride_oz + off_h * stride_oh, acc, l_i, offs_m, offs_d,
                     stride_om, stride_od, seq_len, HEAD_DIM, HEAD_DIM_PAD)


# ----------------------------------------------------------------------------- launcher
def check_lists(counts: torch.Tensor, indices: torch.Tensor, n_lists: int, nk: int,
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


def launch_lists(q, counts: torch.Tensor, indices: torch.Tensor, block_size: int, out):
    """``(out, indices, nb)`` for a 64-row launch: the lists checked against ``q``, ``out`` as
    given (checked) or new, and ``indices`` given one slot where no row keeps anything (every
    output row is then 0; the kernels still take a slot's address)."""
    B, H, L = q.shape[:3]
    nb = -(-L // block_size)
    check_lists(counts, indices, nb, nb, q, "nq")
    out = _common.output_like(q, out)
    if indices.shape[3] == 0:
        indices = torch.zeros(B, H, nb, 1, dtype=torch.int32, device=q.device)
    return out, indices, nb


def work_order(counts: torch.Tensor) -> torch.Tensor:
    """Flattened (b, h, list) items by their work ``counts``, heaviest first; ties keep their
    order (a stable sort)."""
    _, order = torch.sort(counts.reshape(-1), descending=True, stable=True)
    return order.to(torch.int32)


def _launch(q, k, v, counts, indices, scale, block_size, key_valid, out,
            use_tma: Optional[bool] = None, num_warps: Optional[int] = None,
            num_stages: Optional[int] = None, rotate_period: Optional[int] = None,
            bias_range: Optional[bool] = None, resume=None) -> torch.Tensor:
    """``rotate_period``: program ``p`` walks its list from the fraction ``(p mod P) / P``
    onward and wraps around, so that the programs resident together read nearby K/V blocks at
    the same time (random masks re-read K/V from DRAM otherwise: a head's K/V can exceed L2).
    None = :func:`default_rotate_period`, 0 = no rotation, or the period ``P``. The result is
    the same up to summation order.

    ``bias_range`` (with ``key_valid`` only): only the kept blocks inside each batch's range
    of key blocks holding a padded key (or the ragged end) take the key bias, instead of every
    block (:func:`bias_block_range`). None = :func:`default_bias_range`.

    ``resume``: ``(state, row_max, row_sum)`` an earlier launch wrote (``shared_pairs``, split
    mode): the rows continue from it instead of starting empty."""
    check_inputs(q, k, v, scale, block_size, key_valid, rotate_period)
    B, H, L, D = q.shape
    out, indices, nb = launch_lists(q, counts, indices, block_size, out)
    if L == 0 or B * H == 0:
        return out
    head_dim_pad, k_arg, v_arg, bias = kernel_inputs(q, k, v, block_size, key_valid, use_tma)
    default_warps, default_stages = _common.launch_config("sparse", head_dim_pad, block_size)
    if rotate_period is None:
        rotate_period = default_rotate_period(q)
    mask_mode = _common.mask_mode(key_valid, L, block_size)
    if bias_range is None:
        bias_range = default_bias_range(head_dim_pad)
    if bias_range and key_valid is not None:
        mask_mode, block_range = _common.MASK_RANGE, bias_block_range(bias, block_size)
    else:
        block_range = bias  # never read
    state = resume if resume is not None else (bias, bias, bias)  # never read without resume
    _block_sparse_kernel[(B * H * nb,)](
        q, k_arg, v_arg, out, counts, indices, work_order(counts), bias, block_range, *state,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        counts.stride(0), counts.stride(1), counts.stride(2),
        indices.stride(0), indices.stride(1), indices.stride(2), indices.stride(3),
        H, L, nb, nb, _common.log2_scale(scale), rotate_period or 1,
        HEAD_DIM=D, HEAD_DIM_PAD=head_dim_pad, BLOCK_SIZE=block_size,
        MASK_MODE=mask_mode, USE_TMA=k_arg is not k,
        DOT_PREC=_common.dot_precision(q.dtype), ROTATE=rotate_period != 0,
        RESUME=resume is not None,
        num_warps=num_warps or default_warps, num_stages=num_stages or default_stages,
    )
    return out


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


def default_bias_range(head_dim_pad: int) -> bool:
    """Whether key padding takes the bias only inside the padded blocks' range (``MASK_RANGE``)
    rather than on every kept block. Measured on the H100 (benchmarks/RESULTS.md, eighth run,
    half the text tail padded): at head dim 128 the range took the HunyuanVideo 0.2 masks from
    87.1 / 90.0 ms to 80.0 / 81.6 (unpadded 77.8 / 77.4); at head dim 64 (CogVideoX, the padded
    text at the head) it was 13.06 -> 13.68 ms on the random mask and 14.20 -> 13.98 on the
    local one, so there every block keeps the bias."""
    return head_dim_pad >= 128


def check_inputs(q, k, v, scale: float, block_size: int, key_valid: Optional[torch.Tensor],
                 rotate_period: Optional[int]) -> None:
    """``ValueError`` for anything the block-sparse kernels cannot take (before any launch)."""
    if rotate_period is not None and (not isinstance(rotate_period, int) or rotate_period < 0):
        raise ValueError(f"rotate_period must be an int >= 0 or None, got {rotate_period!r}")
    _common.check_qk(q, k, block_size, v)
    _common.check_scale(scale)
    _common.check_key_valid(key_valid, q)


def kernel_inputs(q, k, v, block_size: int, key_valid: Optional[torch.Tensor],
                  use_tma: Optional[bool]):
    """``(padded head dim, K argument, V argument, key bias)``: K and V as tensor descriptors
    where TMA is used (see ``_common.tma_descriptors``), else the tensors themselves."""
    head_dim_pad = _common.padded_head_dim(q.shape[-1])
    descs = _common.tma_descriptors((k, v), block_size, head_dim_pad, use_tma)
    k_arg, v_arg = descs if descs is not None else (k, v)
    bias = _common.key_bias(key_valid, q.shape[0], q.shape[2], block_size, q.device)
    return head_dim_pad, k_arg, v_arg, bias


# Programs per SM in the default rotate period. Measured on the H100 (benchmarks/RESULTS.md,
# seventh run): at head dim 128 (2 programs resident per SM) periods of 3-6 per SM ran the
# HunyuanVideo random mask alike (80.4-80.9 ms, 102.5 unrotated) and 2 per SM slower (86.5); at
# head dim 64 (4 resident) 4 per SM was best and 8 per SM 7-14% slower.
ROTATE_PROGRAMS_PER_SM = 4


def default_rotate_period(q: torch.Tensor) -> int:
    """The rotate period ``rotate_period=None`` gives: ``ROTATE_PROGRAMS_PER_SM`` times the
    GPU's SMs on a GPU; 0 (no rotation) under the interpreter."""
    if not q.is_cuda or _common.interpreting():
        return 0
    return ROTATE_PROGRAMS_PER_SM * torch.cuda.get_device_properties(q.device).multi_processor_count


# ----------------------------------------------------------------------------- public
def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           counts: torch.Tensor, indices: torch.Tensor, scale: float,
                           block_size: int, key_valid: Optional[torch.Tensor], *,
                           tma: Optional[bool] = None,
                           out: Optional[torch.Tensor] = None,
                           rotate_period: Optional[int] = None) -> torch.Tensor:
    """Attention of each query block over ``indices[b, h, i, :counts[b, h, i]]``.

    Args:
        q, k, v: ``[B, H, L, D]``, one dtype among fp16 / bf16 / fp32, any strides.
        counts: int32 ``[B, H, nq]``; indices: int32 ``[B, H, nq, max_kept]``, ascending key
            blocks in ``[0, nk)`` below each count.
        scale: softmax scale.
        block_size: 64 or 128.
        key_valid: ``None`` or bool ``[B, L]`` (True = attend).
        tma: read K and V through tensor descriptors: None = on sm90+ GPUs for bf16 / fp16 with
            head dim 64 or 128, True = wherever their strides allow (also under the
            interpreter), False = pointer loads.
        out: optional preallocated output (tests poison it); default ``torch.empty_like(q)``.
        rotate_period: the rotated list walk (:func:`default_rotate_period` for None, 0 = none).

    On Hopper at head dim 128 (bf16 / fp16, block size 64, ``tma`` None, TMA-compatible strides)
    this runs the Gluon kernel of :mod:`.block_sparse_hopper` (:func:`uses_hopper_kernel`).
    """
    if tma is None and uses_hopper_kernel(q, k, v, block_size, out):
        from .block_sparse_hopper import block_sparse_attention_hopper
        return block_sparse_attention_hopper(q, k, v, counts, indices, scale, key_valid, out=out,
                                             rotate_period=rotate_period)
    return _launch(q, k, v, counts, indices, scale, block_size, key_valid, out, use_tma=tma,
                   rotate_period=rotate_period)


# Head dims where the Gluon kernel (block_sparse_hopper) is the default 64-row executor. Measured
# on the H100 (benchmarks/RESULTS.md, eighth run, both rotated): at 128, with 3 programs per SM,
# it took 5-9% less time than the Triton kernel on the 0.2 masks (HunyuanVideo 74.7 / 74.2 vs
# 78.8 / 78.5 ms, Wan 49.1 / 49.3 vs 53.9 / 54.0); at 64 (CogVideoX) it was 4-5% slower.
HOPPER_HEAD_DIMS = (128,)


def uses_hopper_kernel(q, k, v, block_size: int, out=None) -> bool:
    """Whether :func:`block_sparse_attention` runs these inputs on the Gluon kernel."""
    from . import block_sparse_hopper

    if q.shape[-1] not in HOPPER_HEAD_DIMS or not block_sparse_hopper.supports(q, block_size):
        return False
    tensors = (q, k, v) if out is None else (q, k, v, out)
    return all(_common.tma_compatible(t) for t in tensors)
