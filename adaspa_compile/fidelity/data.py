"""A seeded procedural video data set, rendered on the fly at any size.

Each clip shows one to three shapes (circle, square, triangle, diamond, ring, cross) in one of
eight colours, moving in one of five ways (bouncing off the walls, orbiting, spinning, hopping,
pulsing), drawn back to front so they occlude each other, sometimes behind a grey bar, over a
checkered background seen by a camera that is static, pans or zooms. The caption says all of it:

    "red circle bouncing and blue square orbiting behind bar, camera pans left"

Scenes live in world units (the frame is 1 high and ``width / height`` wide at zoom 1), so any
resolution renders the same scene; time runs at 15 frames per second, so a longer clip continues
the same motion. A clip depends only on ``(seed, index in the batch)``: the first clips of a larger
batch equal a smaller batch with the same seed, on one device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .text import COLOURS, MOTIONS, NULL_CAPTION, SHAPES, Conditioning, TextEncoder, to_device

__all__ = ["Scene", "SceneObject", "VideoBatch", "sample_scene", "render", "make_batch",
           "conditioning", "null_conditioning", "random_captions", "FPS"]

FPS = 15.0
_RGB = {"red": (0.92, 0.12, 0.10), "green": (0.15, 0.80, 0.20), "blue": (0.15, 0.30, 0.95),
        "yellow": (0.95, 0.88, 0.15), "cyan": (0.10, 0.85, 0.90), "magenta": (0.90, 0.15, 0.85),
        "orange": (0.98, 0.55, 0.08), "white": (0.95, 0.95, 0.95)}
# Shapes that look the same when rotated do not spin.
_ROUND = ("circle", "ring")
_CAMERAS = ("static", "pans left", "pans right", "pans up", "pans down", "zooms in", "zooms out")
_CAMERA_P = (0.3, 0.1, 0.1, 0.1, 0.1, 0.15, 0.15)


@dataclass(frozen=True)
class SceneObject:
    """One shape. Lengths in world units, times in seconds, angles in radians."""

    kind: str
    colour: str
    motion: str
    rgb: Tuple[float, float, float]
    size: float  # radius
    start: Tuple[float, float]  # position at t = 0 (bouncing, hopping: start; orbiting: centre)
    velocity: Tuple[float, float]
    angle: float  # orientation at t = 0
    spin: float  # angular velocity of the shape
    orbit: Tuple[float, float, float]  # radius, angular velocity, phase
    hop: Tuple[float, float]  # height, period
    pulse: Tuple[float, float]  # frequency, phase

    @property
    def phrase(self) -> str:
        return f"{self.colour} {self.kind} {self.motion}"


@dataclass(frozen=True)
class Scene:
    """A clip's content: objects back to front, the camera, the bar and the background."""

    objects: Tuple[SceneObject, ...]
    aspect: float
    camera: str
    camera_rate: float  # world units per second (pans) or log-zoom per second (zooms)
    bar: Optional[Tuple[float, float, float]]  # (x centre, half width, grey level) or None
    # Two colours and the tile side of the checkerboard.
    background: Tuple[Tuple[float, float, float], Tuple[float, float, float], float]

    @property
    def caption(self) -> str:
        text = " and ".join(o.phrase for o in self.objects)
        if self.bar is not None:
            text += " behind bar"
        return f"{text}, camera {self.camera}"


def sample_scene(rng: np.random.Generator, aspect: float = 1.0) -> Scene:
    """Draw one scene from ``rng``."""
    n = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    objects = tuple(_sample_object(rng, aspect) for _ in range(n))
    camera = str(rng.choice(_CAMERAS, p=_CAMERA_P))
    rate = float(rng.uniform(0.10, 0.22) if camera.startswith("pans") else rng.uniform(0.2, 0.4))
    bar = None
    if rng.random() < 0.25:
        bar = (float(rng.uniform(0.3, 0.7) * aspect), float(rng.uniform(0.03, 0.06)),
               float(rng.uniform(0.45, 0.7)))
    hue = rng.uniform(0, 2 * math.pi)
    base = np.array([math.cos(hue), math.cos(hue - 2.1), math.cos(hue + 2.1)]) * 0.06
    dark = np.clip(rng.uniform(0.12, 0.22) + base, 0, 1)
    light = np.clip(dark + rng.uniform(0.08, 0.16), 0, 1)
    background = (tuple(float(c) for c in dark), tuple(float(c) for c in light),
                  float(rng.uniform(0.08, 0.2)))
    return Scene(objects, aspect, camera, rate, bar, background)


def _sample_object(rng: np.random.Generator, aspect: float) -> SceneObject:
    kind = str(rng.choice(SHAPES))
    colour = str(rng.choice(COLOURS))
    motions = [m for m in MOTIONS if not (m == "spinning" and kind in _ROUND)]
    motion = str(rng.choice(motions))
    rgb = tuple(float(np.clip(c + rng.uniform(-0.05, 0.05), 0, 1)) for c in _RGB[colour])
    size = float(rng.uniform(0.08, 0.15))
    speed = {"bouncing": (0.35, 0.7), "hopping": (0.1, 0.3)}.get(motion, (0.0, 0.06))
    direction = rng.uniform(0, 2 * math.pi)
    v = rng.uniform(*speed)
    velocity = (float(v * math.cos(direction)), float(v * math.sin(direction)))
    if motion == "hopping":
        velocity = (velocity[0], 0.0)
    start = (float(rng.uniform(0.2, 0.8) * aspect), float(rng.uniform(0.2, 0.8)))
    if motion == "hopping":
        start = (start[0], float(rng.uniform(0.72, 0.85)))
    radius = float(rng.uniform(0.1, 0.22))
    omega = float(rng.uniform(2.0, 4.0) * rng.choice([-1, 1]))
    spin = float(rng.uniform(3.0, 6.0) * rng.choice([-1, 1])) if motion == "spinning" else 0.0
    # Upright unless spinning, so that a square never looks like a diamond.
    angle = float(rng.uniform(-0.12, 0.12)) if motion != "spinning" else float(rng.uniform(0, 6.3))
    return SceneObject(kind=kind, colour=colour, motion=motion, rgb=rgb, size=size, start=start,
                       velocity=velocity, angle=angle, spin=spin,
                       orbit=(radius, omega, float(rng.uniform(0, 2 * math.pi))),
                       hop=(float(rng.uniform(0.25, 0.45)), float(rng.uniform(0.45, 0.75))),
                       pulse=(float(rng.uniform(1.0, 2.0)), float(rng.uniform(0, 2 * math.pi))))


def _reflect(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Fold ``x`` into ``[lo, hi]`` as a ball bouncing between two walls."""
    w = hi - lo
    u = np.mod(x - lo, 2 * w)
    return lo + np.where(u < w, u, 2 * w - u)


def _trajectory(o: SceneObject, t: np.ndarray, aspect: float) -> Tuple[np.ndarray, ...]:
    """``(x, y, angle, size)`` of ``o`` at times ``t``, each shaped like ``t``."""
    x0, y0 = o.start
    vx, vy = o.velocity
    size = np.full_like(t, o.size)
    angle = o.angle + o.spin * t
    lo, hi_x, hi_y = o.size, aspect - o.size, 1.0 - o.size
    if o.motion == "orbiting":
        r, w, phase = o.orbit
        cx = float(np.clip(x0, lo + r, hi_x - r)) if hi_x - lo > 2 * r else aspect / 2
        cy = float(np.clip(y0, lo + r, hi_y - r))
        return cx + r * np.cos(w * t + phase), cy + r * np.sin(w * t + phase), angle, size
    x = _reflect(x0 + vx * t, lo, hi_x)
    y = _reflect(y0 + vy * t, lo, hi_y)
    if o.motion == "hopping":
        height, period = o.hop
        y = np.full_like(t, y0) - height * np.abs(np.sin(math.pi * t / period))
    elif o.motion == "pulsing":
        freq, phase = o.pulse
        size = o.size * (1.0 + 0.35 * np.sin(2 * math.pi * freq * t + phase))
    return x, y, angle, size


def _camera(scene: Scene, t: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(centre x, centre y, zoom)`` at times ``t``: the world point at the frame centre."""
    cx = np.full_like(t, scene.aspect / 2)
    cy = np.full_like(t, 0.5)
    zoom = np.ones_like(t)
    direction = scene.camera.split()[-1]
    if scene.camera.startswith("pans"):
        dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]
        cx, cy = cx + dx * scene.camera_rate * t, cy + dy * scene.camera_rate * t
    elif scene.camera.startswith("zooms"):
        zoom = np.exp((1 if direction == "in" else -1) * scene.camera_rate * t)
    return cx, cy, zoom


def _shape_distance(kind: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) of a unit-radius shape, in shape-radius units."""
    if kind == "circle":
        return torch.sqrt(x * x + y * y) - 1.0
    if kind == "square":
        return torch.maximum(x.abs(), y.abs()) - 0.8
    if kind == "diamond":
        return (x.abs() + y.abs() - 1.1) / math.sqrt(2.0)
    if kind == "triangle":
        edges = [math.pi / 2 + 2 * math.pi * k / 3 for k in range(3)]
        return torch.stack([x * math.cos(a) + y * math.sin(a) for a in edges]).amax(0) - 0.55
    if kind == "ring":
        return (torch.sqrt(x * x + y * y) - 0.75).abs() - 0.25
    if kind == "cross":
        bar_h = torch.maximum(x.abs() - 1.0, y.abs() - 0.33)
        bar_v = torch.maximum(x.abs() - 0.33, y.abs() - 1.0)
        return torch.minimum(bar_h, bar_v)
    raise ValueError(f"unknown shape {kind!r}; known: {SHAPES}")


def render(scenes: Sequence[Scene], frames: int, height: int, width: int,
           device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """Pixels of ``scenes`` in ``[-1, 1]``, fp32 ``[B, 3, frames, height, width]``.

    Edges are anti-aliased over one pixel, so any resolution gives a clean image. The whole
    batch renders at once (a few hundred tensor ops on ``device``, whatever the batch size).
    """
    if frames < 1 or height < 1 or width < 1 or not scenes:
        raise ValueError(f"render needs scenes and frames, height, width >= 1, got {len(scenes)} "
                         f"scenes and {(frames, height, width)}")
    device = torch.device(device)

    def tensor(a) -> torch.Tensor:
        return to_device(torch.from_numpy(np.asarray(a, dtype=np.float32)), device)

    t = np.arange(frames) / FPS
    # Screen coordinates of the pixel centres in frame heights, relative to the frame centre.
    aspect = width / height
    sx = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / height - aspect / 2
    sy = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height - 0.5
    cams = [_camera(s, t) for s in scenes]
    cx, cy, zoom = (tensor([c[i] for c in cams])[:, :, None, None] for i in range(3))  # [B,F,1,1]
    wx = sx / zoom + cx  # [B, F, 1, W]: world x of each pixel
    wy = sy[:, None] / zoom + cy  # [B, F, H, 1]
    pixel = 1.0 / (height * zoom)  # world size of one pixel
    img = _background(scenes, wx, wy, pixel, tensor)  # [B, 3, F, H, W]
    for slot in range(max(len(s.objects) for s in scenes)):
        objs = [s.objects[slot] if slot < len(s.objects) else None for s in scenes]
        tracks = [_trajectory(o, t, s.aspect) if o is not None else (t, t, t, np.ones_like(t))
                  for o, s in zip(objs, scenes)]
        ox, oy, angle, size = (tensor([tr[i] for tr in tracks])[:, :, None, None] for i in range(4))
        dx, dy = wx - ox, wy - oy
        cos, sin = torch.cos(angle), torch.sin(angle)
        lx, ly = (cos * dx + sin * dy) / size, (cos * dy - sin * dx) / size
        dist = torch.full_like(lx, 1e3)  # absent objects are far away
        for kind in sorted({o.kind for o in objs if o is not None}):
            is_kind = tensor([o is not None and o.kind == kind for o in objs]).bool()
            is_kind = is_kind[:, None, None, None]
            dist = torch.where(is_kind, _shape_distance(kind, lx, ly) * size, dist)
        alpha = _coverage(dist, pixel)[:, None]  # [B, 1, F, H, W]
        rgb = tensor([o.rgb if o is not None else (0, 0, 0) for o in objs])[:, :, None, None, None]
        img = img * (1 - alpha) + rgb * alpha
    bars = [s.bar if s.bar is not None else (0.0, -1.0, 0.0) for s in scenes]  # width < 0: none
    bx, half, grey = (tensor([b[i] for b in bars])[:, None, None, None] for i in range(3))
    alpha = _coverage((wx - bx).abs() - half, pixel)[:, None]
    img = img * (1 - alpha) + grey[:, None] * alpha
    return img * 2.0 - 1.0


def _coverage(dist: torch.Tensor, pixel: torch.Tensor) -> torch.Tensor:
    """Share of a pixel inside a shape from the signed distance of its centre (a one-pixel ramp:
    the exact box-filter coverage of a straight edge)."""
    return (0.5 - dist / pixel).clamp(0.0, 1.0)


def _background(scenes: Sequence[Scene], wx: torch.Tensor, wy: torch.Tensor, pixel: torch.Tensor,
                tensor) -> torch.Tensor:
    """A soft checkerboard fixed in the world, ``[B, 3, F, H, W]`` in ``[0, 1]``."""
    dark = tensor([s.background[0] for s in scenes])[:, :, None, None, None]
    light = tensor([s.background[1] for s in scenes])[:, :, None, None, None]
    tile = tensor([s.background[2] for s in scenes])[:, None, None, None]
    s = torch.sin(math.pi * wx / tile) * torch.sin(math.pi * wy / tile)
    blend = torch.sigmoid(s / (math.pi * pixel / tile))[:, None]
    return dark + (light - dark) * blend


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index)])


def random_captions(n: int, seed: int, aspect: float = 1.0) -> List[str]:
    """The captions of the first ``n`` clips of ``make_batch(n, ..., seed=seed)``."""
    return [sample_scene(_rng(seed, i), aspect).caption for i in range(n)]


def conditioning(prompts: Union[str, int, Sequence[Union[str, int]]],
                 text_encoder: Optional[TextEncoder] = None,
                 device: Union[str, torch.device, None] = None) -> Conditioning:
    """Conditioning for sampling: each prompt is a caption, or an int seed whose caption is that
    of clip 0 of ``make_batch(..., seed=seed)``. ``""`` is the empty (unconditional) caption."""
    if isinstance(prompts, (str, int)):
        prompts = [prompts]
    captions = []
    for p in prompts:
        if isinstance(p, bool) or not isinstance(p, (str, int)):
            raise ValueError(f"a prompt is a caption string or an int seed, got {p!r}")
        captions.append(p if isinstance(p, str) else sample_scene(_rng(p, 0)).caption)
    encoder = text_encoder if text_encoder is not None else _default_encoder()
    cond = encoder(captions)
    return cond.to(device) if device is not None else cond


def null_conditioning(batch: int, text_encoder: Optional[TextEncoder] = None,
                      device: Union[str, torch.device, None] = None) -> Conditioning:
    """The empty caption ``batch`` times: the negative branch of classifier-free guidance."""
    return conditioning([NULL_CAPTION] * batch, text_encoder, device)


def _default_encoder() -> TextEncoder:
    return TextEncoder()  # fixed seed: equal to the encoder saved with the model


@dataclass
class VideoBatch:
    """Clips and their captions: ``pixels`` fp32 ``[B, 3, F, H, W]`` in ``[-1, 1]``, and ``cond``
    (caption embeddings ``[B, T, C]``, key-padding mask ``[B, T]``, pooled ``[B, C]``)."""

    pixels: torch.Tensor
    cond: Conditioning
    scenes: List[Scene]

    @property
    def captions(self) -> List[str]:
        return self.cond.captions

    @property
    def text(self) -> torch.Tensor:
        return self.cond.encoder_hidden_states

    @property
    def attention_mask(self) -> torch.Tensor:
        return self.cond.encoder_attention_mask


def make_batch(batch: int, frames: int, height: int, width: int, seed: int,
               device: Union[str, torch.device] = "cpu",
               text_encoder: Optional[TextEncoder] = None) -> VideoBatch:
    """``batch`` clips of ``frames x height x width`` pixels with their captions, from ``seed``.

    Clip ``i`` depends only on ``(seed, i)``. ``text_encoder`` defaults to the frozen encoder
    that the shipped model was trained with (it equals :func:`load_model`'s).
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    scenes = [sample_scene(_rng(seed, i), width / height) for i in range(batch)]
    pixels = render(scenes, frames, height, width, device)
    encoder = text_encoder if text_encoder is not None else _default_encoder()
    cond = encoder([s.caption for s in scenes]).to(device)
    return VideoBatch(pixels=pixels, cond=cond, scenes=scenes)
