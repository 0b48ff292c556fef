"""`plot_masks`: a picture of the per-head block masks the backend chose at one attention site.

matplotlib is an optional dependency (the ``plot`` extra); it is imported only when a picture is
drawn, through its object API (no pyplot, no global backend switch).
"""

from __future__ import annotations

import math
import os
from typing import Any, Optional, Union

from .state import _states

__all__ = ["plot_masks"]

# Figure geometry: the PNG is exactly (PANEL_PX * columns) x (PANEL_PX * rows + HEADER_PX) pixels.
_DPI = 100
PANEL_PX = 250
HEADER_PX = 60
MAX_COLUMNS = 4


def plot_masks(site: Optional[int] = None, path: Union[str, os.PathLike] = "masks.png",
               max_heads: int = 8, branch: int = 0, batch: int = 0,
               module: Optional[Any] = None) -> str:
    """Write a PNG of the block masks of ``site`` (one panel per head, kept blocks dark).

    ``site`` is a site id of ``module``'s model in ``adaspa_compile.report()`` (default: the
    first site with a mask for ``branch``; ``module`` may be left out while one model is
    compiled); ``branch`` the CFG branch and ``batch`` the batch element. The masks are
    those of the latest search. Text blocks (always kept) are marked with red lines. The image is
    ``250 * min(heads, 4)`` pixels wide and ``250 * rows + 60`` high. Returns ``path``.

    Raises ``ValueError`` for an unknown site or a site that has not searched yet, and
    ``ImportError`` without matplotlib.
    """
    if not isinstance(max_heads, int) or max_heads < 1:
        raise ValueError(f"max_heads must be an int >= 1, got {max_heads!r}")
    sites = _model_sites(module)
    site_ids = sorted(sites)
    if not site_ids:
        raise ValueError("no attention site has been rewritten: compile a model with "
                         "torch.compile(model, backend='adaspa') and run it past its first "
                         "search step")
    if site is None:
        searched = [i for i in site_ids if _mask_of(sites[i], branch) is not None]
        if not searched:
            raise ValueError(f"no site has a mask for branch {branch} yet: run the compiled model "
                             "up to its first search step (options['search_steps'][0]); sites: "
                             f"{site_ids}")
        site = searched[0]
    elif site not in site_ids:
        raise ValueError(f"unknown adaspa site {site!r}; rewritten sites are {site_ids} "
                         "(see adaspa_compile.report())")
    entry = sites[site]
    mask = _mask_of(entry, branch)
    if mask is None:
        have = sorted(b for b in entry.caches if _mask_of(entry, b) is not None)
        phases = {b: "".join(p.letter for p in ps) for b, ps in entry.phases.items()}
        raise ValueError(f"site {site} ({entry.name}) has no mask for branch {branch} yet: "
                         f"masks come from the search steps {entry.cfg.search_steps}; phases so "
                         f"far {phases or 'none'}, branches with a mask: {have or 'none'}")
    if not 0 <= batch < mask.shape[0]:
        raise ValueError(f"batch {batch} is out of range: the mask holds {mask.shape[0]} "
                         "element(s)")

    Figure, FigureCanvasAgg = _matplotlib()
    dense = mask.to_dense()[batch].cpu()  # [H, nq, nk]
    heads = min(dense.shape[0], max_heads)
    cols = min(heads, MAX_COLUMNS)
    rows = math.ceil(heads / cols)
    fig = Figure(figsize=(cols * PANEL_PX / _DPI, (rows * PANEL_PX + HEADER_PX) / _DPI), dpi=_DPI)
    FigureCanvasAgg(fig)
    text = entry.info.text.tokens(mask.seq_len)
    bs = mask.block_size
    top = 1 - HEADER_PX / (rows * PANEL_PX + HEADER_PX)
    for h in range(heads):
        r, c = divmod(h, cols)
        # Each panel leaves room for its title above and its tick labels below and left.
        ax = fig.add_axes(((c + 0.1) / cols, top * (rows - r - 1 + 0.08) / rows,
                           0.84 / cols, top * 0.76 / rows))
        ax.imshow(dense[h].numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest",
                  aspect="auto")
        if text is not None:
            first = text[0] // bs - 0.5
            ax.axhline(first, color="tab:red", linewidth=0.8)
            ax.axvline(first, color="tab:red", linewidth=0.8)
        ax.set_title(f"head {h}: kept {float(dense[h].float().mean()):.2f}", fontsize=8)
        ax.tick_params(labelsize=6)
    shown = f"{heads} of {dense.shape[0]} heads" if heads < dense.shape[0] else f"{heads} heads"
    fig.suptitle(f"site {site} {entry.name} {entry.info.shape}\nbranch {branch}, "
                 f"batch {batch}, {shown}, {dense.shape[1]}x{dense.shape[2]} blocks of {bs}",
                 fontsize=8)
    fig.savefig(os.fspath(path), dpi=_DPI)
    return os.fspath(path)


def _model_sites(module: Optional[Any]) -> dict:
    """``{site id: site}`` of the one model compiled, or of ``module``."""
    states = _states(module)
    if len(states) > 1:
        raise ValueError(f"{len(states)} models are compiled with backend='adaspa' "
                         f"({[label for label, _ in states]}): pass module=the model to plot")
    return {s.site_id: s for _, state in states for s in state.sites.values()}


def _mask_of(site, branch: int):
    cache = site.caches.get(branch)
    return None if cache is None else cache.mask


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("adaspa_compile.plot_masks needs matplotlib: "
                          "pip install 'adaspa-compile[plot]' (or pip install matplotlib)") from exc
    return Figure, FigureCanvasAgg
