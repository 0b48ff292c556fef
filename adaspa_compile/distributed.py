"""Multi-GPU support: diffusers context parallelism (Ulysses) under ``backend="adaspa"``.

With ``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))`` diffusers'
native attention runs ``TemplatedUlyssesAttention``: q, k and v are exchanged by an all-to-all
so that each rank holds the whole sequence for ``H / N`` heads, then calls
``F.scaled_dot_product_attention``, which the adaspa pass rewrites like any other SDPA call.
Global head ``h`` lives on rank ``h // (H / N)`` of the Ulysses group (``reshape(B, S, N, H/N,
D)`` then scatter along ``N``): rank ``r`` holds the contiguous heads ``[r*H/N, (r+1)*H/N)``.

What this module adds, none of it active without an initialised process group of more than one
rank:

- :func:`ulysses_sites`: which rewritten sites sit behind such an all-to-all, and in which group
  (read off the graph: the ``q`` of the site comes from ``_c10d_functional.all_to_all_single``);
- :func:`gather_heads`: the per-head recall of one rank gathered across its group in rank order,
  so head-adaptive tiers rank the heads of the whole layer, as on one GPU;
- :func:`check_ranks`: a store handshake at compile time, so a rank that did not compile with
  adaspa (or with other options) is a clear error at the first step instead of a hang in the
  recall all-gather;
- :func:`check_context_parallel`: refuses ring attention and a Ulysses degree that does not
  divide the head count (at compile time, from the compiled frame's locals);
- :func:`prepare_context_parallel`: optional; lets Dynamo capture the whole parallel model as
  one graph on CPU (on CUDA, torch 2.11, the output all-gather still breaks it once, after the
  last block: use the default ``fullgraph=False``).

Without it, diffusers' hooks break the graph and Dynamo compiles every block as a frame of its
own, blocks 1..N-1 sharing one compiled graph: each block still has its own site, named by its
layer (``state.py``). See docs/multigpu.md.
"""

from __future__ import annotations

import functools
import logging
import os
from datetime import timedelta
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.fx

__all__ = [
    "is_distributed",
    "ulysses_sites",
    "gather_heads",
    "check_ranks",
    "check_context_parallel",
    "find_context_parallel",
    "prepare_context_parallel",
    "HANDSHAKE_TIMEOUT_ENV",
]

logger = logging.getLogger(__name__)

# Seconds every rank of a context-parallel group waits at compile time for the others to say
# they compile with adaspa too. The keys are set when a rank starts its first adaspa compile, so
# the wait only covers the skew of Dynamo tracing between ranks, not inductor's compile time.
HANDSHAKE_TIMEOUT_ENV = "ADASPA_HANDSHAKE_TIMEOUT"
DEFAULT_HANDSHAKE_TIMEOUT_S = 120.0
_KEY = "adaspa/compiled/{rank}"
# How many producers the walk from a site's q to the all-to-all follows.
_MAX_WALK = 64

# Handshake state of the current default process group (a new one starts over).
_handshake: Dict[str, Any] = {"world": None, "announced": False, "checked": set()}


def is_distributed() -> bool:
    """An initialised default process group with more than one rank."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# ----------------------------------------------------------------------------- graph
def _all_to_all_group(node: torch.fx.Node) -> Optional[str]:
    """The process-group name of a functional ``all_to_all_single`` node, else ``None``."""
    if node.op != "call_function" or "all_to_all_single" not in str(node.target):
        return None
    name = node.kwargs.get("group_name")
    if name is None:
        name = next((a for a in reversed(node.args) if isinstance(a, str)), None)
    return name


def ulysses_group_of(query: torch.fx.Node) -> Optional[str]:
    """The group of the all-to-all that produced ``query`` (following each op's first input)."""
    node = query
    for _ in range(_MAX_WALK):
        group = _all_to_all_group(node)
        if group is not None:
            return group
        first = node.args[0] if node.args else None
        if not isinstance(first, torch.fx.Node):
            return None
        node = first
    return None


def ulysses_sites(gm: torch.fx.GraphModule) -> Dict[int, str]:
    """``{site_id: group name}`` of the rewritten sites whose q comes out of an all-to-all."""
    if not is_distributed():
        return {}
    sites = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.adaspa.attention.default:
            group = ulysses_group_of(node.args[0])
            if group is not None:
                sites[int(node.args[5])] = group
    return sites


# ----------------------------------------------------------------------------- heads
def _group(name: str):
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def gather_heads(x: torch.Tensor, group_name: str) -> Tuple[torch.Tensor, int, int]:
    """All-gather ``x`` ``[B, h]`` (this rank's heads) over the group along the head dim.

    Returns ``(full [B, H], start, stop)``: the heads of every rank in rank order, and where
    this rank's heads sit in it. Ranks may hold different head counts (diffusers'
    ``ulysses_anything`` gives the last rank fewer), so the counts are gathered first.
    """
    import torch.distributed as dist

    pg = _group(group_name)
    world, rank = dist.get_world_size(pg), dist.get_rank(pg)
    x = x.contiguous()
    count = torch.tensor([x.shape[-1]], dtype=torch.int64, device=x.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=pg)
    counts = [int(c) for c in counts]
    width = max(counts)
    padded = torch.nn.functional.pad(x, (0, width - x.shape[-1]))
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=pg)
    full = torch.cat([p[..., :c] for p, c in zip(parts, counts)], dim=-1)
    start = sum(counts[:rank])
    return full, start, start + counts[rank]


# ----------------------------------------------------------------------------- handshake
def _timeout() -> float:
    raw = os.environ.get(HANDSHAKE_TIMEOUT_ENV)
    try:
        return float(raw) if raw else DEFAULT_HANDSHAKE_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{HANDSHAKE_TIMEOUT_ENV}={raw!r} is not a number of seconds") from None


def _store():
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


def _state() -> Dict[str, Any]:
    import torch.distributed as dist

    world = dist.group.WORLD
    if _handshake["world"] is not world:
        _handshake.update(world=world, announced=False, checked=set())
    return _handshake


def announce(fingerprint: str) -> None:
    """Tell the other ranks that this one compiles with adaspa (once per process group)."""
    if not is_distributed() or _state()["announced"]:
        return
    import torch.distributed as dist

    _store().set(_KEY.format(rank=dist.get_rank()), fingerprint)
    _handshake["announced"] = True


def check_ranks(group_names: Iterable[str], fingerprint: str) -> None:
    """Fail clearly unless every rank of each group compiles with adaspa and the same options.

    Each adaspa rank sets ``adaspa/compiled/<rank>`` in the default store when it starts its
    first compile; a graph with sites behind a Ulysses all-to-all then waits (at most
    ``ADASPA_HANDSHAKE_TIMEOUT`` seconds, default 120) for the keys of every rank of the group.
    A rank compiled with another backend never sets its key, so its peers raise, naming it,
    instead of waiting forever in the head all-gather of the first search step.
    """
    if not is_distributed():
        return
    import torch.distributed as dist

    announce(fingerprint)
    store = _store()
    for name in sorted(set(group_names)):
        ranks = sorted(dist.get_process_group_ranks(_group(name)))
        if tuple(ranks) in _state()["checked"]:
            continue
        keys = [_KEY.format(rank=r) for r in ranks]
        timeout = _timeout()
        try:
            store.wait(keys, timedelta(seconds=timeout))
        except Exception:  # DistStoreError on timeout; some stores raise RuntimeError
            missing = [r for r, k in zip(ranks, keys) if not store.check([k])]
            raise RuntimeError(
                f"backend='adaspa': rank(s) {missing} of the context-parallel group {ranks} did "
                f"not start an adaspa compile within {timeout:g} s of rank {dist.get_rank()}. "
                "Every rank of the group must compile the transformer with backend='adaspa' and "
                "the same options: the sparse steps all-gather per-head recall across the group, "
                f"which would hang. (Slow ranks: raise {HANDSHAKE_TIMEOUT_ENV}.)") from None
        values = {r: store.get(k).decode() for r, k in zip(ranks, keys)}
        if len(set(values.values())) > 1:
            mine = values[dist.get_rank()]
            other = sorted(r for r, v in values.items() if v != mine)
            raise RuntimeError(
                f"backend='adaspa': ranks {other} of the context-parallel group {ranks} compiled "
                f"with other adaspa options than rank {dist.get_rank()} ({mine}); every rank "
                "must use the same options, or the ranks run different phases and masks")
        _state()["checked"].add(tuple(ranks))


# ----------------------------------------------------------------------------- CP config
def _cp_of(obj: Any):
    """A diffusers ``ContextParallelConfig`` held by ``obj`` directly, else ``None``."""
    for attr in ("parallel_config", "_parallel_config", "context_parallel_config"):
        value = getattr(obj, attr, None) if not isinstance(obj, torch.Tensor) else None
        if value is None:
            continue
        if type(value).__name__ == "ContextParallelConfig":
            return value
        inner = getattr(value, "context_parallel_config", None)
        if type(inner).__name__ == "ContextParallelConfig":
            return inner
    return None


def _heads_of(module: torch.nn.Module) -> Optional[int]:
    config = getattr(module, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    if isinstance(heads, int):
        return heads
    heads = getattr(module, "heads", None)
    return heads if isinstance(heads, int) else None


def _expand(obj: Any) -> List[Any]:
    """Objects one reference away that can lead to a CP config (modules, hooks, closures)."""
    if isinstance(obj, (list, tuple)):
        return list(obj)
    if isinstance(obj, dict):
        return list(obj.values())
    out = []
    if isinstance(obj, functools.partial):
        out += [obj.func, *obj.args]
    for attr in ("__self__", "__wrapped__", "pre_forward", "forward", "post_forward",
                 "_diffusers_hook", "hooks", "processor"):
        value = getattr(obj, attr, None) if not isinstance(obj, torch.Tensor) else None
        if value is not None and not isinstance(value, (str, int, float, bool)):
            out.append(value)
    return out


def find_context_parallel(roots: Iterable[Any],
                          max_modules: int = 20000) -> Tuple[Any, Optional[int]]:
    """``(ContextParallelConfig or None, head count or None)`` reachable from ``roots``.

    Follows modules (and their submodules' attention processors and diffusers hooks), hook
    objects, bound methods and partials a few levels deep: enough from the locals of any frame
    Dynamo compiles in a diffusers model with context parallelism.
    """
    cp, heads, seen = None, None, set()
    frontier = list(roots)
    for _ in range(4):
        nxt = []
        for obj in frontier:
            if obj is None or id(obj) in seen \
                    or isinstance(obj, (str, int, float, bool, torch.Tensor)):
                continue
            seen.add(id(obj))
            if type(obj).__name__ == "ContextParallelConfig":
                cp = cp or obj
                continue
            cp = cp or _cp_of(obj)
            if isinstance(obj, torch.nn.Module):
                heads = heads or _heads_of(obj)
                for i, sub in enumerate(obj.modules()):
                    if i >= max_modules or (cp is not None and heads is not None):
                        break
                    heads = heads or _heads_of(sub)
                    cp = cp or _cp_of(sub) or _cp_of(getattr(sub, "processor", None))
                    registry = getattr(sub, "_diffusers_hook", None)
                    for hook in getattr(registry, "hooks", {}).values():
                        cp = cp or _cp_of(hook)
            else:
                nxt += _expand(obj)
        if cp is not None and heads is not None:
            break
        frontier = nxt
    return cp, heads


def check_context_parallel(cp: Any, heads: Optional[int]) -> None:
    """Refuse what adaspa cannot run under diffusers context parallelism."""
    if cp is None:
        return
    ring = getattr(cp, "ring_degree", 1) or 1
    ulysses = getattr(cp, "ulysses_degree", 1) or 1
    if ring > 1:
        raise RuntimeError(
            f"backend='adaspa' does not support ring attention (ContextParallelConfig("
            f"ring_degree={ring}, ulysses_degree={ulysses})). Ring attention gives each rank a "
            "slice of the keys and merges partial outputs by their log-sum-exp, but AdaSpa picks "
            "each query block's key blocks from its whole row (a top-k over the row's block "
            "mass, normalised by the row's full LSE), which no rank holds; diffusers' native "
            "attention, the only backend that calls scaled_dot_product_attention, also refuses "
            "ring (it cannot return the LSE). Use Ulysses: ContextParallelConfig("
            f"ulysses_degree={ring * ulysses}), which needs the head count to be divisible by "
            "it")
    if heads is not None and heads % ulysses and not getattr(cp, "ulysses_anything", False):
        raise ValueError(
            f"ContextParallelConfig(ulysses_degree={ulysses}) does not divide the model's "
            f"num_attention_heads={heads}: Ulysses gives each rank {heads}/{ulysses} heads. "
            f"Pick a degree that divides {heads}")


def check_compiled_frame() -> None:
    """Run :func:`check_context_parallel` on the frame Dynamo is compiling (best effort)."""
    if not is_distributed():
        return
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        roots = list(tx.f_locals.values()) if tx is not None else []
    except Exception:  # a private Dynamo API: skip the check rather than fail a compile
        return
    check_context_parallel(*find_context_parallel(roots))


# ----------------------------------------------------------------------------- prepare
def prepare_context_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """Optional, after ``model.enable_parallelism(...)``: let Dynamo trace the model as one graph.

    Without it diffusers' context-parallel hooks break the graph twice (their ``warning_once``
    about Wan's 1-D timestep, and ``inspect.signature`` the first time a split hook looks up a
    positional argument), Dynamo gives up on the model's own frame and compiles each submodule
    call as a frame of its own: still correct with adaspa, but many small graphs, the blocks
    after the first sharing one, and ``fullgraph=True`` fails. This fills the hooks' argument
    index cache eagerly and tells Dynamo to skip that logger's ``warning_once`` while tracing.
    It also runs :func:`check_context_parallel` on the model. Returns the model.

    On CUDA (torch 2.11) the output all-gather along the sequence still breaks the graph once,
    after the last block (Dynamo skips ``torch._utils._maybe_view_chunk_cat``), so keep the
    default ``fullgraph=False`` there; measured on two H200s: 3 graphs, no recompiles.
    """
    import inspect

    check_context_parallel(*find_context_parallel([model]))
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for hook in getattr(registry, "hooks", {}).values():
            meta = getattr(hook, "module_forward_metadata", None)
            cls = getattr(meta, "_cls", None)
            if cls is not None and meta.cached_parameter_indices is None:
                names = list(inspect.signature(cls.forward).parameters)[1:]
                meta.cached_parameter_indices = {n: i for i, n in enumerate(names)}
    try:
        from diffusers.hooks import context_parallel as cp_hooks

        warn = getattr(cp_hooks.logger, "warning_once", None)
        if warn is not None:
            torch._dynamo.config.ignore_logging_functions.add(warn)
    except ImportError:
        pass
    return model
