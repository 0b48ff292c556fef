"""Pass: replace every eligible SDPA node with ``adaspa::attention``; return what it found."""

from __future__ import annotations

import logging
from typing import List, Tuple

import torch
import torch.fx

from ..config import AdaSpaConfig
from .graph_inputs import GraphInputs, layer_weight
from .sdpa_sites import SdpaCall, can_rewrite, find_sdpa_calls, shape_text, site_name
from .sites import SiteInfo, TextSpan
from .text_span import find_text_span

__all__ = ["rewrite_sdpa"]

logger = logging.getLogger(__name__)


def rewrite_sdpa(gm: torch.fx.GraphModule, cfg: AdaSpaConfig,
                 inputs: GraphInputs) -> Tuple[torch.fx.GraphModule, List[SiteInfo]]:
    """Rewrite eligible SDPA calls into AdaSpa sites; every call found, with why it was left
    dense where it was. The ``i``-th rewritten call passes ``i`` (its index in the returned list)
    to the op."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    found: List[SiteInfo] = []
    for call in list(find_sdpa_calls(gm)):
        ok, reason = can_rewrite(call, cfg, inputs)
        weight = layer_weight(call.query)
        found.append(SiteInfo(
            name=site_name(call.node), shape=shape_text(call), eligible=ok, reason=reason,
            text=find_text_span(call, cfg, inputs) if ok else TextSpan(None),
            layer_weight=None if weight is None else placeholders.index(weight)))
        if ok:
            _replace(gm, call, len(found) - 1)
    if any(s.eligible for s in found):
        gm.graph.lint()
        gm.recompile()
    logger.debug("adaspa: rewrote %d of %d SDPA call(s)", sum(s.eligible for s in found),
                 len(found))
    return gm, found


def _replace(gm: torch.fx.GraphModule, call: SdpaCall, site_index: int) -> None:
    node = call.node
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(
            torch.ops.adaspa.attention.default,
            (call.query, call.key, call.value, call.attn_mask, call.scale, site_index))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
