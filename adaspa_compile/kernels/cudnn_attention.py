"""Dense attention with its log-sum-exp through cuDNN's fused attention (not a Triton kernel).

The exact search needs the dense output and the per-row LSE. cuDNN's forward computes both (it
keeps the LSE for the backward pass) and beats our Triton kernel in places, so
:func:`.dispatch.dense_pass_order` (which has the numbers) tries it before ours there. Semantics
are those of :func:`adaspa_compile.reference.attention_with_lse_ref`.
"""

from __future__ import annotations

import logging
from typing import Optional, Tuple

import torch

from ..logs import log_once

logger = logging.getLogger("adaspa_compile")

_DTYPES = (torch.float16, torch.bfloat16)


def cudnn_unsupported_reason(q: torch.Tensor, key_valid: Optional[torch.Tensor]) -> str:
    """Why cuDNN cannot run this call, or ``""`` when it can. Syncs once if ``key_valid`` is set."""
    if not q.is_cuda:
        return "not a CUDA tensor"
    if q.dtype not in _DTYPES:
        return f"dtype {q.dtype} (cuDNN attention takes fp16 / bf16)"
    if q.shape[-1] > 128 or q.shape[-1] % 8:
        return f"head dim {q.shape[-1]} (cuDNN attention takes multiples of 8 up to 128)"
    if not torch.backends.cuda.cudnn_sdp_enabled():
        return "cuDNN SDPA is disabled (torch.backends.cuda.enable_cudnn_sdp(False))"
    if key_valid is not None and not bool(key_valid.any(-1).all()):
        return "a batch item has no valid key (cuDNN would return NaN, the reference returns 0)"
    return ""


def cudnn_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                             key_valid: Optional[torch.Tensor]
                             ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(out, lse)`` with ``lse`` fp32 ``[B, H, L]`` (natural log), or ``None`` (reason logged once).

    Padded keys (``key_valid``, bool ``[B, L]``) are dropped by gathering each batch item's valid
    keys: attention is invariant to the order of keys, and cuDNN with a broadcast ``-inf`` bias
    measured 1.40x slower than without one on the H100 (benchmarks/RESULTS.md).
    """
    reason = cudnn_unsupported_reason(q, key_valid)
    if not reason:
        try:
            if key_valid is None:
                return _cudnn(q, k, v, scale)
            parts = [_cudnn(q[b:b + 1], *_valid_keys(k, v, key_valid, b), scale)
                     for b in range(q.shape[0])]
            if len(parts) == 1:
                return parts[0]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        except RuntimeError as exc:  # a configuration this cuDNN build rejects
            reason = f"cuDNN raised: {str(exc).splitlines()[0][:200]}"
    log_once(logger, f"adaspa: the exact search's dense pass does not use cuDNN: {reason}")
    return None


def _cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, False, False, scale=scale)[:2]
    return out, lse.reshape(q.shape[:3]).float()


def _valid_keys(k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor,
                b: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Batch item ``b``'s valid keys and values, ``[1, H, n_valid, D]`` (a slice when they are a
    prefix, else a gather; syncs once to count them)."""
    valid = key_valid[b]
    n = int(valid.sum())
    if bool(valid[:n].all()):
        return k[b:b + 1, :, :n], v[b:b + 1, :, :n]
    idx = valid.nonzero().squeeze(1)
    return k[b:b + 1].index_select(2, idx), v[b:b + 1].index_select(2, idx)
