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
from .report import ModelReport, Report, SiteReport
from .selection import BlockLayout, Selection, select_blocks
from .state import report, reset

__all__ = [
    "AdaSpaConfig",
    "BlockLayout",
    "BlockMask",
    "ModelReport",
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
