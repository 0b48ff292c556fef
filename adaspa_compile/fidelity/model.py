"""The fidelity model: diffusers' ``HunyuanVideoTransformer3DModel`` on patchified pixels.

A small HunyuanVideo (2 dual-stream + 4 single-stream blocks, 4 heads of 64, 7.2 M parameters)
trained with flow matching on :mod:`adaspa_compile.fidelity.data` clips. There is no VAE: the
transformer's "latents" are RGB pixels in ``[-1, 1]``, patchified 4 x 4, so a 16 x 64 x 64 clip is
4,096 video tokens, followed in self-attention by 16 caption tokens with a key-padding mask, as
in the real model. It is saved with ``save_pretrained`` next to its frozen text encoder and
loaded with ``HunyuanVideoTransformer3DModel.from_pretrained(folder)``:

    model = load_model(device="cuda")         # the shipped weights, bf16 (CPU: dtype=torch.float32)
    cond = model.conditioning(["red circle bouncing, camera static", 7])  # a caption or a data seed
    compiled = torch.compile(model.transformer, backend="adaspa")
    video = sample(compiled, cond, steps=50, shape=(16, 64, 64), seed=0)  # [B, 3, F, H, W]

:func:`sample` calls the transformer exactly as diffusers' ``HunyuanVideoPipeline`` does
(``FlowMatchEulerDiscreteScheduler``, ``sigmas = linspace(1, 0, steps + 1)[:-1]``, the timestep
expanded over the batch, true classifier-free guidance as a second call per step).
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .data import null_conditioning
from .text import MAX_TOKENS, TEXT_DIM, Conditioning, TextEncoder

__all__ = ["FIDELITY_CONFIG", "TRAIN_SHAPES", "WEIGHTS_DIR", "FidelityModel", "build_model",
           "save_model", "load_model", "sample", "default_shift", "shift_sigmas", "forward_flops",
           "to_uint8"]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

# HunyuanVideoTransformer3DModel arguments. 2 dual + 4 single blocks keeps the real model's 1:2
# ratio; no token refiner and an MLP ratio of 2 keep the bf16 weights under 15 MB.
FIDELITY_CONFIG: Dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    num_attention_heads=4,
    attention_head_dim=64,
    num_layers=2,
    num_single_layers=4,
    num_refiner_layers=0,
    mlp_ratio=2.0,
    patch_size=4,
    patch_size_t=1,
    qk_norm="rms_norm",
    guidance_embeds=False,
    text_embed_dim=TEXT_DIM,
    pooled_projection_dim=TEXT_DIM,
    rope_theta=256.0,
    rope_axes_dim=(16, 24, 24),
)

# Clip shapes (frames, height, width) the shipped weights were trained on: 4,096 and 16,384 video
# tokens. Other sizes work (positions are RoPE) but were not seen in training.
TRAIN_SHAPES: Tuple[Tuple[int, int, int], ...] = ((16, 64, 64), (16, 128, 128))


@dataclass
class FidelityModel:
    """The transformer and the frozen text encoder it reads."""

    transformer: torch.nn.Module
    text_encoder: TextEncoder

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    def conditioning(self, prompts) -> Conditioning:
        """Conditioning of ``prompts`` (captions or data seeds) with this model's text encoder,
        on its device; see :func:`adaspa_compile.fidelity.data.conditioning`."""
        from .data import conditioning

        return conditioning(prompts, self.text_encoder, self.device)


def build_model(config: Optional[Dict[str, Any]] = None, seed: int = 0,
                zero_init: bool = True) -> FidelityModel:
    """A freshly initialised fidelity model (fp32, CPU, train mode), seeded.

    ``config`` overrides keys of :data:`FIDELITY_CONFIG`. ``zero_init`` zeroes the adaLN
    modulation and output layers, the DiT recipe: every block starts as the identity and the
    output as zero. The global RNG is left untouched.
    """
    from diffusers import HunyuanVideoTransformer3DModel

    cfg = dict(FIDELITY_CONFIG)
    unknown = sorted(set(config or {}) - set(cfg))
    if unknown:
        raise ValueError(f"unknown fidelity model config key(s) {unknown}; valid: {sorted(cfg)}")
    cfg.update(config or {})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = HunyuanVideoTransformer3DModel(**cfg)
    if zero_init:
        with torch.no_grad():
            for name, module in transformer.named_modules():
                if isinstance(module, torch.nn.Linear) and (
                        name.endswith(("norm1.linear", "norm1_context.linear", "norm.linear"))
                        or name in ("norm_out.linear", "proj_out")):
                    module.weight.zero_()
                    module.bias.zero_()
    return FidelityModel(transformer, TextEncoder(dim=cfg["text_embed_dim"]))


def save_model(model: FidelityModel, folder: Union[str, os.PathLike],
               dtype: torch.dtype = torch.bfloat16) -> int:
    """Write the transformer (``save_pretrained``, safetensors, ``dtype``) and the text encoder
    into ``folder``; returns the bytes written. ``model`` itself is not changed."""
    os.makedirs(folder, exist_ok=True)
    # nn.Module.to: diffusers' ModelMixin.to warns on every dtype cast, even with nothing to keep.
    transformer = torch.nn.Module.to(copy.deepcopy(model.transformer), device="cpu", dtype=dtype)
    transformer.save_pretrained(folder, safe_serialization=True)
    model.text_encoder.save(str(folder))
    names = ("config.json", "diffusion_pytorch_model.safetensors", "text_encoder.safetensors")
    return sum(os.path.getsize(os.path.join(folder, n)) for n in names)


def load_model(path: Union[str, os.PathLike, None] = None, device: Union[str, torch.device] = "cpu",
               dtype: Optional[torch.dtype] = None) -> FidelityModel:
    """Load a folder written by :func:`save_model` (default: the weights shipped in the package).

    The transformer comes from ``HunyuanVideoTransformer3DModel.from_pretrained(path)``, in
    ``dtype`` (default: as saved, bf16 for the shipped weights), in eval mode on ``device``.
    """
    from diffusers import HunyuanVideoTransformer3DModel

    folder = Path(path) if path is not None else WEIGHTS_DIR
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"no fidelity model in {folder}: train one with `python "
            f"benchmarks/train_fidelity_model.py --out {folder}` (a CUDA GPU, about 10 minutes)")
    transformer = HunyuanVideoTransformer3DModel.from_pretrained(str(folder))
    # Cast after loading: diffusers renamed from_pretrained's torch_dtype to dtype (0.42), and
    # nn.Module.to skips ModelMixin.to's warning about casts.
    dtype = dtype if dtype is not None else _saved_dtype(folder)
    transformer = torch.nn.Module.to(transformer, dtype=dtype)
    return FidelityModel(transformer.to(device).eval(), TextEncoder.load(str(folder)).to(device))


def _saved_dtype(folder: Path) -> torch.dtype:
    from safetensors import safe_open

    with safe_open(str(folder / "diffusion_pytorch_model.safetensors"), framework="pt") as f:
        return f.get_tensor(next(iter(f.keys()))).dtype


def default_shift(frames: int, height: int, width: int) -> float:
    """Flow-matching timestep shift for a clip size: 1 at 64 x 64 pixels, growing with the side
    (2 at 128 x 128). Training and :func:`sample` use the same value."""
    return max(1.0, math.sqrt(height * width / (64.0 * 64.0)))


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """``shift * s / (1 + (shift - 1) * s)``, as ``FlowMatchEulerDiscreteScheduler`` shifts."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


@torch.no_grad()
def sample(transformer: torch.nn.Module, cond: Conditioning, *, steps: int = 50,
           shape: Tuple[int, int, int] = (16, 64, 64), seed: Union[int, Sequence[int]] = 0,
           scheduler=None, guidance_scale: float = 4.0, negative: Optional[Conditioning] = None,
           embedded_guidance: float = 6.0) -> torch.Tensor:
    """Generate ``len(cond)`` clips of ``shape = (frames, height, width)``: ``[B, 3, F, H, W]``.

    ``transformer`` may be the model or ``torch.compile(model, backend="adaspa")``. Clip ``i``
    starts from the noise of ``seed + i`` (or ``seed[i]``), drawn on the CPU, so a clip does not
    depend on the batch or the device. ``scheduler`` defaults to
    ``FlowMatchEulerDiscreteScheduler(shift=default_shift(*shape))``. ``guidance_scale > 1`` runs
    true classifier-free guidance (the pipeline's ``true_cfg_scale``): a second call per step with
    ``negative`` (default: the empty caption). ``embedded_guidance`` feeds the ``guidance`` input of
    a guidance-distilled config (``guidance_embeds=True``) and is ignored otherwise. As in the
    pipeline, the latents take the transformer's dtype after the first step. The timestep is fp32
    at every step: one dtype, so a compiled model does not recompile after the first step, and
    exact, so no two steps of a long schedule round to one bf16 value (the backend would count
    them as CFG branches of one step). The result is returned as fp32 (not clamped).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    param = next(transformer.parameters())
    device, dtype = param.device, param.dtype
    batch = len(cond)
    seeds = [seed + i for i in range(batch)] if isinstance(seed, int) else list(seed)
    if len(seeds) != batch:
        raise ValueError(f"got {len(seeds)} seeds for {batch} clips")
    frames, height, width = shape
    p = transformer.config.patch_size
    if height % p or width % p:
        raise ValueError(f"height and width must be multiples of the patch size {p}, got {shape}")
    if scheduler is None:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=default_shift(*shape))
    do_cfg = guidance_scale > 1.0
    if do_cfg and negative is None:
        negative = null_conditioning(batch, device=device)
    cond = cond.to(device, dtype)
    negative = negative.to(device, dtype) if do_cfg else None

    noise = [torch.randn(3, frames, height, width, generator=torch.Generator().manual_seed(s))
             for s in seeds]
    latents = torch.stack(noise).to(device)
    sigmas = np.linspace(1.0, 0.0, steps + 1)[:-1]
    scheduler.set_timesteps(sigmas=sigmas, device=device)
    scheduler.set_begin_index(0)
    guidance = None
    if transformer.config.guidance_embeds:
        guidance = torch.tensor([embedded_guidance] * batch, dtype=dtype, device=device) * 1000.0

    for t in scheduler.timesteps:
        latent_model_input = latents.to(dtype)
        timestep = t.expand(latents.shape[0]).float()
        noise_pred = transformer(hidden_states=latent_model_input, timestep=timestep,
                                 **cond.model_kwargs(), guidance=guidance, return_dict=False)[0]
        if do_cfg:
            neg_noise_pred = transformer(hidden_states=latent_model_input, timestep=timestep,
                                         **negative.model_kwargs(), guidance=guidance,
                                         return_dict=False)[0]
            noise_pred = neg_noise_pred + guidance_scale * (noise_pred - neg_noise_pred)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
    return latents.float()


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` pixels -> uint8 ``[0, 255]`` (clamped), same shape, on the CPU."""
    return ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def forward_flops(config: Optional[Dict[str, Any]] = None, frames: int = 16, height: int = 64,
                  width: int = 64, text_tokens: int = MAX_TOKENS) -> Dict[str, float]:
    """Matmul FLOPs of one forward pass of one clip: ``linear``, ``attention``, ``total``, and the
    number of video ``tokens``.

    Every dual and single block does ``(4 + 2 * mlp_ratio) * d^2`` multiply-adds per token in its
    projections and MLP, and ``2 * L^2 * d`` in attention (``Q K^T`` and ``P V``); per-clip layers
    (time embedding, adaLN modulation) are negligible and left out.
    """
    cfg = dict(FIDELITY_CONFIG, **(config or {}))
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    p, pt = cfg["patch_size"], cfg["patch_size_t"]
    video = (frames // pt) * (height // p) * (width // p)
    seq = video + text_tokens
    layers = cfg["num_layers"] + cfg["num_single_layers"]
    linear = layers * 2 * (4 + 2 * cfg["mlp_ratio"]) * d * d * seq
    linear += 2 * seq * d * (cfg["in_channels"] * p * p * pt) * 2  # patch embed + output projection
    attention = layers * 4 * seq * seq * d
    return {"linear": float(linear), "attention": float(attention),
            "total": float(linear + attention), "tokens": float(video)}
