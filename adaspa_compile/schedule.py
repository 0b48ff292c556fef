"""Which phase an attention call runs (``plan_phase``), and the step clock that counts steps."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Tuple

if TYPE_CHECKING:
    from .config import AdaSpaConfig

__all__ = ["Phase", "Plan", "SiteFacts", "plan_phase", "scaled_search_steps", "StepClock"]


class Phase(str, enum.Enum):
    """What one attention call does."""

    DENSE = "dense"  # the model's own SDPA, untouched
    FUSED_SEARCH = "fused_search"  # exact dense output + LSE + block mass -> new mask
    CACHED_SEARCH = "cached_search"  # block mass from the cached LSE -> new mask, then sparse
    SPARSE = "sparse"  # block-sparse attention with the latest mask

    @property
    def letter(self) -> str:
        return {"dense": "D", "fused_search": "F", "cached_search": "C", "sparse": "S"}[self.value]


@dataclass(frozen=True)
class SiteFacts:
    """What the phase planner needs to know about one site and CFG branch at one step."""

    searched_at: Optional[int] = None  # the step of this branch's last search, this generation
    has_lse: bool = False  # an LSE cached by a fused search of this branch
    lead_mask: bool = False  # branch 0 holds a mask of this call's shape
    lead_mass: bool = False  # branch 0 holds the block mass of its search at this step
    padding_mask: bool = True  # the attn_mask is none, bool, or 0 / padding only
    dense_reason: str = ""  # why the site runs dense for good ("" when it does not)


@dataclass(frozen=True)
class Plan:
    """What one attention call does: its phase, and where its mask comes from."""

    phase: Phase
    mask_of: int = 0  # the branch whose mask a sparse call runs on
    sum_with: Optional[int] = None  # a search selects on its mass plus this branch's, for both
    keep_mass: bool = False  # a search keeps its mass for the later branches of the step


def plan_phase(step: int, branch: int, facts: SiteFacts, cfg: "AdaSpaConfig") -> Plan:
    """The plan of one attention call: every schedule rule and override in one place.

    Dense before the first search step (the warmup) and at sites that stay dense. From then on a
    branch searches whenever a search step has passed since its last search: at the search step
    itself, or at its first call after it (a model that joins the generation late, or a layer a
    step cache skipped). The first search of a generation is fused (exact); later ones re-search
    from the cached LSE (``lse_cache``), or fuse again without one. Between searches: sparse on
    the latest mask. A search or sparse step needs a key-padding mask at most.

    ``cfg_mask``: with ``"cond"`` the later branches of a step run sparse on branch 0's mask;
    with ``"sum"`` branch 0 keeps the mass of its searches, and a later branch's search selects
    on the sum of its mass and branch 0's of the same step, one mask for both.
    """
    phase = _phase(step, branch, facts, cfg)
    if cfg.cfg_mask == "cond" and branch > 0 and facts.lead_mask and phase is not Phase.DENSE:
        return Plan(Phase.SPARSE, mask_of=0)
    if cfg.cfg_mask != "sum" or phase not in (Phase.FUSED_SEARCH, Phase.CACHED_SEARCH):
        return Plan(phase, mask_of=branch)
    if branch == 0:
        return Plan(phase, mask_of=0, keep_mass=True)
    return Plan(phase, mask_of=branch, sum_with=0 if facts.lead_mass else None)


def _phase(step: int, branch: int, facts: SiteFacts, cfg: "AdaSpaConfig") -> Phase:
    """The schedule of one branch on its own."""
    steps = cfg.search_steps
    if facts.dense_reason or step < steps[0] or not facts.padding_mask:
        return Phase.DENSE
    due = max(s for s in steps if s <= step)
    if facts.searched_at is not None and facts.searched_at >= due:
        return Phase.SPARSE
    if facts.searched_at is not None and facts.has_lse and cfg.lse_cache:
        return Phase.CACHED_SEARCH
    return Phase.FUSED_SEARCH


@dataclass
class StepClock:
    """Counts one model's denoising steps and CFG branches.

    Each call carries the model's timestep and, when a diffusers pipeline calls the model, the
    step index of the pipeline's scheduler. Calls at one step (one timestep, or one scheduler
    step) are branches of that step. Without a scheduler, a lower timestep is the next step. A
    higher timestep, an earlier scheduler step, or new input shapes start a new generation.
    Without a timestep every call is a step of its own (``source == "forward count"``).
    """

    source: str = "none yet"
    generation: int = -1
    step: int = 0
    branch: int = 0
    steps_from: str = "calls"  # "calls" (counted) or "scheduler" (the pipeline's step index)
    _last_timestep: Optional[float] = None
    _signature: Optional[Tuple] = None

    def observe(self, timestep: Optional[float], signature: Tuple,
                scheduler_step: Optional[int] = None) -> bool:
        """Advance on one model call; True when it starts a new generation."""
        self.source = "forward count" if timestep is None else "timestep"
        self.steps_from = "calls" if scheduler_step is None else "scheduler"
        new_generation = (
            self.generation < 0
            or signature != self._signature
            or (timestep is not None and self._last_timestep is not None
                and timestep > self._last_timestep)
            or (scheduler_step is not None and scheduler_step < self.step)
        )
        if new_generation:
            self.generation += 1
            self.step, self.branch = (scheduler_step or 0), 0
        elif self._same_step(timestep, scheduler_step):
            self.branch += 1
        else:
            self.step = self.step + 1 if scheduler_step is None else scheduler_step
            self.branch = 0
        self._last_timestep, self._signature = timestep, signature
        return new_generation

    def adopt(self, timestep: float, signature: Tuple) -> None:
        """Count by ``timestep`` from now on, the call in progress already counted."""
        self.source, self._last_timestep, self._signature = "timestep", timestep, signature

    def _same_step(self, timestep: Optional[float], scheduler_step: Optional[int]) -> bool:
        if scheduler_step is not None:
            return scheduler_step == self.step
        return timestep is not None and timestep == self._last_timestep

    def reset(self) -> None:
        """Forget everything: the next call is step 0 of a new generation."""
        self.generation, self.step, self.branch = -1, 0, 0
        self._last_timestep, self._signature = None, None


DEFAULT_SEARCH_STEPS, DEFAULT_STEPS = (9, 29), 50  # the paper's schedule: steps 9 and 29 of 50


def scaled_search_steps(steps: int) -> Tuple[int, ...]:
    """The default search steps (zero-based 9 and 29 of 50) at the same fractions of ``steps``,
    kept increasing and below ``steps``: ``(1, 5)`` for 8 steps, ``(0, 1)`` for 2."""
    out = []
    for s in DEFAULT_SEARCH_STEPS:
        step = min(steps - 1, round(s * steps / DEFAULT_STEPS))
        if out and step <= out[-1]:
            step = out[-1] + 1
        if step < steps:
            out.append(step)
    return tuple(out)
