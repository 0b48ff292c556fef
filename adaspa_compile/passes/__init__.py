"""FX passes of the adaspa backend, in the order they run."""

from __future__ import annotations

from typing import Callable, List

import torch.fx

from ..config import AdaSpaConfig
from .graph_inputs import GraphInputs
from .rewrite_sdpa import rewrite_sdpa

__all__ = ["PASSES", "run_passes", "GraphInputs"]

Pass = Callable[[torch.fx.GraphModule, AdaSpaConfig, GraphInputs], torch.fx.GraphModule]

PASSES: List[Pass] = [rewrite_sdpa]


def run_passes(gm: torch.fx.GraphModule, cfg: AdaSpaConfig,
               inputs: GraphInputs) -> torch.fx.GraphModule:
    for graph_pass in PASSES:
        gm = graph_pass(gm, cfg, inputs)
    return gm
