"""FX passes of the adaspa backend, in the order they run.

A pass takes ``(gm, cfg, inputs)`` and returns ``(gm, found)``: the rewritten graph and the
attention sites it found. Passes change nothing outside the graph.
"""

from __future__ import annotations

from typing import Callable, List, Tuple

import torch.fx

from ..config import AdaSpaConfig
from .graph_inputs import GraphInputs
from .rewrite_sdpa import rewrite_sdpa
from .sites import SiteInfo, TextSpan

__all__ = ["PASSES", "run_passes", "GraphInputs", "SiteInfo", "TextSpan"]

Pass = Callable[[torch.fx.GraphModule, AdaSpaConfig, GraphInputs],
                Tuple[torch.fx.GraphModule, List[SiteInfo]]]

PASSES: List[Pass] = [rewrite_sdpa]


def run_passes(gm: torch.fx.GraphModule, cfg: AdaSpaConfig,
               inputs: GraphInputs) -> Tuple[torch.fx.GraphModule, List[SiteInfo]]:
    found: List[SiteInfo] = []
    for graph_pass in PASSES:
        gm, sites = graph_pass(gm, cfg, inputs)
        found += sites
    return gm, found
