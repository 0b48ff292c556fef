"""Pass: replace every eligible SDPA node with ``adaspa::attention`` and register its site."""

from __future__ import annotations

import logging

import torch
import torch.fx

from ..config import AdaSpaConfig
from ..runtime import SiteInfo, TextSpan, get_runtime
from .graph_inputs import GraphInputs
from .sdpa_sites import SdpaCall, can_rewrite, find_sdpa_calls, shape_text, site_name
from .text_span import find_text_span

__all__ = ["rewrite_sdpa"]

logger = logging.getLogger(__name__)


def rewrite_sdpa(gm: torch.fx.GraphModule, cfg: AdaSpaConfig,
                 inputs: GraphInputs) -> torch.fx.GraphModule:
    """Rewrite eligible SDPA calls into AdaSpa sites; leave the others and record why."""
    runtime = get_runtime()
    rewritten = 0
    for call in list(find_sdpa_calls(gm)):
        ok, reason = can_rewrite(call, cfg, inputs)
        text = find_text_span(call, cfg, inputs) if ok else TextSpan(None)
        info = SiteInfo(name=site_name(call.node), shape=shape_text(call), eligible=ok,
                        reason=reason, text=text)
        if not ok:
            runtime.add_skipped(info)
            continue
        _replace(gm, call, runtime.add_site(info, cfg))
        rewritten += 1
    if rewritten:
        gm.graph.lint()
        gm.recompile()
    logger.debug("adaspa: rewrote %d SDPA call(s)", rewritten)
    return gm


def _replace(gm: torch.fx.GraphModule, call: SdpaCall, site_id: int) -> None:
    node = call.node
    with gm.graph.inserting_before(node):
        new = gm.graph.call_function(
            torch.ops.adaspa.attention.default,
            (call.query, call.key, call.value, call.attn_mask, call.scale, site_id))
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
