"""`Report`: what the backend did at every attention site, as data and as a table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

__all__ = ["ModelReport", "Report", "SiteReport"]


@dataclass
class SiteReport:
    """One SDPA call found in a compiled graph.

    ``name`` is the attention layer's place in its model (``blocks.3.attn1``), ``model`` the
    model's label: its class name, with ``#i`` where live models share a class. ``site_id``
    numbers the sites of one model. ``phases`` maps a CFG branch to one letter per step of the
    current generation: D dense, F fused search, C cached search, S sparse. ``density`` and
    ``recall`` are ``[B][H]`` lists from the last search; ``search_ms`` the time of each search
    (mass and selection; on a GPU the time between CUDA events, so the backend never syncs to
    measure it).
    """

    site_id: Optional[int]
    name: str
    shape: str
    eligible: bool
    reason: str = ""
    text: str = ""
    model: str = ""
    phases: Dict[int, str] = field(default_factory=dict)
    density: Optional[List[List[float]]] = None
    recall: Optional[List[List[float]]] = None
    search_ms: List[float] = field(default_factory=list)
    cache_bytes: int = 0

    def mean_density(self) -> Optional[float]:
        return _mean(self.density)

    def mean_recall(self) -> Optional[float]:
        return _mean(self.recall)


@dataclass
class ModelReport:
    """One compiled model: how its clock counts, and where it stands.

    ``clock`` is what detects a call of the model (``"timestep"`` or ``"forward count"``),
    ``steps_from`` what numbers the steps (``"calls"``, or ``"scheduler"``: the step index of
    the diffusers pipeline that calls the model); ``precision`` that of its sparse steps.
    """

    label: str
    clock: str
    steps_from: str
    generation: int
    step: int
    notes: List[str] = field(default_factory=list)
    precision: str = "bf16"


@dataclass
class Report:
    """Every attention site of every live model compiled with ``backend="adaspa"``."""

    sites: List[SiteReport]
    models: List[ModelReport] = field(default_factory=list)

    @property
    def rewritten(self) -> List[SiteReport]:
        return [s for s in self.sites if s.eligible]

    @property
    def skipped(self) -> List[SiteReport]:
        return [s for s in self.sites if not s.eligible]

    @property
    def notes(self) -> List[str]:
        return [n for m in self.models for n in m.notes]

    def model(self, label: Optional[str] = None) -> ModelReport:
        """The model called ``label``; without one, the only model in the report."""
        if label is None and len(self.models) == 1:
            return self.models[0]
        for m in self.models:
            if m.label == label:
                return m
        raise ValueError(f"the report holds models {[m.label for m in self.models]}; name one "
                         "(report.model('Label')), or call adaspa_compile.report(model)")

    @property
    def clock(self) -> str:
        """The only model's clock (see :class:`ModelReport`)."""
        return self.model().clock

    @property
    def generation(self) -> int:
        return self.model().generation

    @property
    def step(self) -> int:
        return self.model().step

    def __str__(self) -> str:
        lines = [f"adaspa report: {len(self.models)} model(s), {len(self.rewritten)} site(s) "
                 f"rewritten, {len(self.skipped)} left dense"]
        for m in self.models:
            precision = "; sparse steps in FP8" if m.precision == "fp8" else ""
            lines.append(f"{m.label}: steps counted by {m.clock}, numbered by {m.steps_from}; "
                         f"generation {m.generation}, step {m.step}{precision}")
        several = len(self.models) > 1
        header = ("site", "name", "shape [B,H,L,D]", "text", "density", "recall", "search ms",
                  "phases (D dense, F fused search, C cached search, S sparse)")
        rows = [_site_cells(s, several) for s in self.sites]
        widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)] if rows else []
        if rows:
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip())
            lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        for m in self.models:
            lines += [f"note ({m.label}): {n}" if several else f"note: {n}" for n in m.notes]
        return "\n".join(lines)


def _site_cells(s: SiteReport, with_model: bool) -> tuple:
    site = "-" if s.site_id is None else str(s.site_id)
    if with_model:
        site = f"{s.model}/{site}"
    if not s.eligible:
        return (site, s.name, s.shape, s.text, "-", "-", "-", f"dense: {s.reason}")
    phases = " ".join(f"b{b}:{_run_length(p)}" for b, p in s.phases.items()) or "not run yet"
    if s.reason:
        phases += f" (dense: {s.reason})"
    density, recall = s.mean_density(), s.mean_recall()
    return (site, s.name, s.shape, s.text,
            "-" if density is None else f"{density:.3f}",
            "-" if recall is None else f"{recall:.3f}",
            " ".join(f"{t:.1f}" for t in s.search_ms) or "-", phases)


def _run_length(letters: str) -> str:
    """``"DDDFSS"`` -> ``"D3 F S2"``."""
    out, i = [], 0
    while i < len(letters):
        j = i
        while j < len(letters) and letters[j] == letters[i]:
            j += 1
        out.append(letters[i] + (str(j - i) if j - i > 1 else ""))
        i = j
    return " ".join(out)


def _mean(rows: Optional[List[List[float]]]) -> Optional[float]:
    if not rows:
        return None
    values = [v for row in rows for v in row]
    return sum(values) / len(values) if values else None
