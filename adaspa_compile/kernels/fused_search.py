"""Fused search: a flash-attention forward that writes O and the LSE, then the block mass.

One program owns ``BLOCK_M`` query rows of one (batch, head). Loop 1 is the flash forward over
every key tile (online softmax in base 2, ``exp2`` with log2(e) folded into the scale); it ends
with the row LSE. Loop 2 (``with_mass=True``) is the LSE-cached search loop of
:mod:`.cached_search`, run with that fresh LSE while ``q`` is still in registers. Semantics are
those of :func:`adaspa_compile.reference.attention_with_lse_ref` and ``block_mass_ref``.

- dtypes: fp16 / bf16 (fp32 accumulation, ``p`` cast to the input dtype for ``p @ v``) or fp32
  (IEEE fp32 dots; the interpreter path).
- head dims 1..128; 64 and 128 are tuned, others are padded to a power of two (>= 16) by masks.
- block sizes 64 and 128 (the mass map's blocks). With ``block_size=64``, ``BLOCK_M = 128``
  covers two query blocks.
- outputs: ``out`` is ``torch.empty_like(q)`` (keeps q's strides); ``lse`` fp32 ``[B, H, L]``
  natural log, ``-inf`` for rows with no valid key (their output is 0); ``mass`` fp32
  ``[B, H, nq, nk]``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _common
from ._tiles import (MASK_ALL, MASK_NONE, biased_scores, load_rows, online_softmax_step,
                     store_rows, unbiased_blocks)
from .cached_search import CHUNK, _mass_all_blocks

__all__ = ["fused_search"]

MASS_CHUNK = tl.constexpr(CHUNK)


# ----------------------------------------------------------------------------- inner loop
@triton.jit
def _forward_loop(acc, l_i, m_i, q, k_base, v_base, bias_base, offs_n, offs_d, stride_kn,
                  stride_kd, stride_vn, stride_vd, seq_len, j_start, j_end, qk_scale,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                  APPLY_BIAS: tl.constexpr, DOT_PREC: tl.constexpr):
    for j in range(j_start, j_end):
        cols = j * BLOCK_N + offs_n
        k = load_rows(k_base, cols, offs_d, stride_kn, stride_kd, seq_len, HEAD_DIM, HEAD_DIM_PAD)
        qk = biased_scores(q, k, bias_base, cols, APPLY_BIAS, DOT_PREC)
        v = load_rows(v_base, cols, offs_d, stride_vn, stride_vd, seq_len, HEAD_DIM, HEAD_DIM_PAD)
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, qk, qk_scale, v, DOT_PREC)
    return acc, l_i, m_i


# ----------------------------------------------------------------------------- kernel
@triton.jit
def _fused_search_kernel(Q, K, V, Out, LSE, Bias, MassBias, Mass,
                         stride_qz, stride_qh, stride_qm, stride_qd,
                         stride_kz, stride_kh, stride_kn, stride_kd,
                         stride_vz, stride_vh, stride_vn, stride_vd,
                         stride_oz, stride_oh, stride_om, stride_od,
                         H, seq_len, n_k_tiles, n_q_blocks, n_k_blocks, qk_scale,
                         HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, WITH_MASS: tl.constexpr,
                         MASK_MODE: tl.constexpr, DOT_PREC: tl.constexpr):
    SPLIT: tl.constexpr = BLOCK_M // BLOCK_SIZE
    tl.static_assert(BLOCK_M % BLOCK_SIZE == 0)
    pid_m = tl.program_id(0)
    pid_zh = tl.program_id(1)
    off_z = (pid_zh // H).to(tl.int64)
    off_h = (pid_zh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)

    q = load_rows(Q + off_z * stride_qz + off_h * stride_qh, offs_m, offs_d, stride_qm,
                  stride_qd, seq_len, HEAD_DIM, HEAD_DIM_PAD)
    k_base = K + off_z * stride_kz + off_h * stride_kh
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    v_base = V + off_z * stride_vz + off_h * stride_vh
    bias_base = Bias + off_z * n_k_tiles * BLOCK_N
    n_clean = unbiased_blocks(n_k_tiles, MASK_MODE)  # the ragged last tile, if any, peeled
    if MASK_MODE != MASK_ALL:
        acc, l_i, m_i = _forward_loop(acc, l_i, m_i, q, k_base, v_base, bias_base, offs_n, offs_d,
                                      stride_kn, stride_kd, stride_vn, stride_vd, seq_len, 0,
                                      n_clean, qk_scale, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, False,
                                      DOT_PREC)
    if MASK_MODE != MASK_NONE:
        acc, l_i, m_i = _forward_loop(acc, l_i, m_i, q, k_base, v_base, bias_base, offs_n, offs_d,
                                      stride_kn, stride_kd, stride_vn, stride_vd, seq_len, n_clean,
                                      n_k_tiles, qk_scale, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, True,
                                      DOT_PREC)

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    store_rows(Out + off_z * stride_oz + off_h * stride_oh, out.to(Out.dtype.element_ty), offs_m,
               offs_d, stride_om, stride_od, seq_len, HEAD_DIM, HEAD_DIM_PAD)
    lse2 = m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0))
    lse = tl.where(has_keys, lse2 * 0.6931471805599453, float("-inf"))
    tl.store(LSE + pid_zh.to(tl.int64) * seq_len + offs_m, lse, mask=offs_m < seq_len)

    if WITH_MASS:
        lse2 = tl.where(has_keys & (offs_m < seq_len), lse2, float("inf"))
        q_block = pid_m * SPLIT
        mass_row0 = Mass + (pid_zh.to(tl.int64) * n_q_blocks + q_block) * n_k_blocks
        _mass_all_blocks(q, lse2, K, k_base, MassBias + off_z * n_k_blocks * BLOCK_SIZE,
                         pid_zh // H, pid_zh % H, mass_row0, n_q_blocks - q_block, offs_n,
                         offs_d, stride_kn, stride_kd, seq_len, n_k_blocks, qk_scale, HEAD_DIM,
                         HEAD_DIM_PAD, BLOCK_SIZE, SPLIT, MASK_MODE, DOT_PREC, False,
                         MASS_CHUNK)


# ----------------------------------------------------------------------------- launcher
def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, block_size: int,
            key_valid: Optional[torch.Tensor], with_mass: bool, out: Optional[torch.Tensor],
            lse: Optional[torch.Tensor], mass: Optional[torch.Tensor],
            block_n: Optional[int] = None, num_warps: Optional[int] = None,
            num_stages: Optional[int] = None
            ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    _common.check_qk(q, k, block_size, v)
    _common.check_scale(scale)
    _common.check_key_valid(key_valid, q)
    B, H, L, D = q.shape
    nb = -(-L // block_size)
    _common.check_out("out", out, tuple(q.shape), q.dtype, q.device)
    _common.check_out("lse", lse, (B, H, L), torch.float32, q.device)
    if with_mass:
        _common.check_out("mass", mass, (B, H, nb, nb), torch.float32, q.device)
    if out is None:
        out = torch.empty_like(q)
    if lse is None:
        lse = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
    if not lse.is_contiguous() or (mass is not None and not mass.is_contiguous()):
        raise ValueError("lse and mass must be contiguous")
    if with_mass and mass is None:
        mass = torch.empty(B, H, nb, nb, dtype=torch.float32, device=q.device)
    if L == 0 or B * H == 0:
        return out, lse, mass if with_mass else None

    block_m = 128
    # The mass loop walks blocks of block_size; the forward loop may use another tile width.
    block_n = block_n or block_size
    head_dim_pad = _common.padded_head_dim(D)
    if with_mass and block_n != block_size:
        raise ValueError("the mass loop needs block_n == block_size")
    bias = _common.key_bias(key_valid, B, L, block_n, q.device)
    default_warps, default_stages = _common.launch_config(
        "fused" if with_mass else "attn", head_dim_pad, block_size)
    grid = (triton.cdiv(L, block_m), B * H)
    _fused_search_kernel[grid](
        q, k, v, out, lse, bias, bias,
        mass if with_mass else lse,  # unused when WITH_MASS is False
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        H, L, triton.cdiv(L, block_n), nb, nb, _common.log2_scale(scale),
        HEAD_DIM=D, HEAD_DIM_PAD=head_dim_pad, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_SIZE=block_size, WITH_MASS=with_mass,
        MASK_MODE=_common.mask_mode(key_valid, L, block_n), DOT_PREC=_common.dot_precision(q.dtype),
        num_warps=num_warps or default_warps,
        num_stages=num_stages or default_stages,
    )
    return out, lse, mass if with_mass else None


# ----------------------------------------------------------------------------- public
def fused_search(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                 block_size: int, key_valid: Optional[torch.Tensor], with_mass: bool = True, *,
                 out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None,
                 mass: Optional[torch.Tensor] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Dense attention ``(out, lse, mass)`` in one kernel; ``mass`` is ``None`` if not ``with_mass``.

    Args:
        q, k, v: ``[B, H, L, D]``, one dtype among fp16 / bf16 / fp32, any strides.
        scale: softmax scale.
        block_size: 64 or 128, the side of the mass map's blocks.
        key_valid: ``None`` or bool ``[B, L]`` (True = attend).
        with_mass: also compute the block mass (``False``: plain attention with LSE).
        out, lse, mass: optional preallocated outputs (tests poison them).
    """
    return _launch(q, k, v, scale, block_size, key_valid, with_mass, out, lse, mass)
