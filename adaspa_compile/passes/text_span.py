"""Find where the text tokens sit in a joint-attention sequence, from the graph alone.

Joint-attention models concatenate video and text along the sequence before (or inside) the
attention: HunyuanVideo and Mochi put text last, CogVideoX first. The text length is the sequence
length of the ``encoder_hidden_states`` input. Walking back from the query, the first ``cat``
whose parts add up to the attention length and whose first or last part has the text length
gives the side.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Optional, Tuple

import torch
import torch.fx

from ..config import AdaSpaConfig
from .graph_inputs import GraphInputs
from .sdpa_sites import SdpaCall, _hint, _val

__all__ = ["find_text_span"]

CAT_TARGETS = (torch.cat, torch.concat, torch.concatenate, torch.ops.aten.cat.default)
# How far back from the query the walk looks; a transformer block is well inside this.
MAX_NODES_VISITED = 400


def find_text_span(call: SdpaCall, cfg: AdaSpaConfig,
                   inputs: GraphInputs) -> Tuple[Optional[str], int, str]:
    """``(position, text_len, source)``: position is ``"first"``, ``"last"`` or ``None``."""
    if cfg.text_tokens is not None:
        if cfg.text_tokens == 0:
            return None, 0, "override"
        position, count = cfg.text_tokens
        return position, count, "override"
    if inputs.text_len is None:
        return None, 0, "no encoder_hidden_states input"
    q = _val(call.query)
    seq_len = _hint(q.shape[2])
    position = _cat_position(call.query, seq_len, inputs.text_len)
    if position is None:
        return None, 0, "no video/text concat feeds q"
    return position, inputs.text_len, "graph"


def _cat_position(start: torch.fx.Node, seq_len: int, text_len: int) -> Optional[str]:
    seen, queue = {start}, deque([start])
    while queue and len(seen) < MAX_NODES_VISITED:
        node = queue.popleft()
        if node.op == "call_function" and node.target in CAT_TARGETS:
            position = _text_side(node, seq_len, text_len)
            if position is not None:
                return position
        for parent in node.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                queue.append(parent)
    return None


def _text_side(cat: torch.fx.Node, seq_len: int, text_len: int) -> Optional[str]:
    parts = cat.args[0] if cat.args else cat.kwargs.get("tensors")
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    vals = [_val(p) for p in parts] if isinstance(parts, (list, tuple)) else []
    if len(vals) < 2 or not all(isinstance(v, torch.Tensor) for v in vals) \
            or not isinstance(dim, int):
        return None
    sizes = [_hint(v.shape[dim]) for v in vals]
    if sum(sizes) != seq_len:
        return None
    return _side_of(sizes, text_len)


def _side_of(sizes: Any, text_len: int) -> Optional[str]:
    if sizes[-1] == text_len and sizes[0] != text_len:
        return "last"
    if sizes[0] == text_len and sizes[-1] != text_len:
        return "first"
    return None
