"""Public functional ops: dense attention with LSE, block mass, block-sparse attention.

On CUDA tensors they run the Triton kernels of :mod:`adaspa_compile.kernels`; elsewhere, or for
inputs the kernels do not support, the pure-PyTorch reference of :mod:`adaspa_compile.reference`
(with one log line per reason).
"""

from __future__ import annotations

import logging
from typing import Optional, Tuple, Union

import torch

from . import reference
from .blockmask import BlockMask
from .config import PRECISIONS
from .logs import log_once

__all__ = ["attention_with_lse", "block_mass", "block_sparse_attention", "key_valid_from_mask"]

logger = logging.getLogger(__name__)

# An additive key-padding mask marks a padded key with a value at or below this.
PADDING_BIAS = -1.0e4


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: Optional[torch.Tensor] = None) -> None:
    tensors = (q, k) if v is None else (q, k, v)
    if any(t.dim() != 4 for t in tensors):
        raise ValueError(f"q, k, v must be [B, H, L, D]; got shapes {[tuple(t.shape) for t in tensors]}")
    if k.shape != q.shape or (v is not None and v.shape[:3] != q.shape[:3]):
        raise ValueError("q, k (and v) must share [B, H, L] and q, k their head dim; got "
                         f"{[tuple(t.shape) for t in tensors]}. Grouped-query attention is not "
                         "supported: repeat k and v over heads first")
    if not q.is_floating_point() or any(t.dtype != q.dtype for t in tensors):
        raise ValueError(f"q, k, v must share one floating dtype, got {[t.dtype for t in tensors]}")


def key_valid_from_mask(mask: Optional[torch.Tensor], batch: int, length: int) -> Optional[torch.Tensor]:
    """Turn a key-padding mask into bool ``[B, L]`` (True = attend), or ``None``.

    Accepts bool (True = attend, as SDPA) or additive float masks (a value <= -1e4 marks padding),
    shaped ``[B, L]``, ``[B, 1, 1, L]`` or anything broadcastable to ``[B, 1, 1, L]``.
    """
    if mask is None:
        return None
    if mask.dim() == 2:
        mask = mask[:, None, None, :]
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1 or mask.shape[3] != length \
            or mask.shape[0] not in (1, batch):
        raise ValueError(f"key_padding_mask must be [B, L] or broadcastable [B, 1, 1, L] with "
                         f"B={batch}, L={length}; got {tuple(mask.shape)}")
    valid = mask if mask.dtype == torch.bool else mask > PADDING_BIAS
    return valid[:, 0, 0, :].expand(batch, length)


def _resolve_scale(scale: Optional[float], q: torch.Tensor) -> float:
    return float(scale) if scale is not None else q.shape[-1] ** -0.5


def _kernels_for(q: torch.Tensor, block_size: int, scale: float):
    """The kernels module when it can run ``q``, else ``None`` (logged once per reason)."""
    if not q.is_cuda:
        return None
    from . import kernels

    ok, reason = kernels.kernel_support(q, block_size, scale)
    if ok:
        return kernels
    log_once(logger, f"adaspa: CUDA input runs the PyTorch reference: {reason}")
    return None


def fused_search(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, block_size: int,
                 key_valid: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dense output, LSE and block mass: the exact search.

    On CUDA the dense pass runs the first of FlashAttention-4, cuDNN and our kernel that takes
    the call (``kernels.dispatch.dense_pass_order``), then the block-mass kernel reads its LSE.
    """
    kernels = _kernels_for(q, block_size, scale)
    if kernels is None:
        out, lse = reference.attention_with_lse_ref(q, k, v, scale, key_valid, block_size)
        return out, lse, reference.block_mass_ref(q, k, lse, scale, block_size, key_valid)
    call = kernels.dispatch.Call.of(q, block_size, key_valid, tensors=(k,))
    out, lse = _dense_pass(kernels, q, k, v, scale, key_valid, call)
    return out, lse, _mass_from_lse(kernels, q, k, lse, scale, block_size, key_valid, call)


def _dense_pass(kernels, q, k, v, scale: float, key_valid: Optional[torch.Tensor],
                call) -> Tuple[torch.Tensor, torch.Tensor]:
    from .kernels.cudnn_attention import cudnn_attention_with_lse
    from .kernels.fa4_attention import fa4_attention_with_lse

    dispatch = kernels.dispatch
    for executor in dispatch.dense_pass_order(call):
        if executor == "fa4":
            dense = fa4_attention_with_lse(q, k, v, scale, key_valid)
        elif executor == "cudnn":
            dense = cudnn_attention_with_lse(q, k, v, scale, key_valid)
        else:
            dense = kernels.attention_with_lse(q, k, v, scale, key_valid,
                                               dispatch.attention_lse_options(call))
        if dense is not None:
            return dense
    raise AssertionError("the Triton kernel takes every call the kernels support")


def cached_search(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float,
                  block_size: int, key_valid: Optional[torch.Tensor]) -> torch.Tensor:
    """Block mass from a cached LSE (no V, no output)."""
    kernels = _kernels_for(q, block_size, scale)
    if kernels is None:
        return reference.block_mass_ref(q, k, lse, scale, block_size, key_valid)
    call = kernels.dispatch.Call.of(q, block_size, key_valid, tensors=(k,))
    return _mass_from_lse(kernels, q, k, lse, scale, block_size, key_valid, call)


def _mass_from_lse(kernels, q, k, lse: torch.Tensor, scale: float, block_size: int,
                   key_valid: Optional[torch.Tensor], call) -> torch.Tensor:
    """The block-mass kernel with the options the dispatch gives ``call``."""
    return kernels.mass_from_lse(q, k, lse, scale, block_size, key_valid,
                                 kernels.dispatch.block_mass_options(call))


def sparse_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockMask,
                   scale: float, key_valid: Optional[torch.Tensor],
                   precision: str = "bf16") -> torch.Tensor:
    """Block-sparse attention over the kept blocks of ``mask``, in the inputs' dtype or (with
    ``precision="fp8"``) with Q, K, V and the probabilities rounded to FP8.

    With the kernels, the index lists come from the mask-to-index kernel (one launch, no host
    sync, no dense ``[B, H, nq, nk]`` intermediate) and ``kernels.dispatch.block_sparse_plan``
    picks the executor and its options. Without kernels the lists come from the reference
    ``BlockMask.to_indices()``.
    """
    fp8 = precision == "fp8"
    kernels = _kernels_for(q, mask.block_size, scale)
    call = None if kernels is None else kernels.dispatch.Call.of(
        q, mask.block_size, key_valid, full_mask=mask.is_full, tensors=(q, k, v), fp8=fp8)
    refusal = kernels.dispatch.fp8_refusal(call.arch, call.head_dim) if call and fp8 else ""
    if refusal:
        log_once(logger, f"adaspa: precision='fp8' runs the PyTorch reference: {refusal}")
    if kernels is None or refusal:
        counts, indices = mask.to_indices()
        ref = reference.block_sparse_attention_fp8_ref if fp8 \
            else reference.block_sparse_attention_ref
        return ref(q, k, v, counts, indices, scale, mask.block_size, key_valid)
    counts, indices = kernels.mask_to_indices(mask.bits, mask.num_kv_blocks, mask.max_kept)
    plan = kernels.dispatch.block_sparse_plan(call, kernels.GLUON_AVAILABLE)
    if plan.executor == "gluon":
        return kernels.block_sparse_gluon(q, k, v, counts, indices, scale, key_valid,
                                          plan.options)
    launch = kernels.block_sparse_fp8 if plan.executor == "triton-fp8" \
        else kernels.block_sparse_triton
    return launch(q, k, v, counts, indices, scale, mask.block_size, key_valid, plan.options)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                       scale: Optional[float] = None,
                       key_padding_mask: Optional[torch.Tensor] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense attention that also returns the per-row log-sum-exp.

    Args:
        q, k, v: ``[B, H, L, D]``.
        scale: softmax scale, default ``D ** -0.5``.
        key_padding_mask: bool (True = attend) or additive, ``[B, L]`` or ``[B, 1, 1, L]``.

    Returns:
        ``(out, lse)``: ``out`` like ``q``; ``lse`` fp32 ``[B, H, L]``, natural log, ``-inf`` for
        rows with no valid key (their output is 0).
    """
    _check_qkv(q, k, v)
    s = _resolve_scale(scale, q)
    valid = key_valid_from_mask(key_padding_mask, q.shape[0], q.shape[2])
    kernels = _kernels_for(q, 64, s)
    if kernels is not None:
        options = kernels.dispatch.attention_lse_options(kernels.dispatch.Call.of(q, 64, valid))
        return kernels.attention_with_lse(q, k, v, s, valid, options)
    return reference.attention_with_lse_ref(q, k, v, s, valid)


def block_mass(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, *, block_size: int,
               scale: Optional[float] = None,
               key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Exact attention probability mass of every (query block, key block): fp32 ``[B,H,nq,nk]``.

    ``lse`` is the one :func:`attention_with_lse` returns (it may come from an earlier step: the
    cached-LSE search). Each row of the result sums to the number of valid rows in the block.
    """
    _check_qkv(q, k)
    if lse.shape != q.shape[:3]:
        raise ValueError(f"lse must be [B, H, L] = {tuple(q.shape[:3])}, got {tuple(lse.shape)}")
    _check_block_size(block_size)
    valid = key_valid_from_mask(key_padding_mask, q.shape[0], q.shape[2])
    return cached_search(q, k, lse.float(), _resolve_scale(scale, q), block_size, valid)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           block_mask: Union[torch.Tensor, BlockMask], *, block_size: int,
                           scale: Optional[float] = None,
                           key_padding_mask: Optional[torch.Tensor] = None,
                           precision: str = "bf16") -> torch.Tensor:
    """Attention that visits only the kept key blocks of each query block.

    ``block_mask`` is a bool ``[B, H, nq, nk]`` tensor (True = keep) or a :class:`BlockMask`;
    ``q, k, v`` are ``[B, H, L, D]`` (diffusers' ``[B, L, H, D]`` tensors: ``.transpose(1, 2)``).
    ``block_size`` takes the values the backend takes: a power of two from 16 to 256.
    A query row that keeps no block, or whose kept keys are all padded, gets output 0.
    ``precision``: ``"bf16"`` computes in the inputs' dtype; ``"fp8"`` rounds Q, K (smoothed)
    and V to FP8 with per-block (V: per-channel) scales, as
    :func:`adaspa_compile.reference.block_sparse_attention_fp8_ref` specifies.
    """
    _check_qkv(q, k, v)
    _check_block_size(block_size)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    B, H, L, _ = q.shape
    nb = -(-L // block_size)
    if isinstance(block_mask, torch.Tensor):
        if block_mask.dtype != torch.bool or tuple(block_mask.shape) != (B, H, nb, nb):
            hint = ""
            if q.shape[1] > q.shape[2]:  # more "heads" than tokens: a [B, L, H, D] tensor
                hint = (" q looks like [B, L, H, D] (BSHD, diffusers' layout); pass "
                        "q.transpose(1, 2) and the same for k and v (BHSD)")
            raise ValueError(f"block_mask must be bool [B, H, nq, nk] = {(B, H, nb, nb)} for "
                             f"q [B, H, L, D] = {tuple(q.shape)}, block_size={block_size}; got "
                             f"{block_mask.dtype} {tuple(block_mask.shape)}.{hint}")
        block_mask = BlockMask.from_dense(block_mask, block_size=block_size, seq_len=L)
    elif block_mask.shape != (B, H, nb, nb) or block_mask.block_size != block_size:
        raise ValueError(f"BlockMask {block_mask!r} does not fit q {tuple(q.shape)} with "
                         f"block_size={block_size}")
    valid = key_valid_from_mask(key_padding_mask, B, L)
    return sparse_forward(q, k, v, block_mask, _resolve_scale(scale, q), valid, precision)


def _check_block_size(block_size: int) -> None:
    """The block sizes the backend takes (``AdaSpaConfig.block_size``)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16 \
            or block_size > 256 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two from 16 to 256 (as the backend's "
                         f"option), got {block_size!r}")
