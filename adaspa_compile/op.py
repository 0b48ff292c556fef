"""The ``adaspa::attention`` custom op that the pass puts in place of each eligible SDPA call.

Its last argument is the call's index among the graph's SDPA calls. At run time the op takes the
model state of the compiled call in progress (``state.active_call``), finds the site of this
attention layer of that model, and runs the phase that the site plans for the current step:
dense, fused search, cached search or block-sparse. One compiled graph so serves every step,
every generation and every model instance that shares it.
"""

from __future__ import annotations

from typing import Optional

import torch

from .state import active_call

__all__ = ["attention_op"]


@torch.library.custom_op("adaspa::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 attn_mask: Optional[torch.Tensor], scale: Optional[float],
                 site_index: int) -> torch.Tensor:
    """SDPA at an adaspa site: dense, search or block-sparse depending on the step."""
    state, graph, args = active_call()
    site = state.site_for(graph, site_index, args)
    return site.forward(q, k, v, attn_mask, scale, state.clock.step, state.clock.branch)


@attention_op.register_fake
def _attention_op_fake(q, k, v, attn_mask, scale, site_index):
    return torch.empty_like(q)
