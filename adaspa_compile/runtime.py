"""The executor of one attention site: it plans the phase of each call, runs it, and keeps the
site's LSE and mask caches (one per CFG branch) and history. A site belongs to one model's state
(``state.py``); the ``adaspa::attention`` op (``op.py``) finds it and calls :meth:`Site.forward`.
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
from .passes.sites import SiteInfo
from .report import SiteReport
from .schedule import Phase, Plan, SiteFacts, plan_phase
from .selection import BlockLayout
from .selectors import Scored, make_selector

__all__ = ["Site", "SearchTimer"]

logger = logging.getLogger(__name__)


@dataclass
class _BranchCache:
    shape: Tuple[int, ...]
    lse: Optional[torch.Tensor] = None
    mask: Optional[BlockMask] = None
    searched_at: Optional[int] = None
    scored: Optional[Scored] = None  # ``cfg_mask="sum"``: this step's mass, for later branches


@dataclass
class Site:
    """One attention layer of one model: its settings, caches and history."""

    site_id: int
    name: str
    info: SiteInfo
    cfg: AdaSpaConfig
    dense_reason: str = ""
    caches: Dict[int, _BranchCache] = field(default_factory=dict)
    phases: Dict[int, List[Phase]] = field(default_factory=dict)
    density: Optional[torch.Tensor] = None
    recall: Optional[torch.Tensor] = None
    search_ms: List["SearchTimer"] = field(default_factory=list)
    padding_checked: bool = False

    @property
    def head_group(self) -> Optional[str]:
        """Ulysses context parallelism: the process group whose ranks hold the other heads."""
        return self.info.head_group

    def clear(self) -> None:
        """Forget the current generation: caches, phases and search results."""
        self.caches.clear()
        self.phases.clear()
        self.search_ms.clear()
        self.density = self.recall = None

    def cache_bytes(self) -> int:
        return sum((c.lse.numel() * 4 if c.lse is not None else 0)
                   + (c.mask.nbytes() if c.mask is not None else 0)
                   + (c.scored.nbytes() if c.scored is not None else 0)
                   for c in self.caches.values())

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_mask: Optional[torch.Tensor], scale: Optional[float], step: int,
                branch: int) -> torch.Tensor:
        """Run the phase planned for this call; the output keeps ``q``'s strides."""
        if q.shape[2] < self.cfg.min_seq_len:
            self._stay_dense(f"sequence length {q.shape[2]} < min_seq_len={self.cfg.min_seq_len}")
        if self.info.text.source == "override" and self.info.text.text_len > q.shape[2]:
            raise ValueError(f"adaspa option text_tokens={self.cfg.text_tokens!r} asks for "
                             f"{self.info.text.text_len} text tokens, but {self.name} attends "
                             f"over {q.shape[2]}: give the text length of this model")
        cache = self._cache_for(branch, q, step)
        plan = self._plan(step, branch, cache, q, k, attn_mask)
        phase = plan.phase
        self.phases.setdefault(branch, []).append(phase)
        if phase is Phase.DENSE:
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                                                   scale=scale)
            return _with_strides_of(out, q)
        s = float(scale) if scale is not None else q.shape[-1] ** -0.5
        key_valid = ops.key_valid_from_mask(_as_4d(attn_mask), q.shape[0], q.shape[2])
        if phase is Phase.FUSED_SEARCH:
            timer = SearchTimer(q.device)
            out, cache.lse, mass = ops.fused_search(q, k, v, s, self.cfg.block_size, key_valid)
            self._select(mass, key_valid, plan, branch, q, k, s, timer, step)
            return _with_strides_of(out, q)
        if phase is Phase.CACHED_SEARCH:
            timer = SearchTimer(q.device)
            mass = ops.cached_search(q, k, cache.lse, s, self.cfg.block_size, key_valid)
            self._select(mass, key_valid, plan, branch, q, k, s, timer, step)
        mask = self.caches[plan.mask_of].mask
        out = ops.sparse_forward(q, k, v, mask, s, key_valid, self.cfg.precision)
        return _with_strides_of(out, q)

    def _plan(self, step: int, branch: int, cache: _BranchCache, q: torch.Tensor,
              k: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> Plan:
        """``plan_phase`` on this call's facts. Two checks sync with the host: the padding check,
        once per site, the first time a search or sparse step is planned; q and k finite, at
        each search."""
        lead = self.caches.get(0) if branch > 0 else None
        if lead is not None and lead.shape != cache.shape:
            lead = None
        facts = SiteFacts(searched_at=cache.searched_at, has_lse=cache.lse is not None,
                          lead_mask=lead is not None and lead.mask is not None,
                          lead_mass=lead is not None and lead.scored is not None
                          and lead.searched_at == step, dense_reason=self.dense_reason)
        plan = plan_phase(step, branch, facts, self.cfg)
        if plan.phase in (Phase.FUSED_SEARCH, Phase.CACHED_SEARCH) and not _all_finite(q, k):
            self._stay_dense(f"q or k holds NaN or Inf at step {step}: the site runs the "
                             "model's own SDPA from here on, so the values show as they would "
                             "without adaspa instead of hiding in skipped blocks")
            return Plan(Phase.DENSE)
        if plan.phase is Phase.DENSE or self.padding_checked:
            return plan
        self.padding_checked = True
        if _is_padding_mask(attn_mask):
            return plan
        self._stay_dense("the additive attn_mask holds values other than 0 and padding "
                         f"(<= {ops.PADDING_BIAS:g}): not a key-padding mask")
        return plan_phase(step, branch, SiteFacts(padding_mask=False), self.cfg)

    def _cache_for(self, branch: int, q: torch.Tensor, step: int) -> _BranchCache:
        """This branch's cache (a new one for a new shape); a mass kept for the later branches
        of an earlier step is dropped here."""
        cache = self.caches.get(branch)
        if cache is None or cache.shape != tuple(q.shape):
            cache = self.caches[branch] = _BranchCache(shape=tuple(q.shape))
        if cache.searched_at != step:
            cache.scored = None
        return cache

    def _stay_dense(self, reason: str) -> None:
        if not self.dense_reason:
            self.dense_reason = reason
            log_once(logger, f"adaspa: {self.name} stays dense: {reason}")

    def _select(self, mass: torch.Tensor, key_valid: Optional[torch.Tensor], plan: Plan,
                branch: int, q: torch.Tensor, k: torch.Tensor, scale: float,
                timer: "SearchTimer", step: int) -> None:
        """Choose this branch's mask from the exact ``mass`` and the configured selector; with
        ``plan.sum_with``, from the sum of this mass and that branch's, for every branch that
        searched at this step."""
        layout = BlockLayout(seq_len=q.shape[2], block_size=self.cfg.block_size,
                             text_span=self.info.text.tokens(q.shape[2]), key_valid=key_valid)
        selector = make_selector(self.cfg)
        scored = selector.score(mass, q, k, scale, layout)
        cache = self.caches[branch]
        if plan.sum_with is not None:
            lead = self.caches[plan.sum_with]
            scored = lead.scored = lead.scored + scored
        chosen = selector.choose(scored, layout, self.head_group)
        cache.searched_at = step
        if plan.keep_mass:
            cache.scored = scored
        targets = [cache] if plan.sum_with is None else [
            c for c in self.caches.values() if c.shape == cache.shape and c.searched_at == step]
        for target in targets:
            target.mask = chosen.mask
        timer.stop()
        self.density, self.recall = chosen.density, chosen.recall  # read when reported: no sync
        self.search_ms.append(timer)

    def report_row(self, model: str) -> SiteReport:
        return SiteReport(
            site_id=self.site_id, name=self.name, shape=self.info.shape, eligible=True,
            reason=self.dense_reason, text=str(self.info.text), model=model,
            phases={b: "".join(p.letter for p in ps) for b, ps in sorted(self.phases.items())},
            density=_as_list(self.density), recall=_as_list(self.recall),
            search_ms=[t.ms() for t in self.search_ms], cache_bytes=self.cache_bytes())


def _with_strides_of(out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if out.stride() == like.stride():
        return out
    return torch.empty_like(like).copy_(out)


def _as_4d(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """An SDPA mask broadcast-shaped to 4-D, as SDPA reads it (``[L]`` -> ``[1, 1, 1, L]``)."""
    if mask is None or mask.dim() == 4:
        return mask
    return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))


def _all_finite(*tensors: torch.Tensor) -> bool:
    """Whether every value is finite (one host sync; run at search steps only)."""
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


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
