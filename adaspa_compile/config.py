"""`AdaSpaConfig`: every user-facing knob of the backend, validated once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple, Union

from .schedule import DEFAULT_SEARCH_STEPS

__all__ = ["AdaSpaConfig", "PRESETS", "TextTokens"]

MODES = ("sparsity", "recall")
CFG_MASKS = ("per_branch", "cond", "sum")
PRECISIONS = ("bf16", "fp8")
HEAD_BUDGETS = ("tiers", "uniform", "layer")
INNER_BACKENDS = ("inductor", "aot_eager", "eager")
SELECTORS = ("adaspa", "window", "pooled")
TEXT_POSITIONS = ("first", "last")

# ``text_tokens`` override: ``0`` (no text in self-attention) or ``("first" | "last", count)``.
TextTokens = Union[int, Tuple[str, int]]

# ``options={"preset": name}``: a named set of options; keys given beside it override it.
PRESETS: Mapping[str, Mapping[str, Any]] = {
    "paper": {"sparsity": 0.8, "block_size": 64, "search_steps": DEFAULT_SEARCH_STEPS,
              "head_budget": "tiers", "cfg_mask": "per_branch", "text_sink": True,
              "mode": "sparsity", "selector": "adaspa", "lse_cache": True},
}

# Older option names, still accepted in ``options=``: each maps True / False to a value of the
# key that replaced it.
ALIASES: Mapping[str, Tuple[str, Mapping[bool, str]]] = {
    "head_adaptive": ("head_budget", {True: "tiers", False: "uniform"}),
    "share_cfg_mask": ("cfg_mask", {True: "cond", False: "per_branch"}),
}


@dataclass(frozen=True)
class AdaSpaConfig:
    """Settings of the ``adaspa`` backend; the same keys are accepted through ``options=``.

    Attributes:
        sparsity: target share of video key blocks dropped per layer, in ``[0, 1)``.
        block_size: side of the square attention blocks (16..256, a power of two).
        search_steps: zero-based denoising steps that search a mask; the first is the fused
            (exact) search, the later ones re-search from the cached LSE. Steps before the first
            run the model's own dense SDPA.
        head_budget: how a layer's budget (``mode="sparsity"``) is split over its heads:
            ``"tiers"`` (the paper's three tiers: heads ranked by their recall at ``sparsity``
            get ``sparsity`` plus or minus ``(1 - sparsity) / 2``, or ``sparsity``),
            ``"uniform"`` (every head keeps the same count per row) or ``"layer"`` (each
            query-block row keeps the count of ``"uniform"`` summed over the heads, spent on
            the blocks of any head that add the most to the layer's summed recall; every head
            keeps its diagonal block). All three keep the layer's mean density. Older name:
            ``head_adaptive`` (True: ``"tiers"``, False: ``"uniform"``).
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
        cfg_mask: where the masks of the calls of one step (classifier-free guidance's
            branches, when the pipeline calls the transformer once per branch) come from:
            ``"per_branch"`` (the paper: each branch searches its own), ``"cond"`` (the later
            branches run on the first call's mask and never search: cheaper search steps) or
            ``"sum"`` (every branch searches; the selection of a later branch runs on the sum of
            the block masses of the step's branches so far, and that one mask replaces theirs.
            The first branch's mass is held until its next call: one fp32 ``[B, H, nb, nb]``
            per site). Batched CFG (one call of batch 2) keeps per-item masks either way. Older
            name: ``share_cfg_mask`` (True: ``"cond"``, False: ``"per_branch"``).
        precision: the block-sparse steps' arithmetic: ``"bf16"`` (the model's dtype) or
            ``"fp8"`` (Q and K rounded to FP8 per block of tokens, K smoothed by its mean, V
            per channel, and the probabilities too: FP8 tensor cores, on GPUs from Ada and
            Hopper on, head dims 64 and 128; elsewhere refused at compile time). The searches
            and the dense steps stay in the model's dtype. On the CPU, ``"fp8"`` runs the
            PyTorch reference of the same rounding.

    ``options={"preset": "paper"}`` sets the paper's settings (:data:`PRESETS`); keys given
    beside it override them.
    """

    sparsity: float = 0.8
    block_size: int = 64
    search_steps: Tuple[int, ...] = DEFAULT_SEARCH_STEPS
    head_budget: str = "tiers"
    text_sink: bool = True
    mode: str = "sparsity"
    recall: float = 0.95
    min_seq_len: int = 1024
    text_tokens: Optional[TextTokens] = None
    inner_backend: str = "inductor"
    selector: str = "adaspa"
    video_grid: Optional[Tuple[int, int, int]] = None
    lse_cache: bool = True
    cfg_mask: str = "per_branch"
    precision: str = "bf16"

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
        """Build a config from ``torch.compile(..., options=...)``: a ``"preset"`` first, the
        other keys over it (older names as their replacements); unknown keys raise."""
        if options is None:
            return cls()
        if isinstance(options, AdaSpaConfig):
            return options
        if not isinstance(options, Mapping):
            raise ValueError(f"adaspa options must be a dict, got {type(options).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(known) - set(ALIASES) - {"preset"})
        if unknown:
            raise ValueError(f"unknown adaspa option(s) {unknown}; valid keys are "
                             f"{known + ['preset'] + list(ALIASES)}")
        given = dict(options)
        preset = _preset(given.pop("preset", None))
        return cls(**{**preset, **_renamed(given)})

    def replace(self, **changes: Any) -> "AdaSpaConfig":
        """A copy with ``changes`` applied and validated."""
        return dataclasses.replace(self, **changes)


def _preset(name: Any) -> Mapping[str, Any]:
    """The options of preset ``name`` (none for ``None``)."""
    if name is None:
        return {}
    if not isinstance(name, str) or name not in PRESETS:
        _fail("preset", name, " | ".join(PRESETS))
    return PRESETS[name]


def _renamed(options: Mapping[str, Any]) -> Mapping[str, Any]:
    """``options`` with every older key replaced by its new key and value."""
    out = dict(options)
    for old, (new, values) in ALIASES.items():
        if old not in out:
            continue
        value = out.pop(old)
        if new in out:
            raise ValueError(f"adaspa options {old!r} and {new!r} are both given; {old!r} is the "
                             f"older name of {new!r}: give {new!r} only")
        if not isinstance(value, bool):
            _fail(old, value, f"True or False (or give {new!r}: {' | '.join(values.values())})")
        out[new] = values[value]
    return out


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
    for key in ("text_sink", "lse_cache"):
        if not isinstance(getattr(cfg, key), bool):
            _fail(key, getattr(cfg, key), "True or False")
    for key, valid in (("mode", MODES), ("head_budget", HEAD_BUDGETS), ("cfg_mask", CFG_MASKS),
                       ("precision", PRECISIONS)):
        if getattr(cfg, key) not in valid:
            _fail(key, getattr(cfg, key), " | ".join(valid))
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
