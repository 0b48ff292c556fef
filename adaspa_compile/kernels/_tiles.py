"""Triton device helpers shared by the attention kernels: tile loads and the per-tile updates.

Conventions: scores are kept in base 2, ``qk * QK_SCALE`` with ``QK_SCALE = scale * log2(e)``.
Key masking is an additive ``0 / -inf`` bias row (:func:`_common.key_bias`), applied only where
``APPLY_BIAS`` says so. Which tiles need it is decided per launch (:func:`_common.mask_mode`):

- ``MASK_NONE``: no key padding and ``L`` a multiple of the block: no tile is masked;
- ``MASK_LAST``: no key padding, ragged ``L``: only the last key block is masked, and the loops
  peel it off (it is the last one visited, since index lists are ascending);
- ``MASK_ALL``: a key-padding mask was given: every tile adds the bias;
- ``MASK_RANGE`` (block-sparse only): a key-padding mask was given, and only the list entries
  inside a per-batch range of key blocks (those holding a padded key or the ragged end) add it.

(A run-time branch per tile would be cheaper still, but Triton 3.6's software pipeliner fails on
an ``scf.if`` yielding the score tile inside the loop.)
"""

import triton
import triton.language as tl


@triton.jit
def load_rows(base, rows, offs_d, stride_row, stride_d, seq_len,
              HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    """Load ``[len(rows), HEAD_DIM_PAD]``; rows past ``seq_len`` and padded dims read 0."""
    ptrs = base + rows[:, None] * stride_row + offs_d[None, :] * stride_d
    if HEAD_DIM == HEAD_DIM_PAD:
        tile = tl.load(ptrs, mask=rows[:, None] < seq_len, other=0.0)
    else:
        tile = tl.load(ptrs, mask=(rows[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM),
                       other=0.0)
    return tile


@triton.jit
def load_block(desc, base, off_z, off_h, j, offs_n, offs_d, stride_n, stride_d, seq_len,
               HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
               USE_TMA: tl.constexpr):
    """Key (or value) block ``j``: ``[BLOCK_SIZE, HEAD_DIM_PAD]``, zeros past ``seq_len``/``D``."""
    if USE_TMA:
        tile = desc.load([off_z, off_h, j * BLOCK_SIZE, 0]).reshape(BLOCK_SIZE, HEAD_DIM_PAD)
    else:
        tile = load_rows(base, j * BLOCK_SIZE + offs_n, offs_d, stride_n, stride_d, seq_len,
                         HEAD_DIM, HEAD_DIM_PAD)
    return tile


@triton.jit
def load_value_block(desc, base, off_z, off_h, j, offs_n, offs_d, stride_n, stride_d, seq_len,
                     HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                     BLOCK_SIZE: tl.constexpr, USE_TMA: tl.constexpr,
                     TRANSPOSED: tl.constexpr):
    """Value block ``j`` as :func:`load_block`; with ``TRANSPOSED`` the values are stored
    ``[B, H, D, L]`` (the FP8 layout: the ``p @ v`` reduction dim contiguous, as FP8 tensor
    cores need) and a descriptor loads ``[HEAD_DIM_PAD, BLOCK_SIZE]`` tiles."""
    if USE_TMA and TRANSPOSED:
        tile = desc.load([off_z, off_h, 0, j * BLOCK_SIZE]).reshape(HEAD_DIM_PAD, BLOCK_SIZE).T
    else:
        tile = load_block(desc, base, off_z, off_h, j, offs_n, offs_d, stride_n, stride_d,
                          seq_len, HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, USE_TMA)
    return tile


@triton.jit
def store_rows(base, tile, rows, offs_d, stride_row, stride_d, seq_len,
               HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    ptrs = base + rows[:, None] * stride_row + offs_d[None, :] * stride_d
    if HEAD_DIM == HEAD_DIM_PAD:
        tl.store(ptrs, tile, mask=rows[:, None] < seq_len)
    else:
        tl.store(ptrs, tile, mask=(rows[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM))


MASK_NONE, MASK_LAST, MASK_ALL, MASK_RANGE = (tl.constexpr(mode) for mode in range(4))


@triton.jit
def unbiased_blocks(n, MASK_MODE: tl.constexpr):
    """How many of ``n`` ascending key blocks need no bias: all (``MASK_NONE``), all but the
    ragged last one (``MASK_LAST``), none (``MASK_ALL``). The rest run with ``APPLY_BIAS``."""
    if MASK_MODE == MASK_NONE:
        clean = n
    elif MASK_MODE == MASK_LAST:
        clean = tl.maximum(n - 1, 0)
    else:
        clean = 0
    return clean


@triton.jit
def walk_start(n_walk, rotate_period, ROTATE: tl.constexpr):
    """First slot of this program's rotated walk of ``n_walk`` slots (0 without ``ROTATE``):
    program ``p`` starts at the fraction ``(p mod P) / P`` of it. Programs launched ``P`` apart
    start in phase, so the programs resident together read nearby K/V blocks."""
    rot = 0
    if ROTATE:
        rot = ((tl.program_id(0) % rotate_period) * n_walk) // rotate_period
    return rot


@triton.jit
def slots_below(idx_base, count, stride_ik, lo, hi, CHUNK: tl.constexpr):
    """``(s0, s1)``: how many of a list's ``count`` ascending entries lie below ``lo`` and below
    ``hi``, so the entries in ``[lo, hi)`` are the slots ``[s0, s1)``."""
    offs = tl.arange(0, CHUNK)
    s0 = tl.sum(tl.zeros([CHUNK], dtype=tl.int32), 0)
    s1 = s0
    for c in range(0, count, CHUNK):
        live = c + offs < count
        e = tl.load(idx_base + (c + offs) * stride_ik, mask=live, other=0)
        s0 += tl.sum((live & (e < lo)).to(tl.int32), 0)
        s1 += tl.sum((live & (e < hi)).to(tl.int32), 0)
    return s0, s1


@triton.jit
def biased_scores(q, k, bias_ptr, cols, APPLY_BIAS: tl.constexpr, DOT_PREC: tl.constexpr):
    """Unscaled ``q @ k^T``, plus the key bias when ``APPLY_BIAS`` (0 / -inf: the scale, which
    is positive, would not change it, so it is left to :func:`online_softmax_step`)."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    if APPLY_BIAS:
        qk = qk + tl.load(bias_ptr + cols)[None, :]
    return qk


@triton.jit
def softmax_tile(l_i, m_i, qk, qk_scale, LOG2_P_SCALE: tl.constexpr):
    """``(p, alpha, l_i, m_ij)`` of one tile: its probabilities against the new running max
    ``m_ij``, times ``2 ** LOG2_P_SCALE`` (folded into the per-row exponent offset), the factor
    ``alpha`` that rescales what came before, and the new row sums of those probabilities."""
    m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - (m_ij - LOG2_P_SCALE)[:, None])
    alpha = tl.math.exp2(m_i - m_ij)
    return p, alpha, l_i * alpha + tl.sum(p, 1), m_ij


@triton.jit
def online_softmax_step(acc, l_i, m_i, qk, qk_scale, v, DOT_PREC: tl.constexpr):
    """One flash-attention update with unscaled scores ``qk`` and values ``v``.

    The running max ``m_i`` is in base-2 units (``qk * QK_SCALE``). Since ``QK_SCALE > 0`` the
    tile's max is taken on the unscaled scores and scaled once per row, and the scale goes into
    the exponent's FMA: no multiply per score. ``m_i`` starts at a large finite negative, so
    fully masked tiles give ``p = 0`` and ``alpha = 1`` (never ``inf - inf``).
    """
    p, alpha, l_i, m_ij = softmax_tile(l_i, m_i, qk, qk_scale, 0.0)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, l_i, m_ij


@triton.jit
def online_softmax_step_fp8(acc, l_i, m_i, qk, qk_scale, v, LOG2_P_SCALE: tl.constexpr,
                            ROUND_P: tl.constexpr):
    """:func:`online_softmax_step` with FP8 values. The probabilities are taken times
    ``2 ** LOG2_P_SCALE`` (folded into the exponent) and, with ``ROUND_P``, rounded to ``v``'s
    FP8 dtype for ``p @ v``, whose product is added to ``acc`` in fp32 (FP8 dots accumulate with
    fewer mantissa bits); ``l_i`` sums the same scaled, unrounded probabilities. Without
    ``ROUND_P`` (Triton's interpreter, whose FP8 rounding is not round-to-nearest) ``p`` stays
    fp32."""
    p, alpha, l_i, m_ij = softmax_tile(l_i, m_i, qk, qk_scale, LOG2_P_SCALE)
    if ROUND_P:
        pv = tl.dot(p.to(v.dtype), v)
    else:
        pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    return acc * alpha[:, None] + pv, l_i, m_ij
