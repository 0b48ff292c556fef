"""`AdaSpaConfig`: every user-facing knob of the backend, validated once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple, Union

from .schedule import DEFAULT_SEARCH_STEPS

__all__ = ["AdaSpaConfig", "TextTokens"]

MODES = ("sparsity", "recall")
INNER_BACKENDS = ("inductor", "aot_eager", "eager")
SELECTORS = ("adaspa", "window", "pooled")
TEXT_POSITIONS = ("first", "last")

# ``text_tokens`` override: ``0`` (no text in self-attention) or ``("first" | "last", count)``.
TextTokens = Union[int, Tuple[str, int]]


@dataclass(frozen=True)
class AdaSpaConfig:
    """Settings of the ``adaspa`` backend; the same keys are accepted through ``options=``.

    Attributes:
        sparsity: target share of video key blocks dropped per layer, in ``[0, 1)``.
        block_size: side of the square attention blocks (16..256, a power of two).
        search_steps: zero-based denoising steps that search a mask; the first is the fused
            (exact) search, the later ones re-search from the cached LSE. Steps before the first
            run the model's own dense SDPA.
        head_adaptive: spread the sparsity over heads in three tiers (docs/method.md, Head tiers).
        text_sink: always keep the blocks that touch text tokens.
        mode: ``"sparsity"`` (fixed budget) or ``"recall"`` (fewest blocks reaching ``recall``).
        recall: the target attention recall in ``mode="recall"``, in ``(0, 1]``.
        min_seq_len: attention calls shorter than this stay dense.
        text_tokens: override the text span found in the graph: ``0`` for none, or
            ``("first" | "last", count)``.
        inner_backend: what compiles the rest of the graph: ``"inductor"``, ``"aot_eager"``
            or ``"eager"``.
        selector: how blocks are ranked: ``"adaspa"`` (exact block mass), ``"pooled"``
            (mean-pooled q.k per block) or ``"window"`` (static 3D local window).
        video_grid: the video's token grid ``(frames, height, width)`` for
            ``selector="window"``; without it the window is 1D along the sequence.
        lse_cache: re-search from the LSE cached at the first search step; ``False`` runs a
            fused search at every search step (an ablation).
        share_cfg_mask: the later calls of a step (classifier-free guidance's unconditional
            branch, when the pipeline calls the transformer once per branch) reuse the first
            call's mask instead of searching their own. Cheaper search steps, and on the shipped
            fidelity model a higher PSNR (guidance amplifies the difference of two branches'
            masks; ``benchmarks/RESULTS.md``). ``False`` (docs/method.md, CFG branches) searches
            per branch. Batched CFG (one call of batch 2) keeps per-item masks either way.
    """

    sparsity: float = 0.8
    block_size: int = 64
    search_steps: Tuple[int, ...] = DEFAULT_SEARCH_STEPS
    head_adaptive: bool = True
    text_sink: bool = True
    mode: str = "sparsity"
    recall: float = 0.95
    min_seq_len: int = 1024
    text_tokens: Optional[TextTokens] = None
    inner_backend: str = "inductor"
    selector: str = "adaspa"
    video_grid: Optional[Tuple[int, int, int]] = None
    lse_cache: bool = True
    share_cfg_mask: bool = False

    def __post_init__(self) -> None:
        steps = self.search_steps
        if isinstance(steps, (str, bytes)) or not hasattr(steps, "__iter__"):
            _fail("search_steps", steps, "a non-empty, strictly increasing tuple of step "
                  f"indexes >= 0, e.g. ({steps!r},) for one search step")
        object.__setattr__(self, "search_steps", tuple(steps))
        for key in ("text_tokens", "video_grid"):
            if isinstance(getattr(self, key), list):
                object.__setattr__(self, key, tuple(getattr(self, key)))
        _validate(self)

    @classmethod
    def from_options(cls, options: Optional[Mapping[str, Any]]) -> "AdaSpaConfig":
        """Build a config from ``torch.compile(..., options=...)``; unknown keys raise."""
        if options is None:
            return cls()
        if isinstance(options, AdaSpaConfig):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(f"adaspa options must be a dict, got {type(options).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"unknown adaspa option(s) {unknown}; valid keys are {known}")
        return cls(**options)

    def replace(self, **changes: Any) -> "AdaSpaConfig":
        """A copy with ``changes`` applied and validated."""
        return dataclasses.replace(self, **changes)


def _fail(key: str, value: Any, valid: str) -> None:
    raise ValueError(f"adaspa option {key!r} got {value!r}; valid values: {valid}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _validate(cfg: AdaSpaConfig) -> None:
    if not _is_number(cfg.sparsity) or not 0.0 <= cfg.sparsity < 1.0:
        _fail("sparsity", cfg.sparsity, "a float in [0, 1)")
    bs = cfg.block_size
    if not _is_int(bs) or bs < 16 or bs > 256 or bs & (bs - 1):
        _fail("block_size", bs, "a power of two from 16 to 256")
    steps = cfg.search_steps
    if (
        not steps
        or not all(_is_int(s) and s >= 0 for s in steps)
        or list(steps) != sorted(set(steps))
    ):
        _fail("search_steps", steps, "a non-empty, strictly increasing tuple of step indexes >= 0")
    for key in ("head_adaptive", "text_sink", "lse_cache", "share_cfg_mask"):
        if not isinstance(getattr(cfg, key), bool):
            _fail(key, getattr(cfg, key), "True or False")
    if cfg.mode not in MODES:
        _fail("mode", cfg.mode, " | ".join(MODES))
    if not _is_number(cfg.recall) or not 0.0 < cfg.recall <= 1.0:
        _fail("recall", cfg.recall, "a float in (0, 1]")
    if not _is_int(cfg.min_seq_len) or cfg.min_seq_len < 1:
        _fail("min_seq_len", cfg.min_seq_len, "an int >= 1")
    if cfg.inner_backend not in INNER_BACKENDS:
        _fail("inner_backend", cfg.inner_backend, " | ".join(INNER_BACKENDS))
    if cfg.selector not in SELECTORS:
        _fail("selector", cfg.selector, " | ".join(SELECTORS))
    grid = cfg.video_grid
    if grid is not None and (not isinstance(grid, tuple) or len(grid) != 3
                             or not all(_is_int(g) and g >= 1 for g in grid)):
        _fail("video_grid", grid, "None or (frames, height, width) of ints >= 1")
    _validate_text_tokens(cfg.text_tokens)


def _validate_text_tokens(tt: Any) -> None:
    valid = "None, 0, or ('first' | 'last', count >= 1)"
    if tt is None or (_is_int(tt) and tt == 0):
        return
    if (
        not isinstance(tt, tuple)
        or len(tt) != 2
        or tt[0] not in TEXT_POSITIONS
        or not _is_int(tt[1])
        or tt[1] < 1
    ):
        _fail("text_tokens", tt, valid)
