"""Runtime state of the backend: the step clock and one `Site` per rewritten attention call.

Everything that changes between model calls lives in the single `Runtime` object returned by
:func:`get_runtime`: the clock, and per site its LSE and mask caches (one per CFG branch), the
phases it ran and what its last search found. ``report()`` reads it and ``reset()`` clears it.

The graph calls one custom op, ``adaspa::attention``, whose last argument is the site id; the op
looks the site up here and branches on the current phase at run time, so one compiled graph
serves every step and generation.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from . import ops
from .blockmask import BlockMask
from .config import AdaSpaConfig
from .logs import log_once
from .report import Report, SiteReport
from .schedule import Phase, StepClock, phase_for_step
from .selection import BlockLayout, select_blocks
from .selectors import block_recall, selector_scores

__all__ = ["SiteInfo", "Site", "Runtime", "get_runtime"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextSpan:
    """Where the text tokens sit in a site's sequence: ``position`` ``"first"``, ``"last"`` or
    ``None`` (no text), known through ``text_len`` or, for unpadded text of varying length,
    through ``video_len``."""

    position: Optional[str]
    text_len: int = 0
    video_len: int = 0
    source: str = "-"

    def tokens(self, seq_len: int) -> Optional[Tuple[int, int]]:
        """The half-open token range of the text in a sequence of ``seq_len``."""
        if self.position is None:
            return None
        count = self.text_len if self.text_len else seq_len - self.video_len
        if count <= 0:
            return None
        return (0, count) if self.position == "first" else (seq_len - count, seq_len)

    def __str__(self) -> str:
        if self.position is None:
            return f"none ({self.source})"
        count = self.text_len if self.text_len else f"L-{self.video_len}"
        return f"{self.position} {count} ({self.source})"


@dataclass(frozen=True)
class SiteInfo:
    """What the FX pass found out about one SDPA call."""

    name: str
    shape: str
    eligible: bool
    reason: str = ""
    text: TextSpan = TextSpan(None)


@dataclass
class _BranchCache:
    shape: Tuple[int, ...]
    lse: Optional[torch.Tensor] = None
    mask: Optional[BlockMask] = None


@dataclass
class Site:
    """One rewritten attention call: its settings, caches and history."""

    site_id: int
    info: SiteInfo
    cfg: AdaSpaConfig
    dense_reason: str = ""
    caches: Dict[int, _BranchCache] = field(default_factory=dict)
    phases: Dict[int, List[Phase]] = field(default_factory=dict)
    density: Optional[torch.Tensor] = None
    recall: Optional[torch.Tensor] = None
    search_ms: List["SearchTimer"] = field(default_factory=list)
    # Ulysses context parallelism: the process group whose ranks hold the other heads.
    head_group: Optional[str] = None
    # A graph shared by several layers (Dynamo compiled a block's frame once and calls it for
    # each block, e.g. after graph breaks) runs this site several times per step: the n-th call
    # of a step (n >= 1) keeps its own caches in ``layer_caches[n]``.
    layer_caches: Dict[int, Dict[int, _BranchCache]] = field(default_factory=dict)
    _tick: Tuple[int, ...] = ()
    _occurrence: int = 0

    def clear(self) -> None:
        """Forget the current generation: caches, phases and search results."""
        self.caches.clear()
        self.layer_caches.clear()
        self.phases.clear()
        self.search_ms.clear()
        self.density = self.recall = None
        self._tick, self._occurrence = (), 0

    def cache_bytes(self) -> int:
        caches = [*self.caches.values(), *(c for d in self.layer_caches.values()
                                           for c in d.values())]
        return sum((c.lse.numel() * 4 if c.lse is not None else 0)
                   + (c.mask.nbytes() if c.mask is not None else 0) for c in caches)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_mask: Optional[torch.Tensor], scale: Optional[float],
                clock: StepClock) -> torch.Tensor:
        """Run the phase the clock asks for; the output keeps ``q``'s strides."""
        occurrence = self._count(clock)
        cache = self._cache_for(clock.branch, q, occurrence)
        phase = self._phase(clock.step, cache, q, attn_mask)
        lead = self._lead_mask(clock.branch, q, occurrence) if phase is not Phase.DENSE else None
        if lead is not None:
            phase = Phase.SPARSE
        if occurrence == 0:
            self.phases.setdefault(clock.branch, []).append(phase)
        if phase is Phase.DENSE:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                                                   scale=scale)
            return _with_strides_of(out, q)
        s = float(scale) if scale is not None else q.shape[-1] ** -0.5
        key_valid = ops.key_valid_from_mask(_as_4d(attn_mask), q.shape[0], q.shape[2])
        if phase is Phase.FUSED_SEARCH:
            timer = SearchTimer(q.device)
            out, cache.lse, mass = ops.fused_search(q, k, v, s, self.cfg.block_size, key_valid)
            self._select(mass, key_valid, cache, q, k, s, timer)
            return _with_strides_of(out, q)
        if phase is Phase.CACHED_SEARCH:
            timer = SearchTimer(q.device)
            mass = ops.cached_search(q, k, cache.lse, s, self.cfg.block_size, key_valid)
            self._select(mass, key_valid, cache, q, k, s, timer)
        mask = cache.mask if lead is None else lead
        return _with_strides_of(ops.sparse_forward(q, k, v, mask, s, key_valid), q)

    def _lead_mask(self, branch: int, q: torch.Tensor, occurrence: int):
        """With ``share_cfg_mask``, the mask of branch 0 (this step's first call) for a later
        branch of the same shape; ``None`` otherwise (the branch searches its own)."""
        if not self.cfg.share_cfg_mask or branch == 0:
            return None
        lead = self._caches(occurrence).get(0)
        return lead.mask if lead is not None and lead.shape == tuple(q.shape) else None

    def _count(self, clock: StepClock) -> int:
        """How many calls of this site the current step and branch made before this one."""
        tick = (clock.generation, clock.step, clock.branch)
        if tick != self._tick:
            self._tick, self._occurrence = tick, 0
        else:
            self._occurrence += 1
            if self._occurrence == 1:
                get_runtime().note(
                    f"{self.info.name} runs several times per step: one compiled graph serves "
                    "several layers (Dynamo compiled a block as a frame of its own, e.g. after "
                    "graph breaks); each call keeps its own masks, the report shows the first")
        return self._occurrence

    def _caches(self, occurrence: int) -> Dict[int, _BranchCache]:
        """The per-branch caches of the ``occurrence``-th call of this site in a step."""
        return self.caches if occurrence == 0 else self.layer_caches.setdefault(occurrence, {})

    def _cache_for(self, branch: int, q: torch.Tensor, occurrence: int = 0) -> _BranchCache:
        caches = self._caches(occurrence)
        cache = caches.get(branch)
        if cache is None or cache.shape != tuple(q.shape):
            cache = caches[branch] = _BranchCache(shape=tuple(q.shape))
        return cache

    def _phase(self, step: int, cache: _BranchCache, q: torch.Tensor,
               attn_mask: Optional[torch.Tensor]) -> Phase:
        if q.shape[2] < self.cfg.min_seq_len:
            self._stay_dense(f"sequence length {q.shape[2]} < min_seq_len={self.cfg.min_seq_len}")
        if self.dense_reason:
            return Phase.DENSE
        phase = phase_for_step(step, self.cfg.search_steps)
        if phase is Phase.CACHED_SEARCH and not self.cfg.lse_cache:
            phase = Phase.FUSED_SEARCH
        if phase is Phase.FUSED_SEARCH or (phase is Phase.CACHED_SEARCH and cache.lse is None) \
                or (phase is Phase.SPARSE and cache.mask is None):
            if not _is_padding_mask(attn_mask):
                self._stay_dense("the additive attn_mask holds values other than 0 and padding "
                                 f"(<= {ops.PADDING_BIAS:g}): not a key-padding mask")
                return Phase.DENSE
            return Phase.FUSED_SEARCH
        return phase

    def _stay_dense(self, reason: str) -> None:
        if not self.dense_reason:
            self.dense_reason = reason
            log_once(logger, f"adaspa: {self.info.name} stays dense: {reason}")

    def _select(self, mass: torch.Tensor, key_valid: Optional[torch.Tensor], cache: _BranchCache,
                q: torch.Tensor, k: torch.Tensor, scale: float, timer: "SearchTimer") -> None:
        """Choose this branch's mask from the exact ``mass`` and the configured selector."""
        cfg = self.cfg
        layout = BlockLayout(seq_len=q.shape[2], block_size=cfg.block_size,
                             text_span=self.info.text.tokens(q.shape[2]), key_valid=key_valid)
        scores = selector_scores(cfg.selector, mass, q, k, scale, layout, cfg.video_grid)
        if cfg.selector == "window":
            cfg = cfg.replace(head_adaptive=False)  # a static window has no recall to rank by
        chosen = select_blocks(scores, layout, cfg, head_group=self.head_group)
        cache.mask = chosen.mask
        recall = chosen.recall if cfg.selector == "adaspa" else \
            block_recall(chosen.mask.to_dense(), mass)
        timer.stop()
        if self._occurrence == 0:  # a graph shared by layers: report its first layer
            self.density, self.recall = chosen.density, recall  # read when reported: no sync
            self.search_ms.append(timer)

    def report_row(self) -> SiteReport:
        return SiteReport(
            site_id=self.site_id, name=self.info.name, shape=self.info.shape, eligible=True,
            reason=self.dense_reason, text=str(self.info.text),
            phases={b: "".join(p.letter for p in ps) for b, ps in sorted(self.phases.items())},
            density=_as_list(self.density), recall=_as_list(self.recall),
            search_ms=[t.ms() for t in self.search_ms], cache_bytes=self.cache_bytes())


class Runtime:
    """The one place that holds runtime state: the clock and the sites, keyed by site id."""

    def __init__(self) -> None:
        self.clock = StepClock()
        self._sites: Dict[int, Site] = {}
        self._skipped: List[SiteInfo] = []
        self._notes: List[str] = []

    def add_site(self, info: SiteInfo, cfg: AdaSpaConfig) -> int:
        site_id = len(self._sites) + len(self._skipped)
        self._sites[site_id] = Site(site_id=site_id, info=info, cfg=cfg)
        return site_id

    def has_sites(self) -> bool:
        """Whether any compiled graph has an attention site (rewritten or left dense)."""
        return bool(self._sites or self._skipped)

    def add_skipped(self, info: SiteInfo) -> None:
        self._skipped.append(info)
        log_once(logger, f"adaspa: {info.name} left dense: {info.reason}", logging.INFO)

    def note(self, message: str) -> None:
        """A graph-level remark for the report (logged once)."""
        if message not in self._notes:
            self._notes.append(message)
            log_once(logger, f"adaspa: {message}")

    def site(self, site_id: int) -> Site:
        try:
            return self._sites[site_id]
        except KeyError:
            raise RuntimeError(f"adaspa site {site_id} is unknown: adaspa_compile.reset("
                               "forget_sites=True) dropped it while its compiled graph lives on; "
                               "call torch._dynamo.reset() as well") from None

    def begin_call(self, driver: object, timestep: Optional[float], signature: Tuple) -> None:
        """Move the clock at the start of a compiled graph's call."""
        if timestep is None:
            new_generation = self.clock.observe_call(signature)
        else:
            new_generation = self.clock.observe_timestep(driver, timestep, signature)
        if new_generation:
            for site in self._sites.values():
                site.clear()

    def reset(self, forget_sites: bool = False) -> None:
        """Start a new generation at the next call; optionally forget every site."""
        self.clock.reset()
        for site in self._sites.values():
            site.clear()
        if forget_sites:
            self.clock = StepClock()
            self._sites.clear()
            self._skipped.clear()
            self._notes.clear()

    def report(self) -> Report:
        rows = [s.report_row() for s in self._sites.values()]
        rows += [SiteReport(site_id=None, name=i.name, shape=i.shape, eligible=False,
                            reason=i.reason, text=str(i.text)) for i in self._skipped]
        return Report(sites=rows, clock=self.clock.source, generation=self.clock.generation,
                      step=self.clock.step, notes=list(self._notes))


_RUNTIME = Runtime()


def get_runtime() -> Runtime:
    """The process-wide runtime shared by every graph compiled with ``backend="adaspa"``."""
    return _RUNTIME


def _with_strides_of(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if out.stride() == like.stride():
        return out
    return torch.empty_like(like).copy_(out)


def _as_4d(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """An SDPA mask broadcast-shaped to 4-D, as SDPA reads it (``[L]`` -> ``[1, 1, 1, L]``)."""
    if mask is None or mask.dim() == 4:
        return mask
    return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))


def _is_padding_mask(mask: Optional[torch.Tensor]) -> bool:
    """True for no mask, a bool mask, or an additive one of only 0 and padding values (syncs)."""
    if mask is None or mask.dtype == torch.bool:
        return True
    return bool(((mask == 0) | (mask <= ops.PADDING_BIAS)).all())


class SearchTimer:
    """The time of one search without a host sync: CUDA events on a GPU (read, and waited for,
    only when reported), the wall clock elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self._events = None
        self._elapsed: Optional[float] = None
        if device.type == "cuda":
            self._events = (torch.cuda.Event(enable_timing=True),
                            torch.cuda.Event(enable_timing=True))
            self._events[0].record()
        self._start = time.perf_counter()

    def stop(self) -> None:
        if self._events is not None:
            self._events[1].record()
        else:
            self._elapsed = (time.perf_counter() - self._start) * 1e3

    def ms(self) -> float:
        """Milliseconds from construction to :meth:`stop`."""
        if self._events is not None:
            self._events[1].synchronize()
            return self._events[0].elapsed_time(self._events[1])
        return self._elapsed


def _as_list(x: Optional[torch.Tensor]) -> Optional[List[List[float]]]:
    return None if x is None else [[round(v, 4) for v in row] for row in x.tolist()]


@torch.library.custom_op("adaspa::attention", mutates_args=())
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 attn_mask: Optional[torch.Tensor], scale: Optional[float],
                 site_id: int) -> torch.Tensor:
    """SDPA at an adaspa site: dense, search or block-sparse depending on the step."""
    runtime = get_runtime()
    return runtime.site(site_id).forward(q, k, v, attn_mask, scale, runtime.clock)


@attention_op.register_fake
def _attention_op_fake(q, k, v, attn_mask, scale, site_id):
    return torch.empty_like(q)
