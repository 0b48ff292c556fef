"""The block attention mass from a row LSE, no V and no output: the second half of the exact
search (with the fresh LSE) and the whole cached search (with the LSE of an earlier step).

``mass[b, h, i, j] = sum over rows r of query block i, keys c of key block j of
exp(scale * q_r . k_c - lse_r)``, fp32 ``[B, H, nq, nk]``, reduced over rows inside the kernel
(no row x block buffer). Semantics are those of :func:`adaspa_compile.reference.block_mass_ref`;
the conventions are in :mod:`adaspa_compile.kernels`. With ``block_size=64`` one program covers
two query blocks (``BLOCK_M = 128``) and writes two rows of the mass map. Rows whose LSE is
``-inf`` (no valid key) contribute 0.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common
from ._tiles import MASK_ALL, MASK_NONE, load_block, load_rows, unbiased_blocks
from .dispatch import LaunchOptions

__all__ = ["mass_from_lse"]

# Key blocks whose row sums are gathered before one cross-warp reduction (see ``_mass_loop``).
CHUNK = 16


@triton.jit
def _mass_loop(q, lse2, K, k_base, bias_base, off_z, off_h, mass_rows, rows_left, offs_n, offs_d,
               stride_kn, stride_kd, seq_len, n_k_blocks, j_start, j_end, qk_scale,
               HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
               SPLIT: tl.constexpr, APPLY_BIAS: tl.constexpr, DOT_PREC: tl.constexpr,
               USE_TMA: tl.constexpr, CHUNK: tl.constexpr):
    """Key blocks ``j_start .. j_end - 1``: sum ``exp2(qk * QK_SCALE (+ key bias) - lse2)`` over
    each block's rows and columns into mass rows ``mass_rows + s * n_k_blocks``, for the tile's
    ``SPLIT`` query blocks ``s < rows_left``. ``lse2`` is the base-2 LSE in units of
    ``qk * QK_SCALE``, ``+inf`` for rows that must add nothing (no valid key, or past the end).

    The row sums of ``CHUNK`` consecutive key blocks are gathered in registers and reduced across
    rows (and so across warps) once per chunk: reducing at every block puts block-wide barriers
    in every iteration (10% slower at head dim 128 on the H100, benchmarks/RESULTS.md).
    """
    splits = tl.arange(0, SPLIT)
    row_ptrs = mass_rows + splits * n_k_blocks
    row_ok = splits < rows_left
    slots = tl.arange(0, CHUNK)
    for j0 in range(j_start, j_end, CHUNK):
        acc = tl.zeros([SPLIT * BLOCK_SIZE, CHUNK], dtype=tl.float32)
        for j in range(j0, tl.minimum(j0 + CHUNK, j_end)):
            k = load_block(K, k_base, off_z, off_h, j, offs_n, offs_d, stride_kn, stride_kd,
                           seq_len, HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, USE_TMA)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
            if APPLY_BIAS:
                scores = qk * qk_scale + tl.load(bias_base + j * BLOCK_SIZE + offs_n)[None, :]
            else:
                scores = qk * qk_scale
            row_sums = tl.sum(tl.math.exp2(scores - lse2[:, None]), 1)
            acc = tl.where(slots[None, :] == j - j0, row_sums[:, None], acc)
        sums = tl.sum(tl.reshape(acc, [SPLIT, BLOCK_SIZE, CHUNK]), 1)
        blocks = j0 + slots
        tl.store(row_ptrs[:, None] + blocks[None, :], sums,
                 mask=row_ok[:, None] & (blocks < j_end)[None, :])


@triton.jit
def _block_mass_kernel(Q, K, LSE, Bias, Mass,
                        stride_qz, stride_qh, stride_qm, stride_qd,
                        stride_kz, stride_kh, stride_kn, stride_kd,
                        stride_lz, stride_lh, stride_lm,
                        H, seq_len, n_q_blocks, n_k_blocks, qk_scale,
                        HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                        BLOCK_SIZE: tl.constexpr, SPLIT: tl.constexpr,
                        MASK_MODE: tl.constexpr, DOT_PREC: tl.constexpr,
                        USE_TMA: tl.constexpr, CHUNK: tl.constexpr):
    BLOCK_M: tl.constexpr = BLOCK_SIZE * SPLIT
    tl.static_assert(SPLIT == 1 or SPLIT == 2)
    pid_m = tl.program_id(0)
    pid_zh = tl.program_id(1)
    z32 = pid_zh // H
    h32 = pid_zh % H
    off_z = z32.to(tl.int64)
    off_h = h32.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_SIZE)
    offs_d = tl.arange(0, HEAD_DIM_PAD)

    q = load_rows(Q + off_z * stride_qz + off_h * stride_qh, offs_m, offs_d, stride_qm,
                  stride_qd, seq_len, HEAD_DIM, HEAD_DIM_PAD)
    lse = tl.load(LSE + off_z * stride_lz + off_h * stride_lh + offs_m * stride_lm,
                  mask=offs_m < seq_len, other=float("-inf"))
    lse2 = tl.where(lse > float("-inf"), lse * 1.4426950408889634, float("inf"))

    q_block = pid_m * SPLIT
    mass_row0 = Mass + (pid_zh.to(tl.int64) * n_q_blocks + q_block) * n_k_blocks
    rows_left = n_q_blocks - q_block
    k_base = Q if USE_TMA else K + off_z * stride_kz + off_h * stride_kh  # TMA: K is a descriptor
    bias_base = Bias + off_z * n_k_blocks * BLOCK_SIZE
    n_clean = unbiased_blocks(n_k_blocks, MASK_MODE)  # the ragged last block, if any, peeled
    if MASK_MODE != MASK_ALL:
        _mass_loop(q, lse2, K, k_base, bias_base, z32, h32, mass_row0, rows_left, offs_n, offs_d,
                   stride_kn, stride_kd, seq_len, n_k_blocks, 0, n_clean, qk_scale, HEAD_DIM,
                   HEAD_DIM_PAD, BLOCK_SIZE, SPLIT, False, DOT_PREC, USE_TMA, CHUNK)
    if MASK_MODE != MASK_NONE:
        _mass_loop(q, lse2, K, k_base, bias_base, z32, h32, mass_row0, rows_left, offs_n, offs_d,
                   stride_kn, stride_kd, seq_len, n_k_blocks, n_clean, n_k_blocks, qk_scale,
                   HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, SPLIT, True, DOT_PREC, USE_TMA, CHUNK)


def mass_from_lse(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float,
                  block_size: int, key_valid: Optional[torch.Tensor], options: LaunchOptions, *,
                  mass: Optional[torch.Tensor] = None, chunk: int = CHUNK) -> torch.Tensor:
    """Block attention mass fp32 ``[B, H, nq, nk]`` from the natural-log ``lse``.

    Args:
        q, k: ``[B, H, L, D]``, fp16 / bf16 / fp32, any strides (a unit last stride is fastest).
        lse: fp32 ``[B, H, L]``, natural log, ``-inf`` for rows with no valid key.
        scale: softmax scale.
        block_size: 64 or 128.
        key_valid: ``None`` or bool ``[B, L]`` (True = attend).
        options: from :func:`.dispatch.block_mass_options` (warps, stages, register cap,
            ``tma`` for K where its strides allow it).
        mass: optional preallocated contiguous output (tests poison it).
        chunk: key blocks gathered per cross-warp reduction (tests make it small to run many
            chunks on short sequences).
    """
    _common.check_qk(q, k, block_size)
    _common.check_key_valid(key_valid, q)
    B, H, L, D = q.shape
    if lse.dtype != torch.float32 or tuple(lse.shape) != (B, H, L) or lse.device != q.device:
        raise ValueError(f"lse must be fp32 [B, H, L] = {(B, H, L)} on {q.device}; got "
                         f"{lse.dtype} {tuple(lse.shape)} on {lse.device}")
    nb = -(-L // block_size)
    mass = _common.contiguous_out("mass", mass, (B, H, nb, nb), torch.float32, q.device)
    if L == 0 or B * H == 0:
        return mass
    split = 2 if block_size == 64 else 1
    head_dim_pad = _common.padded_head_dim(D)
    descs = _common.tma_descriptors((k,), block_size, head_dim_pad) if options.tma else None
    _block_mass_kernel[(triton.cdiv(L, block_size * split), B * H)](
        q, k if descs is None else descs[0], lse,
        _common.key_bias(key_valid, B, L, block_size, q.device), mass,
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        lse.stride(0), lse.stride(1), lse.stride(2),
        H, L, nb, nb, _common.log2_scale(scale),
        HEAD_DIM=D, HEAD_DIM_PAD=head_dim_pad, BLOCK_SIZE=block_size, SPLIT=split,
        MASK_MODE=_common.mask_mode(key_valid, L, block_size),
        DOT_PREC=_common.dot_precision(q.dtype), USE_TMA=descs is not None, CHUNK=chunk,
        num_warps=options.num_warps, num_stages=options.num_stages, **options.compiler_options(),
    )
    return mass
