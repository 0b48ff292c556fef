"""Dense attention that also writes the per-row log-sum-exp: the exact search's dense pass.

A flash-attention forward: one program owns ``BLOCK_M`` query rows of one (batch, head) and walks
every key tile with an online softmax in base 2 (``exp2``, log2(e) folded into the scale); it
ends with the row LSE (fp32 ``[B, H, L]``, natural log). Semantics are those of
:func:`adaspa_compile.reference.attention_with_lse_ref`; the conventions are in
:mod:`adaspa_compile.kernels`. Where cuDNN or FlashAttention-4 is faster, they run this pass
instead (:func:`.dispatch.dense_pass_order`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _common
from ._tiles import (MASK_ALL, MASK_NONE, biased_scores, load_rows, online_softmax_step,
                     store_rows, unbiased_blocks)
from .dispatch import LaunchOptions

__all__ = ["attention_with_lse"]

BLOCK_M = 128  # query rows per program
BLOCK_N = 64  # keys per tile


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


@triton.jit
def _attention_lse_kernel(Q, K, V, Out, LSE, Bias,
                          stride_qz, stride_qh, stride_qm, stride_qd,
                          stride_kz, stride_kh, stride_kn, stride_kd,
                          stride_vz, stride_vh, stride_vn, stride_vd,
                          stride_oz, stride_oh, stride_om, stride_od,
                          H, seq_len, n_k_tiles, qk_scale,
                          HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          MASK_MODE: tl.constexpr, DOT_PREC: tl.constexpr):
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


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                       key_valid: Optional[torch.Tensor], options: LaunchOptions, *,
                       out: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense attention ``(out, lse)``.

    Args:
        q, k, v: ``[B, H, L, D]``, one dtype among fp16 / bf16 / fp32, any strides.
        scale: softmax scale (positive).
        key_valid: ``None`` or bool ``[B, L]`` (True = attend).
        options: from :func:`.dispatch.attention_lse_options` (warps and stages).
        out, lse: optional preallocated outputs (tests poison them), ``lse`` contiguous; by
            default ``torch.empty_like(q)`` (q's strides) and a new ``lse``.
    """
    _common.check_attention_inputs(q, k, v, scale, None, key_valid)
    B, H, L, D = q.shape
    lse = _common.contiguous_out("lse", lse, (B, H, L), torch.float32, q.device)
    out = _common.output_like(q, out)
    if L == 0 or B * H == 0:
        return out, lse
    _attention_lse_kernel[(triton.cdiv(L, BLOCK_M), B * H)](
        q, k, v, out, lse, _common.key_bias(key_valid, B, L, BLOCK_N, q.device),
        q.stride(0), q.stride(1), q.stride(2), q.stride(3),
        k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        v.stride(0), v.stride(1), v.stride(2), v.stride(3),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        H, L, triton.cdiv(L, BLOCK_N), _common.log2_scale(scale),
        HEAD_DIM=D, HEAD_DIM_PAD=_common.padded_head_dim(D), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        MASK_MODE=_common.mask_mode(key_valid, L, BLOCK_N),
        DOT_PREC=_common.dot_precision(q.dtype),
        num_warps=options.num_warps, num_stages=options.num_stages, **options.compiler_options(),
    )
    return out, lse
