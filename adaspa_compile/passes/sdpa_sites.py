"""Find SDPA calls in a Dynamo graph, bind their arguments and judge whether AdaSpa may take them."""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Tuple

import torch
import torch.fx

from ..config import AdaSpaConfig
from .graph_inputs import VIDEO_INPUT_NAME, GraphInputs, main_input

__all__ = ["SdpaCall", "find_sdpa_calls", "can_rewrite", "site_name"]

SDPA_TARGETS = (torch._C._nn.scaled_dot_product_attention,
                torch.nn.functional.scaled_dot_product_attention,
                torch.ops.aten.scaled_dot_product_attention.default)

# The real signature; diffusers passes arguments positionally in some processors, by keyword in
# others.
_SDPA_SIGNATURE = inspect.Signature([
    inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default)
    for name, default in (("query", inspect.Parameter.empty), ("key", inspect.Parameter.empty),
                          ("value", inspect.Parameter.empty), ("attn_mask", None),
                          ("dropout_p", 0.0), ("is_causal", False), ("scale", None),
                          ("enable_gqa", False))
])


@dataclass(frozen=True)
class SdpaCall:
    """One SDPA node with its arguments bound by name."""

    node: torch.fx.Node
    query: torch.fx.Node
    key: torch.fx.Node
    value: torch.fx.Node
    attn_mask: Any
    dropout_p: Any
    is_causal: Any
    scale: Any
    enable_gqa: Any

    @classmethod
    def bind(cls, node: torch.fx.Node) -> "SdpaCall":
        bound = _SDPA_SIGNATURE.bind(*node.args, **node.kwargs)
        bound.apply_defaults()
        return cls(node=node, **bound.arguments)


def find_sdpa_calls(gm: torch.fx.GraphModule) -> Iterator[SdpaCall]:
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in SDPA_TARGETS:
            yield SdpaCall.bind(node)


def site_name(node: torch.fx.Node) -> str:
    """A readable place for the call: the owning module's path, then the node name."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return node.name
    path = list(stack.values())[-1][0]
    path = re.sub(r"\[['\"]?([\w.]+)['\"]?\]", r".\1", path)  # L['self'].x['y'][0] -> L.self.x.y.0
    path = re.sub(r"(^|\.)(L|self|__dict__|_modules)(?=\.|$)", "", path).strip(".")
    return f"{path or 'self'}:{node.name}"


def _val(x: Any) -> Any:
    return x.meta.get("val", x.meta.get("example_value")) if isinstance(x, torch.fx.Node) else x


def _hint(size: Any) -> Optional[int]:
    """A concrete int for a size: itself, a dynamic size's example value, or ``None`` when it is
    data-dependent (an unbacked SymInt, as after ``torch.nonzero``)."""
    if isinstance(size, torch.SymInt):
        return size.node.hint
    return int(size)


def _same_size(a: Any, b: Any) -> bool:
    ha, hb = _hint(a), _hint(b)
    if ha is None or hb is None:
        return str(a) == str(b)
    return ha == hb


def shape_text(call: SdpaCall) -> str:
    q = _val(call.query)
    if not isinstance(q, torch.Tensor):
        return "?"
    return "[" + ",".join(str(s) for s in q.shape) + "]"


def can_rewrite(call: SdpaCall, cfg: AdaSpaConfig, inputs: GraphInputs) -> Tuple[bool, str]:
    """Whether AdaSpa may replace this call; the reason when not."""
    q, k, v = (_val(call.query), _val(call.key), _val(call.value))
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return False, "q, k or v has no tensor metadata"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return False, f"q/k/v are not 4-D [B, H, L, D] (q is {q.dim()}-D)"
    if torch.is_grad_enabled():
        return False, "autograd is on: adaspa rewrites inference graphs (torch.no_grad())"
    for name, value, expected in (("dropout_p", call.dropout_p, 0.0), ("is_causal", call.is_causal,
                                                                        False)):
        if isinstance(value, torch.fx.Node) or value != expected:
            return False, f"{name}={value!r} (needs {expected})"
    if isinstance(call.scale, torch.fx.Node):
        return False, "scale is computed at run time"
    if call.enable_gqa is not False or q.shape[1] != k.shape[1]:
        return False, f"grouped-query attention ({q.shape[1]} query heads, {k.shape[1]} key heads)"
    lq, lk = q.shape[2], k.shape[2]
    if not _same_size(lq, lk):
        return False, f"cross-attention (Lq={lq}, Lk={lk})"
    if not _same_size(q.shape[3], v.shape[3]):
        return False, f"value head dim {v.shape[3]} differs from query head dim {q.shape[3]}"
    length = _hint(lq)  # None when data-dependent: the runtime checks min_seq_len then
    if length is not None and length < cfg.min_seq_len:
        return False, f"sequence length {lq} < min_seq_len={cfg.min_seq_len}"
    if inputs.text_len is not None and length == inputs.text_len \
            and main_input(call.query) != VIDEO_INPUT_NAME:
        return False, f"attention over the {lq} text tokens only (e.g. a token refiner)"
    return _mask_ok(call.attn_mask, q)


def _mask_ok(mask_node: Any, q: torch.Tensor) -> Tuple[bool, str]:
    if mask_node is None:
        return True, ""
    mask = _val(mask_node)
    if not isinstance(mask, torch.Tensor):
        return False, "attn_mask has no tensor metadata"
    shape = (1,) * (4 - mask.dim()) + tuple(mask.shape) if mask.dim() <= 4 else tuple(mask.shape)
    if len(shape) != 4 or _hint(shape[1]) != 1 or _hint(shape[2]) != 1 \
            or not _same_size(shape[3], q.shape[2]) \
            or not (_hint(shape[0]) == 1 or _same_size(shape[0], q.shape[0])):
        return False, (f"attn_mask {tuple(mask.shape)} is not a key-padding mask "
                       f"(broadcastable [B, 1, 1, L])")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        return False, f"attn_mask dtype {mask.dtype} is neither bool nor additive float"
    return True, ""
