"""What the passes find out about each SDPA call of a graph: plain, immutable facts.

The passes return these; the backend hands them to the compiled graph, which registers them with
the state of each model that calls it (``adaspa_compile/state.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

__all__ = ["TextSpan", "SiteInfo"]


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
    """One SDPA call of a graph.

    ``name`` is its place in the graph (the module path Dynamo recorded, relative to the compiled
    frame). ``layer_weight`` is the graph input index of a parameter of the attention layer (its
    query projection or query norm): its name in the model that calls the graph names the site
    there, whichever frame was compiled. ``head_group`` is the process group of a Ulysses
    all-to-all in front of the call.
    """

    name: str
    shape: str
    eligible: bool
    reason: str = ""
    text: TextSpan = TextSpan(None)
    layer_weight: Optional[int] = None
    head_group: Optional[str] = None
