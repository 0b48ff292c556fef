"""Runtime state, one :class:`ModelState` per compiled model: its step clock, its sites and their
caches. The state belongs to the model and dies with it.

How a call finds its model. Dynamo lifts a module's parameters into the graph's inputs, and it
shares one graph between instances of one class (two LoRA variants, Wan 2.2's two experts) and
between the repeated blocks of a regional compile. So each call of a graph receives the parameters
of the model that runs it. A graph keeps, per parameter it receives first (its *anchor*), the state
of the model that owns that parameter: a dictionary lookup by identity, with no host sync and no
recompile. The first time an anchor is seen, the owner is found on the call stack: the module that
``torch.compile`` wraps, or, where only blocks are compiled, the outermost module holding the anchor
whose forward takes a timestep (the denoiser, not its blocks).

Sites are named by where their attention layer sits in the model (``blocks.3.attn1``): the name of
the layer parameter nearest to the query (``SiteInfo.layer_weight``). So every graph that serves a
model, whichever frame Dynamo compiled, reaches the same site for the same layer.

The step clock moves once per model call. Where the model's forward is compiled, the first graph of
the model that takes the timestep moves it. Where only its blocks are compiled
(``compile_repeated_blocks``), the model's own forward runs eagerly: the state then adds a forward
pre-hook to the model that reads the timestep of each call. When a diffusers pipeline calls the
model, the step index is the pipeline scheduler's, so a model that joins a generation late (Wan
2.2's low-noise expert) knows how far it is.

The process holds only a weak registry of the live states, for :func:`report` and :func:`reset`.
"""

from __future__ import annotations

import gc
import inspect
import logging
import sys
import threading
import weakref
from types import FrameType
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .config import AdaSpaConfig
from .logs import log_once
from .passes.graph_inputs import TIMESTEP_NAMES, GraphInputs
from .passes.sites import SiteInfo
from .report import ModelReport, Report, SiteReport
from .runtime import Site
from .schedule import StepClock

__all__ = ["ModelState", "CompiledGraph", "report", "reset", "state_of", "active_call"]

logger = logging.getLogger(__name__)

# Every live model's state, keyed weakly by its owner (the model, or the compiled graph of a
# compiled function): an entry goes when its owner is garbage-collected.
_STATES: "weakref.WeakKeyDictionary[Any, ModelState]" = weakref.WeakKeyDictionary()
# The call in progress on this thread: (state, graph, graph args), set around each graph call.
_ACTIVE = threading.local()


class ModelState:
    """The clock, sites and caches of one model compiled with ``backend="adaspa"``."""

    def __init__(self, owner: Any, cfg: AdaSpaConfig) -> None:
        self._owner = weakref.ref(owner)
        self.kind = type(owner).__name__ if isinstance(owner, torch.nn.Module) else "function"
        self.cfg = cfg
        self.clock = StepClock()
        self.sites: Dict[str, Site] = {}
        self.skipped: Dict[str, SiteInfo] = {}
        self.notes: List[str] = []
        self._graphs: "weakref.WeakSet[CompiledGraph]" = weakref.WeakSet()
        self._driver: Optional[object] = None  # the ``drive_key`` of the graphs that move the clock
        self._hook: Optional[torch.utils.hooks.RemovableHandle] = None
        self._param_names: Dict[int, str] = {}
        self._calls: Dict[str, int] = {}

    @property
    def owner(self) -> Any:
        return self._owner()

    def has_graphs(self) -> bool:
        """Whether a compiled graph that served this model is still alive."""
        return len(self._graphs) > 0

    def check_options(self, cfg: AdaSpaConfig) -> None:
        if cfg != self.cfg:
            raise ValueError(
                f"this {self.kind} is compiled with backend='adaspa' twice with different options:"
                f" {self.cfg} and {cfg}. One model instance keeps one adaspa state (one clock, "
                "one set of masks): drop the first compile (torch._dynamo.reset()) before "
                "recompiling with other options, or compile a copy (copy.deepcopy)")

    # ------------------------------------------------------------------ graphs and sites
    def bind(self, graph: "CompiledGraph", args: Sequence) -> None:
        """Register a graph that serves this model, and the calls it left dense under their
        layer names for ``args`` (a graph serving several layers is bound once per layer)."""
        for info in graph.skipped:
            self.skipped.setdefault(self._layer_name(info, args), info)
        if graph in self._graphs:
            return
        self._graphs.add(graph)
        for info in graph.skipped:
            log_once(logger, f"adaspa: {info.name} left dense: {info.reason}", logging.INFO)
        self.notes += [n for n in graph.notes if n not in self.notes]

    def site_for(self, graph: "CompiledGraph", index: int, args: Sequence) -> Site:
        """The site of the ``index``-th SDPA call of ``graph`` for this model."""
        info = graph.sites[index]
        name = self._layer_name(info, args)
        repeat = self._calls.get(name, 0)
        self._calls[name] = repeat + 1
        if repeat:
            name = f"{name}#{repeat}"
            self.note(f"{info.name} runs several times per step and its layer has no parameter "
                      "of its own in the graph: each call keeps its own masks, named #1, #2, ...")
        site = self.sites.get(name)
        if site is None:
            site = self.sites[name] = Site(site_id=len(self.sites), name=name, info=info,
                                           cfg=graph.cfg)
        site.info = info  # what the graph calling it now found (a recompile may know better)
        return site

    def _layer_name(self, info: SiteInfo, args: Sequence) -> str:
        """``blocks.3.attn1`` for a site whose query comes from ``blocks.3.attn1.to_q.weight``;
        the graph's own name for the call when the graph holds no parameter of the layer."""
        if info.layer_weight is None or not isinstance(self.owner, torch.nn.Module):
            return info.name
        param = args[info.layer_weight]
        name = self._param_names.get(id(param))
        if name is None:
            self._param_names = {id(p): n for n, p in
                                 self.owner.named_parameters(remove_duplicate=False)}
            name = self._param_names.setdefault(id(param), "")  # "" : not the model's
        parts = name.split(".") if name else []
        return ".".join(parts[:-2]) if len(parts) > 2 else info.name

    def note(self, message: str) -> None:
        """A remark for the report (logged once)."""
        if message not in self.notes:
            self.notes.append(message)
            log_once(logger, f"adaspa: {message}")

    # ------------------------------------------------------------------ the clock
    def begin_call(self, graph: "CompiledGraph", args: Sequence) -> None:
        """Move the clock at the start of a graph's call, if this graph is the one that does.

        One graph per model drives the clock: the first that takes the timestep (graph breaks
        that pass it on again do not count as branches), else the first graph of a model
        without one, else nothing where a forward pre-hook on the model drives it.
        """
        if self._hook is not None:
            return
        timestep = graph.inputs.timestep(args)
        signature = graph.inputs.signature(args)
        if graph.drive_key == self._driver:
            self.observe(timestep, signature)
            return
        driver_alive = self._driver is not None and self._driver_alive()
        counting = driver_alive and self.clock.source == "forward count"
        if timestep is not None and (not driver_alive or counting):
            hook_graph_first = counting and graph.drive_key[0] != self._driver[0]
            self._driver = graph.drive_key
            if hook_graph_first:  # another frame without the timestep counted this call
                self.clock.adopt(timestep, signature)
            else:  # the first graph with the timestep, or a recompile that now takes it
                self.observe(timestep, signature)
        elif timestep is None and not driver_alive and not self._add_clock_hook():
            self._driver = graph.drive_key
            self.observe(None, signature)

    def _driver_alive(self) -> bool:
        """Whether a graph of the driving frame lives (``torch._dynamo.reset()`` drops them)."""
        return any(g.drive_key == self._driver for g in self._graphs)

    def observe(self, timestep: Optional[float], signature: Tuple) -> None:
        """One call of the model: advance the clock; a new generation clears every site."""
        if self.clock.observe(timestep, signature, _scheduler_step()):
            for site in self.sites.values():
                site.clear()
        self._calls.clear()
        if not self.sites and self.clock.step + self.clock.generation > 0:
            for note in self.notes:  # a whole call ran without reaching an SDPA call
                if note.startswith(NO_SDPA_NOTE):
                    log_once(logger, f"adaspa: {note}")

    def _add_clock_hook(self) -> bool:
        """Regional compilation: the model's own forward runs eagerly, so a forward pre-hook on it
        reads each call's timestep. Counts the call in progress too. False when the model's
        forward is compiled, or takes no timestep."""
        model = self.owner
        if not isinstance(model, torch.nn.Module) or _forward_is_compiled(model):
            return False
        call = _call_frame(model)
        if call is None:
            return False
        arguments = _bound_arguments(model, call.f_locals["args"], call.f_locals["kwargs"])
        timestep = _timestep_of(arguments)
        if timestep is None:
            return False
        self._hook = model.register_forward_pre_hook(_ClockHook(self), with_kwargs=True)
        weakref.finalize(self, self._hook.remove)  # the hook goes with the state
        self.observe(timestep, _signature_of(arguments))
        return True

    def reset(self) -> None:
        """Start a new generation at the next call: drop every cache and history."""
        self.clock.reset()
        for site in self.sites.values():
            site.clear()

    # ------------------------------------------------------------------ report
    def report_rows(self, label: str) -> List[SiteReport]:
        rows = [s.report_row(label) for s in self.sites.values()]
        rows += [SiteReport(site_id=None, name=name, shape=i.shape, eligible=False,
                            reason=i.reason, text=str(i.text), model=label)
                 for name, i in self.skipped.items()]
        return rows

    def summary(self, label: str) -> ModelReport:
        notes = [n for n in self.notes if not (self.sites and n.startswith(NO_SDPA_NOTE))]
        if self.clock.source == "forward count" and self.sites:
            notes.append("the model takes no timestep: denoising steps are counted as model "
                         "calls (CFG branches cannot be told apart)")
        return ModelReport(label=label, clock=self.clock.source, steps_from=self.clock.steps_from,
                           generation=self.clock.generation, step=self.clock.step, notes=notes,
                           precision=self.cfg.precision)


NO_SDPA_NOTE = "a compiled graph has no scaled_dot_product_attention call"


class CompiledGraph:
    """What the backend returns for one graph: it finds the calling model's state, moves its
    clock and runs the inner compiled graph with that state active for the ``adaspa::attention``
    calls inside."""

    def __init__(self, inner: Callable, inputs: GraphInputs, cfg: AdaSpaConfig,
                 sites: List[SiteInfo], notes: List[str], frame: object) -> None:
        self._inner = inner
        # The graphs that may move a model's clock: the recompiles of one frame that all take the
        # timestep, or all do not (a hook function that diffusers shares between the model and
        # its blocks is one frame compiled for each).
        self.drive_key = (frame, inputs.timestep_index is not None)
        self.inputs = inputs
        self.cfg = cfg
        self.sites = sites
        self.skipped = [s for s in sites if not s.eligible]
        self.notes = notes
        weights = [s.layer_weight for s in sites if s.layer_weight is not None]
        self._anchor = weights[0] if weights else next(iter(inputs.parameter_indices), None)
        self._states = WeakIdKeyDictionary()

    def __call__(self, *args: Any) -> Any:
        state = self._state_for(args)
        state.begin_call(self, args)
        previous = getattr(_ACTIVE, "call", None)
        _ACTIVE.call = (state, self, args)
        try:
            return self._inner(*args)
        finally:
            _ACTIVE.call = previous

    def _state_for(self, args: Sequence) -> ModelState:
        anchor = args[self._anchor] if self._anchor is not None else None
        state = self._states.get(anchor) if anchor is not None else None
        if state is None:
            owner = _owning_model(anchor)
            state = state_of(owner if owner is not None else self, self.cfg)
            state.bind(self, args)
            if anchor is not None:
                self._states[anchor] = state
        return state


def state_of(owner: Any, cfg: Optional[AdaSpaConfig] = None) -> ModelState:
    """The state of ``owner`` (created with ``cfg`` on first use; options must match after)."""
    state = _STATES.get(owner)
    if state is not None and cfg is not None and cfg != state.cfg and state.has_graphs():
        gc.collect()  # graphs that torch._dynamo.reset() dropped may wait in reference cycles
    if state is None or (cfg is not None and cfg != state.cfg and not state.has_graphs()):
        if cfg is None:
            raise ValueError(f"{type(owner).__name__} has not run under backend='adaspa'")
        state = _STATES[owner] = ModelState(owner, cfg)  # recompiled with new options
    elif cfg is not None:
        state.check_options(cfg)
    return state


def active_call() -> Tuple[ModelState, CompiledGraph, Sequence]:
    """The model state, graph and graph arguments of the compiled call in progress."""
    call = getattr(_ACTIVE, "call", None)
    if call is None:
        raise RuntimeError("adaspa::attention runs only inside a graph compiled with "
                           "backend='adaspa'; call it through the compiled model")
    return call


# ----------------------------------------------------------------------------- public API
def _states(module: Optional[Any]) -> List[Tuple[str, ModelState]]:
    """``(label, state)`` of every live model, or of ``module`` alone."""
    live = list(_STATES.items())
    counts: Dict[str, int] = {}
    for _, state in live:
        counts[state.kind] = counts.get(state.kind, 0) + 1
    labelled, seen = [], {}
    for owner, state in live:
        index = seen[state.kind] = seen.get(state.kind, -1) + 1
        label = state.kind if counts[state.kind] == 1 else f"{state.kind}#{index}"
        labelled.append((label, owner, state))
    if module is None:
        return [(label, state) for label, _, state in labelled]
    target = getattr(module, "_orig_mod", module)
    found = [(label, state) for label, owner, state in labelled if owner is target]
    if not found:
        raise ValueError(f"this {type(target).__name__} has no adaspa state: compile it with "
                         "torch.compile(model, backend='adaspa') (or "
                         "model.compile_repeated_blocks(backend='adaspa')) and call it first")
    return found


def report(module: Optional[Any] = None) -> Report:
    """What the backend did at every attention site of every live model, or of ``module``
    (the model, or its compiled wrapper)."""
    rows, models = [], []
    for label, state in _states(module):
        rows += state.report_rows(label)
        models.append(state.summary(label))
    return Report(sites=rows, models=models)


def reset(module: Optional[Any] = None) -> None:
    """Start a new generation at the next call of every model, or of ``module``: drops every
    LSE and mask cache. The sites stay; they go with their model."""
    for _, state in _states(module):
        state.reset()


# ----------------------------------------------------------------------------- the call stack
def _frames(start: int = 3) -> Iterator[FrameType]:
    frame = sys._getframe(start)
    while frame is not None:
        yield frame
        frame = frame.f_back


def _self_of(frame: FrameType) -> Any:
    return frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None


def _owning_model(anchor: Optional[torch.Tensor]) -> Optional[torch.nn.Module]:
    """The model that runs the graph, among the modules running on the call stack that hold
    ``anchor`` (any module when ``anchor`` is None): the innermost that ``torch.compile`` wraps;
    else (the blocks of a regional compile) the outermost whose forward takes a timestep; else
    the outermost."""
    holders = []  # innermost first
    for frame in _frames():
        module = _self_of(frame)
        if isinstance(module, torch.nn.Module) and module not in holders and (
                anchor is None or _holds(module, anchor)):
            holders.append(module)
    for module in holders:
        wrapped = getattr(module, "_orig_mod", None)
        if isinstance(wrapped, torch.nn.Module):
            return wrapped
    denoisers = [m for m in holders if _takes_timestep(m)]
    if denoisers:
        return denoisers[-1]
    return holders[-1] if holders else None


def _holds(module: torch.nn.Module, tensor: torch.Tensor) -> bool:
    return any(p is tensor for p in module.parameters()) \
        or any(b is tensor for b in module.buffers())


def _takes_timestep(module: torch.nn.Module) -> bool:
    """Whether the module's class ``forward`` has a timestep parameter (hooks may replace the
    instance's ``forward`` with a ``*args, **kwargs`` wrapper; the class keeps the real one)."""
    try:
        names = inspect.signature(type(module).forward).parameters
    except (TypeError, ValueError):
        return False
    return any(name in names for name in TIMESTEP_NAMES)


def _forward_is_compiled(model: torch.nn.Module) -> bool:
    """Whether ``model`` runs through ``torch.compile`` (its wrapper is on the call stack) or
    ``model.compile()``; a regional compile compiles its blocks only."""
    if getattr(model, "_compiled_call_impl", None) is not None:
        return True
    return any(getattr(_self_of(f), "_orig_mod", None) is model for f in _frames())


def _call_frame(model: torch.nn.Module) -> Optional[FrameType]:
    """The frame of ``model``'s ``Module._call_impl`` (its ``args`` and ``kwargs``)."""
    for frame in _frames():
        if frame.f_code.co_name == "_call_impl" and _self_of(frame) is model:
            return frame
    return None


def _scheduler_step() -> Optional[int]:
    """The step index of the diffusers pipeline on the call stack, if one is there."""
    for frame in _frames():
        scheduler = getattr(_self_of(frame), "scheduler", None)
        if scheduler is not None and hasattr(scheduler, "step_index") \
                and not isinstance(scheduler, torch.nn.Module):
            index = scheduler.step_index
            if index is None:
                index = getattr(scheduler, "begin_index", None)
            return int(index or 0)
    return None


def _bound_arguments(model: torch.nn.Module, args: Sequence, kwargs: Dict) -> Dict[str, Any]:
    try:
        return dict(inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments)
    except TypeError:
        return dict(kwargs)


def _timestep_of(arguments: Dict[str, Any]) -> Optional[float]:
    for name in TIMESTEP_NAMES:
        value = arguments.get(name)
        if isinstance(value, torch.Tensor) and value.numel():
            return float(value.reshape(-1)[0])
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _signature_of(arguments: Dict[str, Any]) -> Tuple:
    return tuple((name, tuple(v.shape)) for name, v in arguments.items()
                 if isinstance(v, torch.Tensor))


class _ClockHook:
    """The forward pre-hook of a regionally compiled model: one clock tick per call."""

    def __init__(self, state: ModelState) -> None:
        self._state = weakref.ref(state)

    def __call__(self, module: torch.nn.Module, args: Tuple, kwargs: Dict) -> None:
        state = self._state()
        if state is not None:
            arguments = _bound_arguments(module, args, kwargs)
            state.observe(_timestep_of(arguments), _signature_of(arguments))
