"""Triton kernels of AdaSpa, one per job, each in its own file with its launcher:

- ``attention_lse``: dense attention with the row LSE (the exact search's dense pass, where
  FlashAttention-4 (``fa4_attention``) or cuDNN (``cudnn_attention``) is not faster);
- ``block_mass``: the block attention mass from an LSE (the exact and the cached search);
- ``block_sparse``: block-sparse attention (also in FP8, with ``fp8_operands`` rounding its
  operands), and on Hopper ``block_sparse_hopper`` (Gluon);
- ``mask_indices``: packed mask bits to the index lists the block-sparse kernels walk;
- ``candidate_sort`` and ``keep_blocks``: the two passes of the block selection.

:mod:`.dispatch` decides which executor runs a call and with which launch options; each module
names the pure-PyTorch reference that fixes its meaning. Importing this package never fails:
without Triton the launchers are absent and :func:`kernel_support` says why.

Conventions of the attention kernels (attention+LSE, block mass, block-sparse), stated once here:

- CUDA tensors (or any device under ``TRITON_INTERPRET=1``) ``[B, H, L, D]``, read through their
  strides (the diffusers BSHD memory viewed as BHSD included); K (and V) through tensor
  descriptors (TMA) where the launch options ask for it and the strides allow it;
- fp16 / bf16 with fp32 accumulation (``p`` cast to the input dtype for ``p @ v``), or fp32
  with IEEE fp32 dots (the interpreter path); ``block_sparse_fp8`` takes the same inputs and
  computes in FP8 (head dims 64 and 128), as ``reference.block_sparse_attention_fp8_ref`` says;
- head dims 1..128: 64 and 128 are tuned, others padded to a power of two (>= 16) by masks;
- block sizes 64 and 128, the key tiles of the mass and block-sparse kernels;
- key padding as bool ``key_valid [B, L]`` (True = attend); padded keys add nothing, and a row
  with no valid key gets output 0 (LSE ``-inf``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _common, dispatch

__all__ = ["kernel_support", "attention_with_lse", "mass_from_lse", "block_sparse_triton",
           "block_sparse_fp8", "quantize_fp8", "block_sparse_gluon", "GLUON_AVAILABLE",
           "mask_to_indices", "sorted_candidate_mass",
           "kept_block_bits", "SELECTION_MAX_BLOCKS", "TRITON_IMPORT_ERROR", "dispatch"]

try:  # each kernel module imports triton
    from .attention_lse import attention_with_lse
    from .block_mass import mass_from_lse
    from .block_sparse import block_sparse_fp8, block_sparse_triton
    from .block_sparse_hopper import AVAILABLE as GLUON_AVAILABLE
    from .block_sparse_hopper import block_sparse_gluon
    from .candidate_sort import MAX_BLOCKS as SELECTION_MAX_BLOCKS
    from .candidate_sort import sorted_candidate_mass
    from .keep_blocks import kept_block_bits
    from .mask_indices import mask_to_indices
    from .fp8_operands import quantize_fp8

    TRITON_IMPORT_ERROR = None
except ImportError as exc:  # CPU installs without Triton
    TRITON_IMPORT_ERROR = f"triton is not importable ({exc})"

    def _missing(*_args, **_kwargs):
        raise RuntimeError(f"adaspa_compile.kernels: {TRITON_IMPORT_ERROR}")

    attention_with_lse = mass_from_lse = block_sparse_triton = block_sparse_gluon = _missing
    block_sparse_fp8 = quantize_fp8 = _missing
    mask_to_indices = sorted_candidate_mass = kept_block_bits = _missing
    GLUON_AVAILABLE = False
    SELECTION_MAX_BLOCKS = 0


def kernel_support(q: torch.Tensor, block_size: int,
                   scale: Optional[float] = None) -> Tuple[bool, str]:
    """``(True, "")`` when the kernels can run ``q`` with ``block_size`` (and the softmax
    ``scale``, when given), else ``(False, reason)``."""
    if TRITON_IMPORT_ERROR is not None:
        return False, TRITON_IMPORT_ERROR
    if not q.is_cuda and not _common.interpreting():
        return False, f"device {q.device} is not CUDA (and TRITON_INTERPRET is not set)"
    if q.dtype not in _common.SUPPORTED_DTYPES:
        return False, f"dtype {q.dtype} is not one of fp16, bf16, fp32"
    if q.dim() != 4:
        return False, f"q must be [B, H, L, D], got shape {tuple(q.shape)}"
    d = q.shape[-1]
    if not 1 <= d <= _common.MAX_HEAD_DIM:
        return False, f"head dim {d} is outside 1..{_common.MAX_HEAD_DIM}"
    if block_size not in _common.SUPPORTED_BLOCK_SIZES:
        return False, f"block_size {block_size} is not one of {_common.SUPPORTED_BLOCK_SIZES}"
    if scale is not None and not _common.scale_supported(scale):
        return False, f"softmax scale {scale!r} is not positive and finite"
    if q.is_cuda and torch.cuda.get_device_capability(q.device)[0] < 8:
        return False, "the kernels need compute capability 8.0 or newer (bf16 tensor cores)"
    return True, ""
