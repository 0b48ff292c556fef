"""Host-side helpers of the kernel launchers: input checks, key-padding tables, TMA descriptors,
and the block-sparse kernels' index lists (checks, launch order, key-bias ranges).
"""

from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_BLOCK_SIZES = (64, 128)
MAX_HEAD_DIM = 128


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def padded_head_dim(d: int) -> int:
    """The power of two (at least 16, the smallest ``tl.dot`` K) that the kernels tile ``d`` to."""
    return max(16, 1 << (d - 1).bit_length())


def check_qk(q: torch.Tensor, k: torch.Tensor, block_size: Optional[int],
             v: Optional[torch.Tensor] = None) -> None:
    """``ValueError`` for inputs the kernels cannot take (a ``block_size`` of None is skipped)."""
    tensors = (q, k) if v is None else (q, k, v)
    names = "q, k" if v is None else "q, k, v"
    if any(t.dim() != 4 for t in tensors):
        raise ValueError(f"{names} must be [B, H, L, D]; got {[tuple(t.shape) for t in tensors]}")
    if any(t.shape != q.shape for t in tensors):
        raise ValueError(f"{names} must have one shape [B, H, L, D] (repeat k and v over heads for "
                         f"grouped-query attention); got {[tuple(t.shape) for t in tensors]}")
    if q.dtype not in SUPPORTED_DTYPES or any(t.dtype != q.dtype for t in tensors):
        raise ValueError(f"{names} must share one dtype among fp16, bf16, fp32; got "
                         f"{[t.dtype for t in tensors]}")
    if any(t.device != q.device for t in tensors):
        raise ValueError(f"{names} must be on one device; got {[t.device for t in tensors]}")
    d = q.shape[-1]
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {d} is not supported by the Triton kernels (1..{MAX_HEAD_DIM}); "
                         "use the reference in adaspa_compile.reference")
    if block_size is not None and block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES} for the Triton "
                         f"kernels, got {block_size!r}")


def scale_supported(scale: float) -> bool:
    """The attention kernels take the row max on unscaled scores: the scale must be positive."""
    return math.isfinite(scale) and scale > 0


def check_key_valid(key_valid: Optional[torch.Tensor], q: torch.Tensor) -> None:
    if key_valid is None:
        return
    B, _, L, _ = q.shape
    if key_valid.dtype != torch.bool or tuple(key_valid.shape) != (B, L):
        raise ValueError(f"key_valid must be bool [B, L] = [{B}, {L}] (True = attend); got "
                         f"{key_valid.dtype} {tuple(key_valid.shape)}")
    if key_valid.device != q.device:
        raise ValueError(f"key_valid is on {key_valid.device}, q on {q.device}")


def check_out(name: str, t: Optional[torch.Tensor], shape: Tuple[int, ...], dtype: torch.dtype,
              device: torch.device) -> None:
    """Check a caller-provided output buffer (used by tests to poison outputs)."""
    if t is None:
        return
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != device:
        raise ValueError(f"{name} must be {dtype} {tuple(shape)} on {device}; got {t.dtype} "
                         f"{tuple(t.shape)} on {t.device}")


def output_like(q: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    """``out`` checked to be shaped, typed and placed like ``q``, or a new ``empty_like(q)``."""
    check_out("out", out, tuple(q.shape), q.dtype, q.device)
    return torch.empty_like(q) if out is None else out


def contiguous_out(name: str, t: Optional[torch.Tensor], shape: Tuple[int, ...],
                   dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``t`` checked as :func:`check_out` does and to be contiguous, or a new ``torch.empty``."""
    check_out(name, t, shape, dtype, device)
    if t is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return t


def check_attention_inputs(q, k, v, scale: float, block_size: Optional[int],
                           key_valid: Optional[torch.Tensor]) -> None:
    """``ValueError`` for anything the attention kernels cannot take (before any launch)."""
    check_qk(q, k, block_size, v)
    if not scale_supported(scale):
        raise ValueError(f"the Triton kernels need a positive finite softmax scale, got {scale!r}; "
                         "use the reference in adaspa_compile.reference")
    check_key_valid(key_valid, q)


def key_bias(key_valid: Optional[torch.Tensor], batch: int, seq_len: int, block_n: int,
             device: torch.device) -> torch.Tensor:
    """Additive key bias fp32 ``[B, nk * block_n]``: 0 for a valid key, ``-inf`` for a padded key
    or a position past ``seq_len``."""
    nk = -(-seq_len // block_n)
    bias = torch.full((batch, nk * block_n), float("-inf"), dtype=torch.float32, device=device)
    if key_valid is None:
        bias[:, :seq_len] = 0.0
    else:
        bias[:, :seq_len].masked_fill_(key_valid, 0.0)
    return bias


MASK_NONE, MASK_LAST, MASK_ALL, MASK_RANGE = 0, 1, 2, 3


def mask_mode(key_valid: Optional[torch.Tensor], seq_len: int, block_n: int) -> int:
    """Which key tiles need the bias: none, only the ragged last one, or all (see ``_tiles``)."""
    if key_valid is not None:
        return MASK_ALL
    return MASK_NONE if seq_len % block_n == 0 else MASK_LAST


def log2_scale(scale: float) -> float:
    """Softmax scale with log2(e) folded in, so kernels use ``exp2``."""
    return float(scale) * 1.4426950408889634


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get IEEE fp32 dots (no tf32), 16-bit inputs the tensor cores' native path."""
    return "ieee" if dtype == torch.float32 else "tf32"


def tma_compatible(t: torch.Tensor) -> bool:
    """Whether ``t``'s strides and base suit a tensor descriptor (last dim contiguous, the other
    strides and the base 16-byte aligned)."""
    item = t.element_size()
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(
        (s * item) % 16 == 0 for s in t.stride()[:-1])


def tma_descriptors(tensors: Sequence[torch.Tensor], block_size: int,
                    head_dim_pad: int) -> Optional[List]:
    """Tensor descriptors over ``[B, H, L, D]`` tensors (K, V), one block per load; None where a
    tensor is not :func:`tma_compatible` or Triton has none."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    if not all(tma_compatible(t) for t in tensors):
        return None
    return [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, block_size, head_dim_pad])
            for t in tensors]


def launch_lists(q, counts: torch.Tensor, indices: torch.Tensor, block_size: int, out):
    """``(out, indices, nb)`` for a block-sparse launch of one program per query block: the lists
    checked against ``q``, ``out`` as given (checked) or new, and ``indices`` given one slot where
    no row keeps anything (every output row is then 0; the kernels still take a slot's address)."""
    B, H, L = q.shape[:3]
    nb = -(-L // block_size)
    if counts.dtype not in (torch.int32, torch.int64) or tuple(counts.shape) != (B, H, nb):
        raise ValueError(f"counts must be int32 [B, H, nq] = {(B, H, nb)}; got "
                         f"{counts.dtype} {tuple(counts.shape)}")
    if indices.dtype not in (torch.int32, torch.int64) or indices.dim() != 4 \
            or tuple(indices.shape[:3]) != (B, H, nb) or indices.shape[3] > nb:
        raise ValueError(f"indices must be int32 [B, H, nq, max_kept] with nq={nb}, "
                         f"max_kept <= {nb}; got {indices.dtype} {tuple(indices.shape)}")
    if counts.device != q.device or indices.device != q.device:
        raise ValueError(f"counts and indices must be on {q.device}")
    out = output_like(q, out)
    if indices.shape[3] == 0:
        indices = torch.zeros(B, H, nb, 1, dtype=torch.int32, device=q.device)
    return out, indices, nb


def work_order(counts: torch.Tensor) -> torch.Tensor:
    """Flattened (b, h, list) items by their work ``counts``, heaviest first; ties keep their
    order (a stable sort), which keeps a head's K/V hot in L2."""
    _, order = torch.sort(counts.reshape(-1), descending=True, stable=True)
    return order.to(torch.int32)


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
