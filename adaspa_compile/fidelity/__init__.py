"""A small trained video DiT to measure what sparse attention costs in quality.

Random weights have no attention structure, so sparse attention on them proves nothing. This
package holds an honest proxy: a procedural video data set (:mod:`.data`), a frozen caption
encoder (:mod:`.text`), and a small diffusers ``HunyuanVideoTransformer3DModel`` trained on it
with flow matching, with its sampler (:mod:`.model`). Train it with
``python benchmarks/train_fidelity_model.py``; the weights ship in ``fidelity/weights/``.

Needs ``diffusers`` (the ``diffusers`` extra).
"""

from __future__ import annotations

from .data import (Scene, SceneObject, VideoBatch, conditioning, make_batch, null_conditioning,
                   random_captions, render, sample_scene)
from .model import (FIDELITY_CONFIG, TRAIN_SHAPES, WEIGHTS_DIR, FidelityModel, build_model,
                    default_shift, forward_flops, load_model, sample, save_model, shift_sigmas,
                    to_uint8)
from .text import MAX_TOKENS, TEXT_DIM, VOCAB, Conditioning, TextEncoder, tokenize

__all__ = [
    "FIDELITY_CONFIG",
    "MAX_TOKENS",
    "TEXT_DIM",
    "TRAIN_SHAPES",
    "VOCAB",
    "WEIGHTS_DIR",
    "Conditioning",
    "FidelityModel",
    "Scene",
    "SceneObject",
    "TextEncoder",
    "VideoBatch",
    "build_model",
    "conditioning",
    "default_shift",
    "forward_flops",
    "load_model",
    "make_batch",
    "null_conditioning",
    "random_captions",
    "render",
    "sample",
    "sample_scene",
    "save_model",
    "shift_sigmas",
    "to_uint8",
    "tokenize",
]
