"""Triton device helpers shared by the three kernels: tile loads and the per-tile updates.

Conventions: scores are kept in base 2, ``qk * QK_SCALE`` with ``QK_SCALE = scale * log2(e)``.
Key masking is an additive ``0 / -inf`` bias row (:func:`_common.key_bias`), applied only where
``APPLY_BIAS`` says so. Which tiles need it is decided per launch (:func:`_common.mask_mode`):

- ``MASK_NONE``: no key padding and ``L`` a multiple of the block: no tile is masked;
- ``MASK_LAST``: no key padding, ragged ``L``: only the last key block is masked, and the loops
  peel it off (it is the last one visited, since index lists are ascending);
- ``MASK_ALL``: a key-padding mask was given: every tile adds the bias.

(A run-time branch per tile would be cheaper still, but Triton 3.6's software pipeliner fails on
an ``scf.if`` yielding the score tile inside the loop.)
"""

import triton
import triton.language as tl

from ._exp2 import PACK, mixed_exp2_asm

# One inline-asm body per polynomial share (``exp2_mixed``); constexpr strings, chosen by if-chain.
_EXP2_POLY_1 = tl.constexpr(mixed_exp2_asm(1))
_EXP2_POLY_2 = tl.constexpr(mixed_exp2_asm(2))
_EXP2_POLY_3 = tl.constexpr(mixed_exp2_asm(3))
_EXP2_POLY_4 = tl.constexpr(mixed_exp2_asm(4))
_EXP2_CONSTRAINTS = tl.constexpr(",".join(["=r"] * PACK + ["r"] * PACK))
_EXP2_PACK = tl.constexpr(PACK)


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
def store_rows(base, tile, rows, offs_d, stride_row, stride_d, seq_len,
               HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    ptrs = base + rows[:, None] * stride_row + offs_d[None, :] * stride_d
    if HEAD_DIM == HEAD_DIM_PAD:
        tl.store(ptrs, tile, mask=rows[:, None] < seq_len)
    else:
        tl.store(ptrs, tile, mask=(rows[:, None] < seq_len) & (offs_d[None, :] < HEAD_DIM))


MASK_NONE = tl.constexpr(0)
MASK_LAST = tl.constexpr(1)
MASK_ALL = tl.constexpr(2)


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
def scale_scores(qk, bias_ptr, cols, qk_scale, APPLY_BIAS: tl.constexpr):
    """Raw scores ``qk`` times ``QK_SCALE`` (base 2), plus the key bias when ``APPLY_BIAS``."""
    if APPLY_BIAS:
        bias = tl.load(bias_ptr + cols)
        qk = qk * qk_scale + bias[None, :]
    else:
        qk = qk * qk_scale
    return qk


@triton.jit
def scaled_scores(q, k, bias_ptr, cols, qk_scale, APPLY_BIAS: tl.constexpr,
                  DOT_PREC: tl.constexpr):
    """``q @ k^T * QK_SCALE`` (base 2), plus the key bias when ``APPLY_BIAS``."""
    return scale_scores(tl.dot(q, tl.trans(k), input_precision=DOT_PREC), bias_ptr, cols,
                        qk_scale, APPLY_BIAS)


@triton.jit
def _asm_exp2(x, ASM: tl.constexpr):
    return tl.inline_asm_elementwise(ASM, _EXP2_CONSTRAINTS, [x], dtype=tl.float32, is_pure=True,
                                     pack=_EXP2_PACK)


@triton.jit
def exp2_mixed(x, EXP_POLY: tl.constexpr):
    """``2^x`` elementwise; ``EXP_POLY`` of every 8 by the FMA-unit polynomial of ``_exp2``
    (0 = all on ``MUFU.EX2``; 1..4 need a GPU, and finite inputs: see ``_exp2``)."""
    if EXP_POLY == 0:
        y = tl.math.exp2(x)
    elif EXP_POLY == 1:
        y = _asm_exp2(x, _EXP2_POLY_1)
    elif EXP_POLY == 2:
        y = _asm_exp2(x, _EXP2_POLY_2)
    elif EXP_POLY == 3:
        y = _asm_exp2(x, _EXP2_POLY_3)
    else:
        tl.static_assert(EXP_POLY == 4)
        y = _asm_exp2(x, _EXP2_POLY_4)
    return y


@triton.jit
def online_softmax_step(acc, l_i, m_i, qk, v, DOT_PREC: tl.constexpr, EXP_POLY: tl.constexpr = 0):
    """One flash-attention update with scores ``qk`` (base 2) and values ``v``.

    ``m_i`` starts at a large finite negative, so fully masked tiles give ``p = 0`` and
    ``alpha = 1`` (never ``inf - inf``). ``EXP_POLY``: see :func:`exp2_mixed` (only for tiles
    with no ``-inf`` score, whose ``p`` may then be 2^-126 instead of 0).
    """
    m_ij = tl.maximum(m_i, tl.max(qk, 1))
    p = exp2_mixed(qk - m_ij[:, None], EXP_POLY)
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, l_i, m_ij
