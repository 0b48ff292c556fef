"""The ``adaspa`` Dynamo backend: validate config, run the passes, delegate to the inner compiler.

Registered through the ``torch_dynamo_backends`` entry point, so ``backend="adaspa"`` works after
``pip install`` without importing this package.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, List, Mapping, Optional

import torch
import torch.fx

from . import distributed
from . import op  # noqa: F401  (registers the adaspa::attention op)
from .config import AdaSpaConfig
from .passes import GraphInputs, SiteInfo, run_passes
from .passes.sdpa_sites import find_sdpa_calls
from .state import NO_SDPA_NOTE, CompiledGraph

__all__ = ["adaspa_backend"]

logger = logging.getLogger(__name__)

# Substrings of call targets that betray an attention kernel other than SDPA.
_OTHER_ATTENTION_HINTS = ("flash_attn", "flash_attention", "sageattn", "sage", "xformers",
                          "memory_efficient_attention", "flex_attention")


def adaspa_backend(gm: torch.fx.GraphModule, example_inputs: List[Any], *,
                   options: Optional[Mapping[str, Any]] = None,
                   mode: Optional[str] = None) -> Callable:
    """``torch.compile(model, backend="adaspa", options={...})``; see :class:`AdaSpaConfig`."""
    cfg = AdaSpaConfig.from_options(options)
    _check_mode(mode, cfg)
    distributed.check_compiled_frame()  # context parallelism: refuse ring, bad Ulysses degree
    inputs = GraphInputs.from_graph(gm)
    notes = _graph_notes(gm)
    gm, sites = run_passes(gm, cfg, inputs)
    device = _cuda_device(example_inputs)
    if sites and device is not None:
        _check_block_size_has_a_kernel(device, cfg)
        _check_precision_has_a_kernel(gm, device, cfg)
    sites = _with_ulysses_groups(gm, sites, cfg)
    inner = _compile_inner(gm, example_inputs, cfg, mode)
    return CompiledGraph(inner, inputs, cfg, sites, notes, frame=_frame_id())


def _frame_id() -> object:
    """The frame being compiled, as ``(code object, Dynamo frame id)``: recompiles of one frame
    share it, and after ``torch._dynamo.reset()`` (which numbers frames from 0 again) only the
    same code under the same number matches."""
    from torch._dynamo.symbolic_convert import InstructionTranslator
    from torch._guards import CompileContext

    compile_id = CompileContext.current_compile_id()
    tx = InstructionTranslator.current_tx()
    return (getattr(tx, "f_code", None), getattr(compile_id, "frame_id", compile_id))


def _with_ulysses_groups(gm: torch.fx.GraphModule, sites: List[SiteInfo],
                         cfg: AdaSpaConfig) -> List[SiteInfo]:
    """Sites behind a Ulysses all-to-all rank their heads across the group; every rank of it
    must compile with adaspa (a store handshake, no-op when not distributed)."""
    groups = distributed.ulysses_sites(gm)
    distributed.check_ranks(groups.values(), repr(cfg))
    return [dataclasses.replace(s, head_group=groups[i]) if i in groups else s
            for i, s in enumerate(sites)]


def _cuda_device(example_inputs: List[Any]) -> Optional[torch.device]:
    """The CUDA device of the graph's inputs; None off the GPU (the CPU runs the reference)."""
    return next((t.device for t in example_inputs if isinstance(t, torch.Tensor) and t.is_cuda),
                None)


def _check_block_size_has_a_kernel(device: torch.device, cfg: AdaSpaConfig) -> None:
    """Refuse a ``block_size`` that no kernel runs (it would run the slow reference)."""
    from .kernels import dispatch

    supported = dispatch.supported_block_sizes(torch.cuda.get_device_capability(device))
    if supported and cfg.block_size not in supported:  # older GPUs run the reference (logged)
        raise ValueError(f"options block_size={cfg.block_size} has no CUDA kernel: the kernels "
                         f"run block sizes {supported}; other sizes run only on the PyTorch "
                         "reference path (CPU)")


def _check_precision_has_a_kernel(gm: torch.fx.GraphModule, device: torch.device,
                                  cfg: AdaSpaConfig) -> None:
    """With ``precision="fp8"``, refuse a GPU without FP8 tensor cores or a head dim the FP8
    kernel does not run."""
    if cfg.precision != "fp8":
        return
    from .kernels import dispatch

    arch = tuple(torch.cuda.get_device_capability(device))
    for node in gm.graph.find_nodes(op="call_function", target=torch.ops.adaspa.attention.default):
        refusal = dispatch.fp8_refusal(arch, int(node.args[0].meta["val"].shape[-1]))
        if refusal:
            raise ValueError(f"options precision='fp8' cannot run here: {refusal}. Use "
                             "precision='bf16' (the default)")


def _check_mode(mode: Optional[str], cfg: AdaSpaConfig) -> None:
    if mode in (None, "default"):
        return
    if "reduce-overhead" in mode:
        raise ValueError("backend='adaspa' cannot run under mode='reduce-overhead': CUDA graphs "
                         "would freeze the per-step phase switch. Use mode='default' or "
                         "'max-autotune-no-cudagraphs'")
    if cfg.inner_backend != "inductor":
        raise ValueError(f"mode={mode!r} applies to inductor only, but inner_backend="
                         f"{cfg.inner_backend!r}")


def _graph_notes(gm: torch.fx.GraphModule) -> List[str]:
    """A remark for a graph with no SDPA call (shown only if its model gets no site at all)."""
    if next(find_sdpa_calls(gm), None) is not None:
        return []
    others = sorted({str(n.target) for n in gm.graph.nodes if n.op == "call_function"
                     and any(h in str(n.target).lower() for h in _OTHER_ATTENTION_HINTS)})
    hint = f" It calls {others}." if others else ""
    return [f"{NO_SDPA_NOTE}, so nothing in it is accelerated.{hint} With diffusers, use the "
            "native attention backend (transformer.set_attention_backend('native')) so "
            "attention goes through SDPA"]


def _compile_inner(gm: torch.fx.GraphModule, example_inputs: List[Any], cfg: AdaSpaConfig,
                   mode: Optional[str]) -> Callable:
    if cfg.inner_backend == "eager":
        return gm.forward
    if cfg.inner_backend == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    patches = list_mode_options(mode) if mode not in (None, "default") else None
    return compile_fx(gm, example_inputs, config_patches=patches)
