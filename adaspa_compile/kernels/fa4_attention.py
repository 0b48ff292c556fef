"""Dense attention with its log-sum-exp through FlashAttention-4 (optional, not a Triton kernel).

Where the optional ``flash-attn-4`` package (with ``nvidia-cutlass-dsl``) is installed, its
Hopper forward is the fastest dense attention measured on the H100, so the exact search's dense
pass runs it first where :func:`.dispatch.dense_pass_order` (which has the numbers) says so;
without it, or for calls it does not take, cuDNN or our kernel. ``ADASPA_FA4=0`` turns it off.
Semantics are those of :func:`adaspa_compile.reference.attention_with_lse_ref`.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Optional, Tuple

import torch

from ..logs import log_once

logger = logging.getLogger("adaspa_compile")

__all__ = ["fa4_attention_with_lse", "fa4_unsupported_reason"]


@functools.lru_cache(maxsize=None)
def _fa4_forward():
    """FlashAttention-4's forward, or an import error message (tried once per process)."""
    try:
        from flash_attn.cute.interface import _flash_attn_fwd
    except Exception as exc:  # not installed, or the CuTe DSL cannot load here
        return f"flash-attn-4 is not importable ({type(exc).__name__}: {str(exc)[:120]})"
    return _flash_attn_fwd


def fa4_unsupported_reason(q: torch.Tensor, key_valid: Optional[torch.Tensor]) -> str:
    """Why FlashAttention-4 does not run this call, or ``""`` when it does."""
    if os.environ.get("ADASPA_FA4", "1") == "0":
        return "ADASPA_FA4=0"
    if not q.is_cuda:
        return "not a CUDA tensor"
    if key_valid is not None:
        return "key padding (not wired to FlashAttention-4's variable lengths)"
    forward = _fa4_forward()
    return forward if isinstance(forward, str) else ""


def fa4_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                           key_valid: Optional[torch.Tensor]
                           ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(out, lse)`` with ``lse`` fp32 ``[B, H, L]`` (natural log), or ``None`` (reason logged
    once). ``q, k, v`` are ``[B, H, L, D]``; FlashAttention-4 reads them as ``[B, L, H, D]``
    views (no copy for the BSHD memory diffusers hands over) and ``out`` comes back as such a
    view."""
    reason = fa4_unsupported_reason(q, key_valid)
    if not reason:
        try:
            out, lse = _fa4_forward()(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                      softmax_scale=scale, return_lse=True)[:2]
            return out.transpose(1, 2), lse.float()
        except Exception as exc:  # a layout or configuration this build rejects
            reason = f"FlashAttention-4 raised {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    log_once(logger, f"adaspa: the exact search's dense pass does not use FlashAttention-4: {reason}",
             logging.INFO)
    return None
