"""Q, K and V to FP8 for the FP8 block-sparse kernel, in the layouts it reads.

One program rounds one block of ``block_size`` tokens of one (batch, head): Q and K to
``float8_e4m3fn`` with one fp32 scale per block (its largest magnitude maps to 448), K after
subtracting its per-head mean over tokens; V with given per-channel scales, written transposed
(``[B, H, D, L]``, the ``p @ v`` reduction dim contiguous, as FP8 tensor cores need). Outputs are
padded to whole blocks with zeros. The values are those of
:func:`adaspa_compile.reference.quantize_fp8_ref`.

Under Triton's interpreter the rounding to FP8 is not round-to-nearest, so there
:func:`quantize_fp8` rounds with PyTorch (the same values, read back into the kernel's layouts).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import reference
from . import _common
from ._tiles import load_rows

__all__ = ["Fp8Operands", "quantize_fp8"]

FP8_MAX = tl.constexpr(reference.FP8_MAX)


class Fp8Operands(NamedTuple):
    """FP8 operands of the block-sparse kernel: ``q``, ``k`` ``[B, H, nb * block_size, D]`` and
    ``v_t`` ``[B, H, D, nb * block_size]`` (contiguous, zero past the sequence), with fp32
    ``q_scale [B, H, nb]``, ``k_scale [B, H, nb]`` and ``v_scale [B, H, D]``."""

    q: torch.Tensor
    k: torch.Tensor
    v_t: torch.Tensor
    q_scale: torch.Tensor
    k_scale: torch.Tensor
    v_scale: torch.Tensor


@triton.jit
def _quantize_kernel(X, Shift, ChannelScale, Out, Scale,
                     stride_xz, stride_xh, stride_xl, stride_xd,
                     stride_oz, stride_oh, stride_ol, stride_od,
                     H, seq_len, n_blocks,
                     HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                     BLOCK_SIZE: tl.constexpr, SHIFT: tl.constexpr, PER_CHANNEL: tl.constexpr):
    zh = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    z = zh // H
    h = zh % H
    rows = blk * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM
    x = load_rows(X + z * stride_xz + h * stride_xh, rows, offs_d, stride_xl, stride_xd, seq_len,
                  HEAD_DIM, HEAD_DIM_PAD).to(tl.float32)
    if SHIFT:  # rows past the end stay 0
        mean = tl.load(Shift + zh * HEAD_DIM + offs_d, mask=d_ok, other=0.0)
        x = tl.where(rows[:, None] < seq_len, x - mean[None, :], 0.0)
    if PER_CHANNEL:
        scale = tl.load(ChannelScale + zh * HEAD_DIM + offs_d, mask=d_ok, other=1.0)
        y = x / scale[None, :]
    else:
        amax = tl.max(tl.max(tl.abs(x), 1), 0)
        scale = tl.where(amax > 0.0, amax / FP8_MAX, 1.0)
        tl.store(Scale + zh * n_blocks + blk, scale)
        y = x / scale
    ptrs = Out + z * stride_oz + h * stride_oh + rows[:, None] * stride_ol \
        + offs_d[None, :] * stride_od
    tl.store(ptrs, y.to(Out.dtype.element_ty), mask=d_ok[None, :])


def _round_blocks(x: torch.Tensor, out: torch.Tensor, block_size: int, *, block_scale=None,
                  shift=None, channel_scale=None) -> None:
    """Launch :func:`_quantize_kernel` on ``x [B, H, L, D]`` into ``out`` (read through its
    strides): per block into ``block_scale [B, H, nb]``, or with ``channel_scale [B, H, D]``."""
    B, H, L, D = x.shape
    nb = -(-L // block_size)
    scale = block_scale if block_scale is not None else channel_scale
    o = out.stride()
    _quantize_kernel[(B * H, nb)](
        x, shift if shift is not None else scale, scale, out, scale,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3), o[0], o[1], o[2], o[3],
        H, L, nb, HEAD_DIM=D, HEAD_DIM_PAD=_common.padded_head_dim(D), BLOCK_SIZE=block_size,
        SHIFT=shift is not None, PER_CHANNEL=block_scale is None)


def quantize_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 block_size: int) -> Fp8Operands:
    """Round ``q, k, v [B, H, L, D]`` (one shape) as :func:`reference.quantize_fp8_ref` does,
    into the layouts and padding of :class:`Fp8Operands`."""
    B, H, L, D = q.shape
    padded = -(-L // block_size) * block_size
    # Zeros first: the tail of the last block must be finite (it is masked, but 0 * NaN is NaN),
    # and this holds whatever the kernel writes there.
    q8, k8 = (torch.zeros(B, H, padded, D, dtype=reference.FP8_DTYPE, device=q.device)
              for _ in "qk")
    v_t = torch.zeros(B, H, D, padded, dtype=reference.FP8_DTYPE, device=q.device)
    if _common.interpreting():
        ref = reference.quantize_fp8_ref(q, k, v, block_size)
        q8[:, :, :L], k8[:, :, :L], v_t.transpose(2, 3)[:, :, :L] = ref.q, ref.k, ref.v
        return Fp8Operands(q8, k8, v_t, ref.q_scale, ref.k_scale, ref.v_scale)
    q_scale, k_scale = (torch.empty(B, H, padded // block_size, dtype=torch.float32,
                                    device=q.device) for _ in "qk")
    v_scale = reference.fp8_scale(torch.linalg.vector_norm(v, float("inf"), dim=2))
    _round_blocks(q, q8, block_size, block_scale=q_scale)
    _round_blocks(k, k8, block_size, block_scale=k_scale,
                  shift=k.mean(dim=2, dtype=torch.float32))
    _round_blocks(v, v_t.transpose(2, 3), block_size, channel_scale=v_scale)
    return Fp8Operands(q8, k8, v_t, q_scale, k_scale, v_scale)
