"""Read the Dynamo graph's inputs: the timestep, the user inputs and the text length."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.fx

__all__ = ["GraphInputs", "TIMESTEP_NAMES", "is_parameter", "layer_weight", "main_input"]

# Argument names under which models receive the denoising timestep (diffusers: ``timestep``).
TIMESTEP_NAMES = ("timestep", "timesteps", "t")
TEXT_INPUT_NAME = "encoder_hidden_states"
VIDEO_INPUT_NAME = "hidden_states"
# How many producers ``main_input`` follows before giving up.
MAX_MAIN_PATH = 2000


def _local_name(node: torch.fx.Node) -> Optional[str]:
    """The forward argument a placeholder came from, or ``None`` for parameters and buffers.

    ``L['timestep']`` -> ``timestep``. A chain of item lookups ending in a string key on a frame
    local also names its key: ``L['kwargs']['timestep']`` (a decorated forward taking
    ``**kwargs``) and ``L['___stack0'][1]['timestep']`` (a graph resuming after a break inside a
    diffusers hook, which passes ``(args, kwargs)``). No attribute may be on the way, so
    parameters and buffers never match.
    """
    source = getattr(node.meta.get("grapharg"), "source", None)
    if type(source).__name__ == "LocalSource":
        return source.local_name
    key = getattr(source, "index", None)
    if not isinstance(key, str):
        return None
    while source is not None and hasattr(source, "index") and not hasattr(source, "member"):
        source = getattr(source, "base", None)
    return key if type(source).__name__ == "LocalSource" else None


def _source_text(node: torch.fx.Node) -> str:
    """The placeholder's Dynamo source as text (``L['self']._parameters['weight']``)."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    if source is None:
        return ""
    name = source.name
    return name() if callable(name) else str(name)


def is_parameter(node: torch.fx.Node) -> bool:
    """Whether a placeholder is a module parameter (lifted into the graph's inputs)."""
    return node.op == "placeholder" and "._parameters[" in _source_text(node)


def layer_weight(query: torch.fx.Node, max_nodes: int = 200) -> Optional[torch.fx.Node]:
    """The parameter nearest to ``query`` walking back through its producers (breadth first):
    the query projection's weight, or the query norm's. It belongs to the attention layer."""
    seen, frontier = {query}, [query]
    while frontier and len(seen) < max_nodes:
        params = [n for n in frontier if is_parameter(n)]
        if params:
            return params[0]
        parents = []
        for node in frontier:
            for parent in node.all_input_nodes:
                if parent not in seen:
                    seen.add(parent)
                    parents.append(parent)
        frontier = parents
    return None


def main_input(node: torch.fx.Node) -> Optional[str]:
    """The forward argument reached by following each op's first tensor input.

    That is the residual stream through linears, norms, adds and reshapes, so it tells which
    input a joint-attention stream started from; ``None`` when the path forks into a list (a
    ``cat``) or ends anywhere but at a forward argument.
    """
    for _ in range(MAX_MAIN_PATH):
        if node.op == "placeholder":
            return _local_name(node)
        first = node.args[0] if node.args else None
        if not isinstance(first, torch.fx.Node):
            return None
        node = first
    return None


def _example(node: torch.fx.Node):
    return node.meta.get("example_value", node.meta.get("val"))


@dataclass(frozen=True)
class GraphInputs:
    """Where the graph's interesting inputs sit among its flat arguments.

    ``user_indices`` are the placeholders that are forward arguments (not parameters or
    buffers): their shapes form the call signature that detects a new generation.
    """

    timestep_index: Optional[int]
    timestep_name: Optional[str]
    user_indices: Tuple[int, ...]
    text_len: Optional[int]
    parameter_indices: Tuple[int, ...] = ()

    @classmethod
    def from_graph(cls, gm: torch.fx.GraphModule) -> "GraphInputs":
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        names = tuple(_local_name(n) for n in placeholders)
        user = tuple(i for i, name in enumerate(names) if name is not None)
        timestep_index = next((i for i in user if names[i] in TIMESTEP_NAMES
                               and isinstance(_example(placeholders[i]), torch.Tensor)), None)
        text_len = None
        for i in user:
            example = _example(placeholders[i])
            if names[i] == TEXT_INPUT_NAME and isinstance(example, torch.Tensor) \
                    and example.dim() == 3 and isinstance(example.shape[1], int):
                text_len = example.shape[1]
        return cls(timestep_index=timestep_index,
                   timestep_name=None if timestep_index is None else names[timestep_index],
                   user_indices=user, text_len=text_len,
                   parameter_indices=tuple(i for i, n in enumerate(placeholders)
                                           if is_parameter(n)))

    def timestep(self, args: Sequence) -> Optional[float]:
        """The timestep of this call as a float (one host sync when it lives on the GPU)."""
        if self.timestep_index is None:
            return None
        t = args[self.timestep_index]
        return float(t.reshape(-1)[0]) if t.numel() else None

    def signature(self, args: Sequence) -> Tuple:
        """Shapes (and int values) of the forward arguments but the timestep: a change starts a
        new generation. A recompile that turns a Python-number timestep into an input keeps it."""
        return tuple(tuple(args[i].shape) if isinstance(args[i], torch.Tensor) else args[i]
                     for i in self.user_indices if i != self.timestep_index)
