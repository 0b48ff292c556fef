"""Which phase a denoising step runs (ADASPA.md section 3), and the step clock that counts them."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

__all__ = ["Phase", "phase_for_step", "scaled_search_steps", "StepClock"]


class Phase(str, enum.Enum):
    """What one attention call does."""

    DENSE = "dense"  # the model's own SDPA, untouched
    FUSED_SEARCH = "fused_search"  # exact dense output + LSE + block mass -> new mask
    CACHED_SEARCH = "cached_search"  # block mass from the cached LSE -> new mask, then sparse
    SPARSE = "sparse"  # block-sparse attention with the latest mask

    @property
    def letter(self) -> str:
        return {"dense": "D", "fused_search": "F", "cached_search": "C", "sparse": "S"}[self.value]


def phase_for_step(step: int, search_steps: Sequence[int]) -> Phase:
    """Dense before the first search step, fused search at it, cached search at later search
    steps, block-sparse otherwise."""
    if step < search_steps[0]:
        return Phase.DENSE
    if step == search_steps[0]:
        return Phase.FUSED_SEARCH
    if step in search_steps:
        return Phase.CACHED_SEARCH
    return Phase.SPARSE


@dataclass
class StepClock:
    """Counts denoising steps and CFG branches from the timestep of each model call.

    Calls sharing one timestep are branches of one step; a lower timestep is the next step; a
    higher one, or new input shapes, starts a new generation. Without a timestep input every
    call is a step of its own (``source == "forward count"``).
    """

    source: str = "none yet"
    generation: int = -1
    step: int = 0
    branch: int = 0
    _last_timestep: Optional[float] = None
    _signature: Optional[Tuple] = None
    _driver: Optional[object] = field(default=None, repr=False)

    def observe_timestep(self, driver: object, timestep: float, signature: Tuple) -> bool:
        """Advance on a call carrying ``timestep``; True when a new generation starts.

        Only the first graph seen with a timestep (``driver``) moves the clock, so graph breaks
        that pass the timestep twice in one forward do not count as branches.
        """
        if self._driver is None or self.source != "timestep":
            self._driver, self.source = driver, "timestep"
        elif driver != self._driver:
            return False
        return self._advance(timestep, signature)

    def observe_call(self, signature: Tuple) -> bool:
        """Advance on a call without timestep input (ignored once a timestep was seen)."""
        if self.source == "timestep":
            return False
        self.source = "forward count"
        return self._advance(None, signature)

    def reset(self) -> None:
        """Forget everything: the next call is step 0 of a new generation."""
        self.generation, self.step, self.branch = -1, 0, 0
        self._last_timestep, self._signature = None, None

    def _advance(self, timestep: Optional[float], signature: Tuple) -> bool:
        last = self._last_timestep
        new_generation = (
            self.generation < 0
            or signature != self._signature
            or (timestep is not None and last is not None and timestep > last)
        )
        if new_generation:
            self.generation += 1
            self.step, self.branch = 0, 0
        elif timestep is not None and timestep == last:
            self.branch += 1
        else:
            self.step, self.branch = self.step + 1, 0
        self._last_timestep, self._signature = timestep, signature
        return new_generation


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
