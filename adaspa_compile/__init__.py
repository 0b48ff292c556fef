"""adaspa-compile: AdaSpa sparse attention for video diffusion transformers, as a torch.compile
backend.

    pipe.transformer = torch.compile(pipe.transformer, backend="adaspa")

The backend is registered through an entry point, so no import is needed for that line. This
package adds the functional ops, the config, and ``report()`` / ``reset()``.
"""

from __future__ import annotations

from .blockmask import BlockMask
from .config import AdaSpaConfig
from .ops import attention_with_lse, block_mass, block_sparse_attention
from .plot import plot_masks
from .report import Report, SiteReport
from .runtime import get_runtime
from .selection import BlockLayout, Selection, select_blocks

__all__ = [
    "AdaSpaConfig",
    "BlockLayout",
    "BlockMask",
    "Report",
    "Selection",
    "SiteReport",
    "attention_with_lse",
    "block_mass",
    "block_sparse_attention",
    "plot_masks",
    "report",
    "reset",
    "select_blocks",
]

__version__ = "0.1.0"


def report() -> Report:
    """What the backend did at every attention site; ``print()`` it for a table."""
    return get_runtime().report()


def reset(forget_sites: bool = False) -> None:
    """Start a new generation at the next model call (drops every LSE and mask cache).

    ``forget_sites=True`` also drops the sites themselves; do it together with
    ``torch._dynamo.reset()``.
    """
    get_runtime().reset(forget_sites=forget_sites)
