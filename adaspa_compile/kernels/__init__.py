"""Triton kernels of AdaSpa: fused search, LSE-cached search, block-sparse attention, the
mask-to-index expansion that feeds the block-sparse kernel, and the two passes of the block
selection (sorting each mass row's candidates; packing each row's best blocks into mask bits);
block-sparse attention also by pairs of query blocks that share key blocks (``shared_pairs``)
and, on Hopper at head dim 128, by a Gluon kernel (``block_sparse_hopper``).

Each kernel lives in its own file with its launcher; their meaning is fixed by the pure-PyTorch
references in :mod:`adaspa_compile.reference` (attention, mass, index lists) and
:mod:`adaspa_compile.selection` (the selection passes). ``cudnn_attention`` and
``fa4_attention`` launch other libraries' dense attention for the fused search. Importing this
package never fails: without Triton the launchers are absent and :func:`kernel_support` says why.

Supported: CUDA tensors (or any device under ``TRITON_INTERPRET=1``), fp16 / bf16 / fp32, head
dims 1..128 (64 and 128 tuned), block sizes 64 and 128.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import _common

__all__ = ["kernel_support", "fused_search", "cached_search", "block_sparse_attention",
           "uses_hopper_kernel", "prefer_pairs", "shared_pair_attention", "shared_pair_lists",
           "mask_indices", "sorted_candidate_mass", "keep_blocks",
           "SELECTION_MAX_BLOCKS", "TRITON_IMPORT_ERROR"]

try:
    import triton  # noqa: F401

    from .block_sparse import block_sparse_attention, uses_hopper_kernel
    from .cached_search import cached_search
    from .candidate_sort import MAX_BLOCKS as SELECTION_MAX_BLOCKS
    from .candidate_sort import sorted_candidate_mass
    from .fused_search import fused_search
    from .keep_blocks import keep_blocks
    from .mask_indices import mask_indices
    from .shared_pairs import prefer_pairs, shared_pair_attention, shared_pair_lists

    TRITON_IMPORT_ERROR = None
except ImportError as exc:  # CPU installs without Triton
    TRITON_IMPORT_ERROR = f"triton is not importable ({exc})"

    def _missing(*_args, **_kwargs):
        raise RuntimeError(f"adaspa_compile.kernels: {TRITON_IMPORT_ERROR}")

    fused_search = cached_search = block_sparse_attention = mask_indices = _missing
    uses_hopper_kernel = _missing
    prefer_pairs = sorted_candidate_mass = keep_blocks = _missing
    shared_pair_attention = shared_pair_lists = _missing
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
