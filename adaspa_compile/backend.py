"""The ``adaspa`` Dynamo backend: validate config, run the passes, delegate to the inner compiler.

Registered through the ``torch_dynamo_backends`` entry point, so ``backend="adaspa"`` works after
``pip install`` without importing this package.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, List, Mapping, Optional

import torch
import torch.fx

from . import distributed
from .config import AdaSpaConfig
from .passes import GraphInputs, run_passes
from .passes.sdpa_sites import find_sdpa_calls
from .runtime import get_runtime

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
    _check_graph(gm, inputs)
    gm = run_passes(gm, cfg, inputs)
    _mark_ulysses_sites(gm, cfg)
    inner = _compile_inner(gm, example_inputs, cfg, mode)
    return _StepTracker(inner, inputs, driver=_frame_id())


class _StepTracker:
    """Calls the compiled graph after moving the runtime's step clock."""

    def __init__(self, inner: Callable, inputs: GraphInputs, driver: object) -> None:
        self._inner = inner
        self._inputs = inputs
        self._driver = driver

    def __call__(self, *args: Any) -> Any:
        get_runtime().begin_call(self._driver, self._inputs.timestep(args),
                                 self._inputs.signature(args))
        return self._inner(*args)


def _mark_ulysses_sites(gm: torch.fx.GraphModule, cfg: AdaSpaConfig) -> None:
    """Sites behind a Ulysses all-to-all rank their heads across the group; every rank of it
    must compile with adaspa (a store handshake, no-op when not distributed)."""
    sites = distributed.ulysses_sites(gm)
    for site_id, group in sites.items():
        get_runtime().site(site_id).head_group = group
    distributed.check_ranks(sites.values(), repr(cfg))


def _frame_id() -> object:
    """The Dynamo frame being compiled: recompiles of one frame share it."""
    from torch._guards import CompileContext

    compile_id = CompileContext.current_compile_id()
    return getattr(compile_id, "frame_id", compile_id)


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


def _check_graph(gm: torch.fx.GraphModule, inputs: GraphInputs) -> None:
    runtime = get_runtime()
    # A graph that takes `temb` but no timestep, compiled before any graph has shown the clock a
    # timestep, is a lone block (compile_repeated_blocks). The resume graphs after a graph break
    # also take `temb`, but the graph before the break has moved the clock by then.
    if inputs.timestep_index is None and inputs.has_input("temb") \
            and runtime.clock.source != "timestep":
        raise RuntimeError(
            "backend='adaspa' is compiling a single transformer block (it takes `temb` but no "
            "`timestep`), as compile_repeated_blocks(...) does. AdaSpa counts denoising steps "
            "from the model's timestep input, which a block never sees. Compile the whole "
            "transformer instead: pipe.transformer = torch.compile(pipe.transformer, "
            "backend='adaspa')")
    # Graph-break pieces after the graph that moves the clock (or holds the sites) need no note.
    if inputs.timestep_index is None and runtime.clock.source != "timestep":
        runtime.note("a compiled graph has no timestep input: denoising steps are counted as "
                     "model calls (CFG branches cannot be told apart)")
    if next(find_sdpa_calls(gm), None) is None and not runtime.has_sites():
        others = sorted({str(n.target) for n in gm.graph.nodes if n.op == "call_function"
                         and any(h in str(n.target).lower() for h in _OTHER_ATTENTION_HINTS)})
        hint = f" It calls {others}." if others else ""
        runtime.note("a compiled graph has no scaled_dot_product_attention call, so nothing in "
                     f"it is accelerated.{hint} With diffusers, use the native attention backend "
                     "(transformer.set_attention_backend('native')) so attention goes through "
                     "SDPA")


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
