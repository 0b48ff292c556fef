"""Find where the text tokens sit in a joint-attention sequence, from the graph alone.

Joint-attention models concatenate video and text along the sequence before (or inside) the
attention: HunyuanVideo and Mochi put text last, CogVideoX first. The text length is the sequence
length of the ``encoder_hidden_states`` input. Walking back from the query, the first ``cat``
whose parts add up to the attention length and whose first or last part is the text gives the
side. The text part is the one of the text length or, where the model gathers the unpadded text
tokens (Mochi, ``torch.nonzero``), the one whose length is data-dependent; then the span is known
through the other part, the video length.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Optional

import sympy

import torch
import torch.fx

from ..config import AdaSpaConfig
from .graph_inputs import TEXT_INPUT_NAME, VIDEO_INPUT_NAME, GraphInputs, main_input
from .sdpa_sites import SdpaCall, _hint, _val
from .sites import TextSpan

__all__ = ["find_text_span"]

CAT_TARGETS = (torch.cat, torch.concat, torch.concatenate, torch.ops.aten.cat.default)
# How far back from the query the walk looks; a transformer block is well inside this.
MAX_NODES_VISITED = 400


def find_text_span(call: SdpaCall, cfg: AdaSpaConfig, inputs: GraphInputs) -> TextSpan:
    """Where the text sits in this call's sequence (``position is None``: no text)."""
    if cfg.text_tokens is not None:
        if cfg.text_tokens == 0:
            return TextSpan(None, source="override")
        position, count = cfg.text_tokens
        return TextSpan(position, text_len=count, source="override")
    if inputs.text_len is None:
        return TextSpan(None, source="no encoder_hidden_states input")
    seq_len = _val(call.query).shape[2]
    span = _cat_span(call.query, seq_len, inputs.text_len)
    return span if span is not None else TextSpan(None, source="no video/text concat feeds q")


def _cat_span(start: torch.fx.Node, seq_len: Any, text_len: int) -> Optional[TextSpan]:
    seen, queue = {start}, deque([start])
    while queue and len(seen) < MAX_NODES_VISITED:
        node = queue.popleft()
        if node.op == "call_function" and node.target in CAT_TARGETS:
            span = _text_part(node, seq_len, text_len)
            if span is not None:
                return span
        for parent in node.all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                queue.append(parent)
    return None


def _expr(size: Any) -> sympy.Expr:
    return size.node.expr if isinstance(size, torch.SymInt) else sympy.Integer(int(size))


def _text_part(cat: torch.fx.Node, seq_len: Any, text_len: int) -> Optional[TextSpan]:
    parts = cat.args[0] if cat.args else cat.kwargs.get("tensors")
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    vals = [_val(p) for p in parts] if isinstance(parts, (list, tuple)) else []
    if len(vals) < 2 or not all(isinstance(v, torch.Tensor) for v in vals) \
            or not isinstance(dim, int):
        return None
    sizes = [v.shape[dim] for v in vals]
    if sympy.simplify(sum(_expr(s) for s in sizes) - _expr(seq_len)) != 0:
        return None
    for position, text, other in (("last", sizes[-1], sizes[0]), ("first", sizes[0], sizes[-1])):
        if _hint(text) == text_len and _hint(other) != text_len:
            return TextSpan(position, text_len=text_len, source="graph")
    if _hint(sizes[0]) == _hint(sizes[-1]) == text_len:  # equal lengths: follow the data
        origins = [main_input(p) for p in (parts[0], parts[-1])]
        if origins == [TEXT_INPUT_NAME, VIDEO_INPUT_NAME]:
            return TextSpan("first", text_len=text_len, source="graph, by data flow")
        if origins == [VIDEO_INPUT_NAME, TEXT_INPUT_NAME]:
            return TextSpan("last", text_len=text_len, source="graph, by data flow")
    if len(sizes) == 2:
        for position, text, video in (("last", sizes[1], sizes[0]), ("first", sizes[0], sizes[1])):
            if _hint(text) is None and _hint(video) is not None:
                return TextSpan(position, video_len=_hint(video), source="graph, unpadded text")
    return None
