"""The "text encoder" of the fidelity model: a fixed vocabulary and a frozen embedding table.

Captions are short word lists ("red circle bouncing and blue square orbiting, camera pans left").
Each word is one token; a caption is padded to :data:`MAX_TOKENS` and comes with a key-padding mask,
the way HunyuanVideo pads its LLM text and passes ``encoder_attention_mask``. The encoder is a
frozen random table (token + position vectors, seeded), standing in for a frozen LLM: the
transformer learns to read it. It is saved next to the transformer weights
(``text_encoder.safetensors``) and loaded with them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch

__all__ = ["VOCAB", "MAX_TOKENS", "TEXT_DIM", "NULL_CAPTION", "Conditioning", "TextEncoder",
           "tokenize"]

COLOURS = ("red", "green", "blue", "yellow", "cyan", "magenta", "orange", "white")
SHAPES = ("circle", "square", "triangle", "diamond", "ring", "cross")
MOTIONS = ("bouncing", "orbiting", "spinning", "hopping", "pulsing")
CAMERA_WORDS = ("camera", "static", "pans", "zooms", "left", "right", "up", "down", "in", "out")
GLUE_WORDS = ("and", "behind", "bar")
PAD, NULL = "<pad>", "<null>"

# Token 0 pads, token 1 is the empty caption (the negative prompt of classifier-free guidance).
VOCAB = (PAD, NULL) + COLOURS + SHAPES + MOTIONS + CAMERA_WORDS + GLUE_WORDS
# Three objects of three words, two "and", "behind bar" and a three-word camera phrase.
MAX_TOKENS = 16
TEXT_DIM = 64
NULL_CAPTION = ""

_TABLE_SEED = 20250302
_FILE = "text_encoder.safetensors"


def tokenize(caption: str, vocab: Sequence[str] = VOCAB, max_tokens: int = MAX_TOKENS) -> List[int]:
    """Token ids of ``caption`` (commas and case ignored); the empty caption is ``[NULL]``."""
    words = caption.replace(",", " ").lower().split()
    if not words:
        return [vocab.index(NULL)]
    unknown = sorted({w for w in words if w not in vocab or w in (PAD, NULL)})
    if unknown:
        raise ValueError(f"caption {caption!r} has words outside the vocabulary: {unknown}; "
                         f"known words: {' '.join(v for v in vocab if v not in (PAD, NULL))}")
    if len(words) > max_tokens:
        raise ValueError(f"caption {caption!r} has {len(words)} words; at most {max_tokens} fit")
    return [vocab.index(w) for w in words]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a CPU tensor to ``device``; to a GPU through pinned memory without a host sync, so
    that making a batch does not stall the training loop."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass
class Conditioning:
    """What the transformer reads besides the video, for ``B`` clips.

    ``encoder_hidden_states`` is fp32 ``[B, T, C]`` (zero at padded tokens),
    ``encoder_attention_mask`` bool ``[B, T]`` (True = a real token, left-aligned),
    ``pooled_projections`` fp32 ``[B, C]`` (mean over the real tokens), and ``captions`` the text.
    """

    encoder_hidden_states: torch.Tensor
    encoder_attention_mask: torch.Tensor
    pooled_projections: torch.Tensor
    captions: List[str]

    def __post_init__(self) -> None:
        b, t, _ = self.encoder_hidden_states.shape
        if self.encoder_attention_mask.shape != (b, t) or self.pooled_projections.shape[0] != b \
                or len(self.captions) != b:
            raise ValueError("Conditioning parts disagree: embeddings "
                             f"{tuple(self.encoder_hidden_states.shape)}, mask "
                             f"{tuple(self.encoder_attention_mask.shape)}, pooled "
                             f"{tuple(self.pooled_projections.shape)}, {len(self.captions)} "
                             "captions")

    def __len__(self) -> int:
        return len(self.captions)

    def to(self, device=None, dtype=None) -> "Conditioning":
        """A copy on ``device``; ``dtype`` applies to the embeddings (the mask stays bool)."""
        return Conditioning(self.encoder_hidden_states.to(device=device, dtype=dtype),
                            self.encoder_attention_mask.to(device=device),
                            self.pooled_projections.to(device=device, dtype=dtype),
                            list(self.captions))

    def select(self, index: Sequence[int]) -> "Conditioning":
        """The clips at ``index``, in that order."""
        idx = torch.as_tensor(list(index), dtype=torch.long,
                              device=self.encoder_hidden_states.device)
        return Conditioning(self.encoder_hidden_states[idx], self.encoder_attention_mask[idx],
                            self.pooled_projections[idx], [self.captions[i] for i in index])

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        return Conditioning(torch.cat([p.encoder_hidden_states for p in parts]),
                            torch.cat([p.encoder_attention_mask for p in parts]),
                            torch.cat([p.pooled_projections for p in parts]),
                            [c for p in parts for c in p.captions])

    def model_kwargs(self) -> Dict[str, torch.Tensor]:
        """The transformer's keyword inputs, named as HunyuanVideo's pipeline passes them."""
        return dict(encoder_hidden_states=self.encoder_hidden_states,
                    encoder_attention_mask=self.encoder_attention_mask,
                    pooled_projections=self.pooled_projections)


class TextEncoder(torch.nn.Module):
    """Frozen token + position tables: caption -> ``[T, C]`` embeddings with unit RMS.

    The tables are buffers (never trained) drawn from a fixed seed, so a fresh encoder equals the
    one saved with the weights; :meth:`load` still reads the saved tables and vocabulary.
    """

    def __init__(self, vocab: Sequence[str] = VOCAB, max_tokens: int = MAX_TOKENS,
                 dim: int = TEXT_DIM, seed: int = _TABLE_SEED) -> None:
        super().__init__()
        self.vocab = tuple(vocab)
        self.max_tokens = max_tokens
        self.dim = dim
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("token_table", torch.randn(len(self.vocab), dim, generator=gen))
        self.register_buffer("position_table", 0.5 * torch.randn(max_tokens, dim, generator=gen))

    @torch.no_grad()
    def forward(self, captions: Sequence[str]) -> Conditioning:
        ids = torch.zeros(len(captions), self.max_tokens, dtype=torch.long)
        mask = torch.zeros(len(captions), self.max_tokens, dtype=torch.bool)
        for i, caption in enumerate(captions):
            tokens = tokenize(caption, self.vocab, self.max_tokens)
            ids[i, : len(tokens)] = torch.tensor(tokens)
            mask[i, : len(tokens)] = True
        device = self.token_table.device
        ids, mask = to_device(ids, device), to_device(mask, device)
        emb = (self.token_table[ids] + self.position_table) / math.sqrt(1.25)
        emb = emb * mask[..., None]
        pooled = emb.sum(1) / mask.sum(1, keepdim=True)
        return Conditioning(emb, mask, pooled, list(captions))

    def save(self, folder: str) -> str:
        """Write ``text_encoder.safetensors`` (tables; vocabulary in the metadata) in ``folder``."""
        from safetensors.torch import save_file

        path = os.path.join(folder, _FILE)
        save_file({"token_table": self.token_table.cpu().contiguous(),
                   "position_table": self.position_table.cpu().contiguous()}, path,
                  metadata={"vocab": json.dumps(list(self.vocab))})
        return path

    @classmethod
    def load(cls, folder: str) -> "TextEncoder":
        """The encoder saved by :meth:`save` in ``folder``."""
        from safetensors import safe_open

        path = os.path.join(folder, _FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: the fidelity model folder holds the "
                                    "transformer and its text encoder (see save_model)")
        with safe_open(path, framework="pt") as f:
            vocab = json.loads(f.metadata()["vocab"])
            tokens, positions = f.get_tensor("token_table"), f.get_tensor("position_table")
        enc = cls(vocab=vocab, max_tokens=positions.shape[0], dim=tokens.shape[1])
        enc.token_table.copy_(tokens)
        enc.position_table.copy_(positions)
        return enc
