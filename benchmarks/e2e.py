"""End-to-end benchmark: whole transformer forwards of real diffusers video DiTs.

Builds diffusers' own model classes at full width with random bf16 weights (parameters cast as
``from_pretrained(torch_dtype=bf16)`` does, fp32-kept modules included), truncated in depth,
and drives them with each pipeline's call pattern: one falling timestep per step; HunyuanVideo
one call per step (guidance-distilled) with a padded text mask; Wan two calls per step (CFG as
two calls, batch 1); Wan 2.2 A14B (``wan22``) as Wan with two experts of Wan2.1-14B's shape,
each compiled on its own, the low-noise one taking over at the boundary step as ``WanPipeline``
does (the projection places the boundary from ``boundary_ratio`` 0.875 over the timesteps of a
flow-match scheduler with shift 12, an assumption recorded with the results); CogVideoX one call
with the CFG pair as batch 2. Methods compared in one
process on one device:

- ``eager``: the model's own SDPA (cuDNN where torch picks it);
- ``inductor``: ``torch.compile(model, fullgraph=True)``, dense;
- ``adaspa-0.8``, ``adaspa-0.9``, ``adaspa-recall``: ``torch.compile(model, backend="adaspa")``;
- ``adaspa-0.8-fp8``: the same with ``precision="fp8"`` (FP8 block-sparse steps);
- ``adaspa-0.8-regional``: ``model.compile_repeated_blocks(backend="adaspa")``, the blocks only
  (its compile time against ``adaspa-0.8``'s is the point; its FX cache is not the whole model's).
- ``cache-fbc``, ``cache-taylorseer``, ``cache-magcache``: a diffusers step cache
  (``transformer.enable_cache`` with ``FirstBlockCacheConfig(threshold=0.05)``,
  ``TaylorSeerCacheConfig()`` on the attention modules: its default patterns, widened to
  ``attn\\d?`` since they miss Wan's and CogVideoX's ``attn1``/``attn2``; ``MagCacheConfig``) on
  inductor dense (``torch.compile(model)``
  without fullgraph: the cache's decisions break the graph); ``adaspa-0.8+fbc``,
  ``adaspa-0.8+taylorseer``, ``adaspa-0.8+magcache``: the cache with
  ``torch.compile(model, backend="adaspa")``. Not in the default list. A cache skips work at
  some steps, so these are not projected per phase: one warmup generation, then a timed one of
  ``--cache-steps`` steps (default 50, 8 with ``--quick``; adaspa's default search steps at 50 or
  more, ``search_steps=(2, 4)`` below) with falling timesteps, every call in the cache context the
  pipeline uses ("cond", "uncond"), reported as the synchronised wall time of the loop
  (``generation_s``, ``per_50_steps_s``) next to inductor's and ``adaspa-0.8``'s projections scaled
  to the same steps (``x_inductor_gen``, ``x_adaspa-0.8_gen``); adaspa+cache adds the phases every
  site ran per branch (``site_phases``, ``site_calls``: a step the cache skipped is no call of the
  sites it skipped). MagCache is skipped with the reason: it needs ``mag_ratios`` calibrated on
  real weights (diffusers ships Flux's only). A model without ``enable_cache`` is skipped too.
  Pipelines reset the cache state after every generation, and so does this between the warmup
  and the timed generation; where that makes dynamo compile again (``recompiles`` > 0, seen with
  FirstBlockCache on HunyuanVideo), the result says so in ``note``.

``--full-depth`` builds each model at its real depth (HunyuanVideo 20 dual + 40 single blocks,
Wan2.1-14B 40, Wan 2.2 A14B two experts of 40, CogVideoX1.5-5B 42; with ``--quick`` the tiny
widths at those depths) and runs a first eager forward as a memory probe; on a CUDA out-of-memory
error it halves the layers (not below the truncated default) after freeing memory and tries again.
``config.depth`` in the JSON records the layers used, the full count and why
(``"out of memory at 40 layers"``), and every projection carries its ``depth``.

For adaspa, phases are forced through the schedule itself: ``search_steps=(2, 4)`` over an 8-step
generation gives dense, dense, fused search, sparse, cached search, sparse x3; the phase of every
call is read from ``adaspa_compile.report()``. One warmup generation (compile, kernel JIT) comes
first, then ``adaspa_compile.reset()`` and the timed generation. Every call is timed alone (CUDA
events, host syncs included, as a pipeline sees them) and each phase reports the median of its
calls. Reported per model and method: forward ms per phase, the projected 50-step time with the
default schedule (9 dense, 1 fused, 1 cached, 39 sparse steps), speedups over inductor, search
overhead, peak memory, the bytes held by LSE and mask caches (extrapolated to the full depth),
compile time (first call minus a steady call; cold caches on CUDA) and graphs / recompiles
(``torch._dynamo.utils.counters``). Correctness: the dense and fused-search steps must match the
eager output within twice inductor's own bf16 error, at least 1e-2 (3e-2 when inductor is not run).

    python benchmarks/e2e.py                          # H100, all three models (meant for one
                                                      # 9-minute device call; not yet timed)
    python benchmarks/e2e.py --models hunyuan_video --hunyuan-layers 4,8
    python benchmarks/e2e.py --quick                  # tiny widths, CPU smoke test, ~1 minute
    python benchmarks/e2e.py --models wan --full-depth --methods inductor,adaspa-0.8
    python benchmarks/e2e.py --models wan --methods inductor,adaspa-0.8,cache-fbc,adaspa-0.8+fbc

Writes ``benchmarks/results/e2e.json`` (``e2e_quick.json`` with ``--quick``; the models of this
run replace their entries, so runs of one model each add up), the chart ``e2e.png`` (needs
matplotlib), and copies both to ``$OUT`` when set. Results are written after every method, and
methods that would start after ``--time-limit`` seconds are skipped, so a run cut short by the
device still leaves numbers. Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch


import adaspa_compile
from adaspa_compile.config import AdaSpaConfig
from adaspa_compile.schedule import (DEFAULT_SEARCH_STEPS, DEFAULT_STEPS, Phase, SiteFacts,
                                     plan_phase)

from _common import (DEFAULT_SCHEDULE, PHASE_NAMES, RESULTS, SHAPES, fmt, log,
                     projected_seconds, rel_err, run_meta, sync, with_out_copy, write_json)

BENCH_SEARCH_STEPS = (2, 4)
TIMED_STEPS = 8  # D D F S C S S S
# Wan 2.2: the low-noise expert takes over at this step of the timed generation (after both
# searches of the high-noise one): D D F S C | F S S.
TIMED_BOUNDARY_STEP = 5
# ... and at this step of a 50-step generation in the projection: Wan2.2-T2V-A14B's
# boundary_ratio 0.875 over the timesteps of FlowMatchEulerDiscreteScheduler(shift=12), an
# assumption (the pipeline's scheduler decides), recorded in the results.
WAN22_BOUNDARY_RATIO, WAN22_SHIFT = 0.875, 12.0
WARMUP_STEPS = 5  # D D F S C: every phase once before timing
METHODS = ("eager", "inductor", "adaspa-0.8", "adaspa-0.8-fp8", "adaspa-0.9", "adaspa-recall",
           "adaspa-0.8-regional")
ADASPA_OPTIONS = {
    "adaspa-0.8": {"sparsity": 0.8},
    "adaspa-0.8-fp8": {"sparsity": 0.8, "precision": "fp8"},
    "adaspa-0.9": {"sparsity": 0.9},
    "adaspa-recall": {"mode": "recall", "recall": 0.95},
    "adaspa-0.8-regional": {"sparsity": 0.8},
}
REGIONAL = "-regional"  # compile_repeated_blocks instead of compiling the whole model
# Step caches (diffusers ``transformer.enable_cache``), alone on inductor dense ("cache-NAME") or
# with adaspa ("adaspa-0.8+NAME"): these time a real generation of --cache-steps steps.
CACHES = ("fbc", "taylorseer", "magcache")
CACHE_METHODS = tuple(f"cache-{c}" for c in CACHES) + tuple(f"adaspa-0.8+{c}" for c in CACHES)
ALL_METHODS = METHODS + CACHE_METHODS
# Relative L2 error allowed against eager: twice inductor's own, at least BF16_FLOOR (a few
# bf16 roundings of the output); FALLBACK_TOL when inductor is not run.
BF16_FLOOR = 1e-2
FALLBACK_TOL = 3e-2


# ----------------------------------------------------------------------------- models
@dataclass
class ModelSpec:
    """One benchmarked model: how to build it and the inputs of each call of one step."""

    name: str
    heads: int
    head_dim: int
    video_tokens: int
    text_tokens: int  # text inside self-attention (0: cross-attention only)
    layers: int  # self-attention sites built
    layers_label: str
    full_layers: int  # self-attention sites of the full model
    batch: int
    timestep_dtype: torch.dtype
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[torch.nn.Module, torch.device, torch.dtype], List[Dict[str, Any]]]
    notes: str = ""
    experts: int = 1  # 2: Wan 2.2 A14B, a high-noise and a low-noise expert of one config

    @property
    def tokens(self) -> int:
        return self.video_tokens + self.text_tokens

    @property
    def calls_per_step(self) -> int:
        return 2 if self.name.startswith("wan") else 1


def _randn(g: torch.Generator, shape, device, dtype) -> torch.Tensor:
    return torch.randn(shape, generator=g, device="cpu").to(device=device, dtype=dtype)


def hunyuan_spec(quick: bool, dual: int, single: int) -> ModelSpec:
    """HunyuanVideo 720p, 129 frames: latent 33 x 90 x 160, 256 text tokens with padding."""
    from diffusers import HunyuanVideoTransformer3DModel

    if quick:
        cfg = dict(num_attention_heads=2, attention_head_dim=32, text_embed_dim=64,
                   pooled_projection_dim=32, rope_axes_dim=(8, 12, 12), mlp_ratio=2.0)
        latent, text, valid = (4, 16, 32), 64, 20
    else:
        shape = SHAPES["hunyuan"]
        cfg = dict(num_attention_heads=shape.heads, attention_head_dim=shape.head_dim,
                   text_embed_dim=4096, pooled_projection_dim=768, rope_axes_dim=(16, 56, 56),
                   mlp_ratio=4.0)
        latent, text, valid = shape.latent, shape.prompt_tokens, 67
    cfg.update(in_channels=16, out_channels=16, num_layers=dual, num_single_layers=single,
               num_refiner_layers=2, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
               guidance_embeds=True, rope_theta=256.0)

    def inputs(model, device, dtype):
        g = torch.Generator().manual_seed(1)
        mask = (torch.arange(text) < valid).to(device=device, dtype=dtype)[None]  # pipeline: dtype
        return [dict(hidden_states=_randn(g, (1, 16, *latent), device, dtype),
                     encoder_hidden_states=_randn(g, (1, text, cfg["text_embed_dim"]), device,
                                                  dtype),
                     encoder_attention_mask=mask,
                     pooled_projections=_randn(g, (1, cfg["pooled_projection_dim"]), device,
                                               dtype),
                     guidance=torch.full((1,), 6.0, device=device, dtype=dtype) * 1000.0)]

    f, h, w = latent
    return ModelSpec(
        name="hunyuan_video", heads=cfg["num_attention_heads"], head_dim=cfg["attention_head_dim"],
        video_tokens=f * (h // 2) * (w // 2), text_tokens=text, layers=dual + single,
        layers_label=f"{dual} dual + {single} single", full_layers=SHAPES["hunyuan"].layers,
        batch=1,
        timestep_dtype=torch.float32, build=lambda: HunyuanVideoTransformer3DModel(**cfg),
        inputs=inputs, notes=f"text padded to {text}, {valid} valid tokens")


def wan_config(quick: bool, layers: int, quick_heads: int = 2):
    """``(WanTransformer3DModel kwargs, latent (f, h, w), text tokens)``: Wan2.1-14B at 720p, 81
    frames, or a tiny stand-in with ``quick``."""
    if quick:
        cfg = dict(num_attention_heads=quick_heads, attention_head_dim=24, ffn_dim=96,
                   text_dim=64, freq_dim=32)
        latent, text = (4, 16, 32), 32
    else:
        shape = SHAPES["wan"]
        cfg = dict(num_attention_heads=shape.heads, attention_head_dim=shape.head_dim,
                   ffn_dim=13824, text_dim=4096, freq_dim=256)
        latent, text = shape.latent, shape.prompt_tokens
    cfg.update(patch_size=(1, 2, 2), in_channels=16, out_channels=16, num_layers=layers,
               cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
               rope_max_seq_len=1024)
    return cfg, latent, text


def wan_inputs(cfg: Dict[str, Any], latent: Tuple[int, int, int], text: int, device: torch.device,
               dtype: torch.dtype) -> List[Dict[str, torch.Tensor]]:
    """The two calls of one Wan step (CFG: cond, uncond; batch 1 each), seeded random inputs of
    the ``wan_config`` it is given."""
    g = torch.Generator().manual_seed(2)
    x = _randn(g, (1, 16, *latent), device, dtype)
    cond = _randn(g, (1, text, cfg["text_dim"]), device, dtype)
    # The pipeline zero-pads T5 embeddings past the prompt; the negative prompt is shorter.
    uncond = _randn(g, (1, text, cfg["text_dim"]), device, dtype)
    uncond[:, text // 8:] = 0
    return [dict(hidden_states=x, encoder_hidden_states=cond),
            dict(hidden_states=x, encoder_hidden_states=uncond)]


def wan_spec(quick: bool, layers: int) -> ModelSpec:
    """Wan2.1-14B 720p, 81 frames: latent 21 x 90 x 160; 512 text tokens via cross-attention."""
    from diffusers import WanTransformer3DModel

    cfg, latent, text = wan_config(quick, layers)

    def inputs(model, device, dtype):
        return wan_inputs(cfg, latent, text, device, dtype)

    f, h, w = latent
    return ModelSpec(
        name="wan", heads=cfg["num_attention_heads"], head_dim=cfg["attention_head_dim"],
        video_tokens=f * (h // 2) * (w // 2), text_tokens=0, layers=layers,
        layers_label=f"{layers}", full_layers=SHAPES["wan"].layers, batch=1,
        timestep_dtype=torch.int64,
        build=lambda: WanTransformer3DModel(**cfg), inputs=inputs,
        notes="CFG as two calls per step (cond, uncond), each batch 1")


def wan22_spec(quick: bool, layers: int) -> ModelSpec:
    """Wan 2.2 A14B 720p, 81 frames: two experts with Wan2.1-14B's shape (the high-noise one
    until the pipeline's boundary step, then the low-noise one), called as WanPipeline does."""
    spec = wan_spec(quick, layers)
    return ModelSpec(**{**spec.__dict__, "name": "wan22", "experts": 2,
                        "layers_label": f"2 experts x {layers}",
                        "notes": spec.notes + f"; the low-noise expert from step "
                                 f"{TIMED_BOUNDARY_STEP} of the timed generation"})


class ExpertPair:
    """Two experts called as ``WanPipeline`` calls them: by the scheduler's step index, the
    high-noise ``transformer`` before ``boundary_step``, ``transformer_2`` from it on. The
    ``scheduler`` attribute is what adaspa reads the step from in a real pipeline."""

    def __init__(self, transformer, transformer_2, boundary_step: int) -> None:
        self.transformer, self.transformer_2 = transformer, transformer_2
        self.boundary_step = boundary_step
        self.scheduler = SimpleNamespace(step_index=None)

    def experts(self) -> List[Any]:
        return [self.transformer, self.transformer_2]

    def current(self):
        step = self.scheduler.step_index or 0
        return self.transformer if step < self.boundary_step else self.transformer_2

    def map(self, fn: Callable[[Any], Any]) -> "ExpertPair":
        return ExpertPair(fn(self.transformer), fn(self.transformer_2), self.boundary_step)

    def __call__(self, **kwargs):
        return self.current()(**kwargs)


def experts_of(model) -> List[Any]:
    return model.experts() if isinstance(model, ExpertPair) else [model]


def phase_sequence(steps: int, search_steps: Tuple[int, ...],
                   boundary: Optional[int] = None) -> List[str]:
    """The phase of each step as the backend plans it (``plan_phase``), one branch; with
    ``boundary``, a second model takes over there and searches its own masks."""
    cfg = AdaSpaConfig(search_steps=search_steps)
    facts = [SiteFacts(), SiteFacts()]
    phases = []
    for step in range(steps):
        model = 0 if boundary is None or step < boundary else 1
        phase = plan_phase(step, 0, facts[model], cfg).phase
        if phase in (Phase.FUSED_SEARCH, Phase.CACHED_SEARCH):
            facts[model] = SiteFacts(searched_at=step, has_lse=facts[model].has_lse
                                     or phase is Phase.FUSED_SEARCH)
        phases.append(phase.value)
    return phases


def wan22_boundary_step(steps: int) -> int:
    """The first step of the low-noise expert: WanPipeline switches where the timestep falls
    below ``boundary_ratio * num_train_timesteps``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=WAN22_SHIFT)
    scheduler.set_timesteps(steps)
    boundary = WAN22_BOUNDARY_RATIO * scheduler.config.num_train_timesteps
    return sum(float(t) >= boundary for t in scheduler.timesteps)


def projected_schedule(spec: ModelSpec) -> Dict[str, int]:
    """How many steps of a 50-step generation run each phase, with the default search steps."""
    if spec.experts == 1:
        return DEFAULT_SCHEDULE
    phases = phase_sequence(DEFAULT_STEPS, DEFAULT_SEARCH_STEPS, wan22_boundary_step(50))
    return {name: phases.count(name) for name in DEFAULT_SCHEDULE}


def block_classes(model) -> int:
    """How many classes of repeated blocks a regional compile compiles (a graph each)."""
    return len({type(m) for e in experts_of(model) for m in e.modules()
                if type(m).__name__ in getattr(e, "_repeated_blocks", ())})


def compile_model(model, **kwargs):
    """``torch.compile`` of the model, or of each expert."""
    if isinstance(model, ExpertPair):
        return model.map(lambda m: torch.compile(m, **kwargs))
    return torch.compile(model, **kwargs)


def set_step(model, step: int) -> None:
    """What a pipeline's scheduler says before the transformer call of ``step``."""
    if isinstance(model, ExpertPair):
        model.scheduler.step_index = step


def cogvideox_spec(quick: bool, layers: int) -> ModelSpec:
    """CogVideoX1.5-5B 768 x 1360, 81 frames: latent 22 x 96 x 170 (21 padded to the temporal
    patch), 226 text tokens first; CFG batched (B=2)."""
    from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel

    if quick:
        cfg = dict(num_attention_heads=2, attention_head_dim=32, time_embed_dim=32,
                   text_embed_dim=64, sample_height=16, sample_width=32, sample_frames=13)
        frames, text = 8, 32
    else:
        shape = SHAPES["cogvideox"]
        cfg = dict(num_attention_heads=shape.heads, attention_head_dim=shape.head_dim,
                   time_embed_dim=512, text_embed_dim=4096, sample_height=shape.latent[1],
                   sample_width=shape.latent[2], sample_frames=81)
        frames, text = shape.latent[0], shape.prompt_tokens
    cfg.update(in_channels=16, out_channels=16, num_layers=layers, patch_size=2, patch_size_t=2,
               temporal_compression_ratio=4, max_text_seq_length=text, patch_bias=False,
               use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False)
    h, w = cfg["sample_height"], cfg["sample_width"]

    def inputs(model, device, dtype):
        g = torch.Generator().manual_seed(3)
        # The pipeline's own RoPE helper, on a stand-in with the attributes it reads.
        stand_in = SimpleNamespace(vae_scale_factor_spatial=8, transformer=model)
        rope = CogVideoXPipeline._prepare_rotary_positional_embeddings(
            stand_in, h * 8, w * 8, frames, device)
        return [dict(hidden_states=_randn(g, (2, frames, 16, h, w), device, dtype),
                     encoder_hidden_states=_randn(g, (2, text, cfg["text_embed_dim"]), device,
                                                  dtype),
                     image_rotary_emb=rope)]

    return ModelSpec(
        name="cogvideox", heads=cfg["num_attention_heads"], head_dim=cfg["attention_head_dim"],
        video_tokens=frames // 2 * (h // 2) * (w // 2), text_tokens=text, layers=layers,
        layers_label=f"{layers}", full_layers=SHAPES["cogvideox"].layers, batch=2,
        timestep_dtype=torch.int64,
        build=lambda: CogVideoXTransformer3DModel(**cfg), inputs=inputs,
        notes="CFG batched: one call of batch 2 per step")


def build_model(spec: ModelSpec, device: torch.device, dtype: torch.dtype):
    """Random weights on ``device``; parameters cast to ``dtype`` except the modules diffusers
    keeps in fp32 when loading (``_keep_in_fp32_modules``), buffers left as built. Two experts
    (seeds 0 and 1) for a two-expert spec."""
    built = []
    for seed in range(spec.experts):
        torch.manual_seed(seed)
        with torch.device(device):
            built.append(cast_as_loaded(spec.build().to(device), dtype))
    return built[0] if spec.experts == 1 else ExpertPair(*built, TIMED_BOUNDARY_STEP)


def cast_as_loaded(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Parameters to ``dtype`` except diffusers' ``_keep_in_fp32_modules`` (as ``from_pretrained``
    does); returns the model in eval mode without gradients."""
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.is_floating_point() and not any(k in name.split(".") for k in keep):
                p.data = p.data.to(dtype)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- timing
def timed(device: torch.device, fn: Callable[..., Any], *args: Any) -> Tuple[float, Any]:
    """(milliseconds, result) of ``fn(*args)``, host work and syncs included."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(*args)
        end.record()
        end.synchronize()
        return start.elapsed_time(end), out
    t0 = time.perf_counter()
    out = fn(*args)
    return (time.perf_counter() - t0) * 1e3, out


def timestep_values(n: int, dtype: torch.dtype) -> List[float]:
    """Falling timesteps, one per step, as a flow-matching scheduler produces them."""
    values = [1000.0 * (1.0 - i / (n + 1)) for i in range(n)]
    return [float(round(v)) for v in values] if not dtype.is_floating_point else values


def forward(model, kwargs: Dict[str, Any], t: float, spec: ModelSpec,
            device: torch.device) -> torch.Tensor:
    """One model call with timestep ``t`` passed as the pipelines do: ``t.expand(batch)``."""
    step = torch.tensor(t, dtype=spec.timestep_dtype, device=device).expand(spec.batch)
    with torch.no_grad():
        return model(**kwargs, timestep=step, return_dict=False)[0]


def unique_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def median(xs: List[float]) -> Optional[float]:
    return statistics.median(xs) if xs else None


@dataclass
class Call:
    step: int
    branch: int
    phase: str  # D F C S, or "-" when no site was rewritten
    ms: float


@dataclass
class Context:
    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    spec: ModelSpec
    model: torch.nn.Module
    branches: List[Dict[str, Any]]
    timesteps: List[float]
    refs: Dict[int, torch.Tensor] = field(default_factory=dict)  # step -> eager output, branch 0
    ref_err: Dict[str, float] = field(default_factory=dict)


# Steps of the timed adaspa generation whose branch-0 output is checked against eager.
CHECK_STEPS = {"dense": 0, "fused_search": BENCH_SEARCH_STEPS[0],
               "sparse": BENCH_SEARCH_STEPS[0] + 1}


def report_of(model) -> adaspa_compile.Report:
    """The adaspa report of the model (of both experts: every live model)."""
    if isinstance(model, ExpertPair):
        return adaspa_compile.report()
    return adaspa_compile.report(model)


def site_phase(model, branch: int) -> str:
    """The phase letter the last call ran at every rewritten site of the model that ran: "-"
    without sites, and "[DS]"-style when the sites disagree (then no phase is timed and the
    phase check fails)."""
    ran = model.current() if isinstance(model, ExpertPair) else model
    letters = {s.phases.get(branch, "")[-1:] for s in adaspa_compile.report(ran).rewritten} - {""}
    if not letters:
        return "-"
    return letters.pop() if len(letters) == 1 else "[" + "".join(sorted(letters)) + "]"


def generation(ctx: Context, model, steps: int, keep: Dict[int, torch.Tensor],
               adaspa: bool) -> List[Call]:
    """Run ``steps`` denoising steps of every branch; keep branch-0 outputs of chosen steps."""
    calls = []
    for i in range(steps):
        set_step(model, i)
        for b, kwargs in enumerate(ctx.branches):
            ms, out = timed(ctx.device, forward, model, kwargs, ctx.timesteps[i], ctx.spec,
                            ctx.device)
            calls.append(Call(i, b, site_phase(model, b) if adaspa else "D", ms))
            if b == 0 and i in keep:
                keep[i] = out.detach().clone()
            del out
    return calls


# ----------------------------------------------------------------------------- methods
def cold_cache(ctx: Context):
    """A fresh, empty inductor/Triton cache for a compile to be timed cold (CUDA, not --quick)."""
    if ctx.args.cold_compile:
        from torch._inductor.utils import fresh_cache

        return fresh_cache()
    return contextlib.nullcontext()


def memory_start(ctx: Context) -> int:
    if ctx.device.type != "cuda":
        return 0
    sync(ctx.device)
    torch.cuda.reset_peak_memory_stats(ctx.device)
    return torch.cuda.memory_allocated(ctx.device)


def memory_peak(ctx: Context, base: int) -> Dict[str, Optional[float]]:
    if ctx.device.type != "cuda":
        return {"peak_gib": None, "peak_over_start_gib": None}
    peak = torch.cuda.max_memory_allocated(ctx.device)
    # Over what was allocated before the timed calls (weights, inputs, references).
    return {"peak_gib": peak / 2**30, "peak_over_start_gib": (peak - base) / 2**30}


def run_eager(ctx: Context) -> Dict[str, Any]:
    """The model's own forward: warmup, then one call at each checked step (their outputs are
    the references)."""
    spec = ctx.spec
    set_step(ctx.model, 0)
    forward(ctx.model, ctx.branches[0], ctx.timesteps[0], spec, ctx.device)
    base = memory_start(ctx)
    times = []
    for step in sorted(set(CHECK_STEPS.values())):
        set_step(ctx.model, step)
        ms, out = timed(ctx.device, forward, ctx.model, ctx.branches[0], ctx.timesteps[step],
                        spec, ctx.device)
        times.append(ms)
        ctx.refs[step] = out.detach().clone()
    result = dense_result(ctx, times)
    result.update(memory_peak(ctx, base))
    return result


def dense_result(ctx: Context, times: List[float]) -> Dict[str, Any]:
    ms = median(times)
    return {"forward_ms": {"dense": ms}, "samples_ms": {"dense": times},
            "projected_50_s": 50 * ctx.spec.calls_per_step * ms / 1e3}


def run_inductor(ctx: Context) -> Dict[str, Any]:
    with cold_cache(ctx):  # open until the compiled code is no longer used
        return _run_inductor(ctx)


def _run_inductor(ctx: Context) -> Dict[str, Any]:
    spec = ctx.spec
    graphs0 = unique_graphs()
    compiled = compile_model(ctx.model, fullgraph=True)
    set_step(compiled, 0)
    t0 = time.perf_counter()
    out = forward(compiled, ctx.branches[0], ctx.timesteps[0], spec, ctx.device)
    sync(ctx.device)
    first_ms = (time.perf_counter() - t0) * 1e3
    graphs1 = unique_graphs()
    checks = {}
    if 0 in ctx.refs:
        err = rel_err(out, ctx.refs[0])
        ctx.ref_err["inductor"] = err
        checks["dense step vs eager"] = err
    del out
    base = memory_start(ctx)
    times = []
    for i in range(3):
        set_step(compiled, i)
        times.append(timed(ctx.device, forward, compiled, ctx.branches[0], ctx.timesteps[i], spec,
                           ctx.device)[0])
    result = dense_result(ctx, times)
    result.update(memory_peak(ctx, base))
    result.update(compile_s=(first_ms - median(times)) / 1e3,
                  compile_cache="cold" if ctx.args.cold_compile else "as found",
                  graphs=unique_graphs() - graphs0, recompiles=unique_graphs() - graphs1,
                  errors=checks)
    return result


def run_adaspa(ctx: Context, method: str, cache: contextlib.ExitStack,
               first_adaspa: bool) -> Dict[str, Any]:
    options = dict(ADASPA_OPTIONS[method], search_steps=BENCH_SEARCH_STEPS)
    if ctx.args.quick:
        options["min_seq_len"] = 256
    torch._dynamo.reset()
    graphs0 = unique_graphs()
    if method.endswith(REGIONAL):
        for expert in experts_of(ctx.model):
            expert.compile_repeated_blocks(backend="adaspa", fullgraph=True, options=options)
        compiled = ctx.model
    else:
        compiled = compile_model(ctx.model, backend="adaspa", fullgraph=True, options=options)
    try:
        return _run_adaspa(ctx, compiled, options, cache, first_adaspa, graphs0)
    finally:
        for expert in experts_of(ctx.model):  # undo a regional compile for the next method
            for block in expert.modules():
                block._compiled_call_impl = None


def _run_adaspa(ctx: Context, compiled, options: Dict[str, Any], cache: contextlib.ExitStack,
                first_adaspa: bool, graphs0: int) -> Dict[str, Any]:
    spec = ctx.spec

    # The first call compiles. The first adaspa method of a model then runs a warmup generation
    # (every phase once: kernel JIT and autotuning); later ones reuse the compiled kernels.
    if first_adaspa and ctx.args.cold_compile:
        from torch._inductor.utils import fresh_cache

        cache.enter_context(fresh_cache())  # kept open: later adaspa methods hit its FX cache
    set_step(compiled, 0)
    t0 = time.perf_counter()
    forward(compiled, ctx.branches[0], ctx.timesteps[0], spec, ctx.device)
    sync(ctx.device)
    first_ms = (time.perf_counter() - t0) * 1e3
    graphs1 = unique_graphs()
    warmup: List[Call] = []
    if first_adaspa:
        adaspa_compile.reset()
        warmup = generation(ctx, compiled, WARMUP_STEPS, {}, adaspa=True)

    adaspa_compile.reset()
    keep = {step: None for step in CHECK_STEPS.values()}
    base = memory_start(ctx)
    calls = generation(ctx, compiled, TIMED_STEPS, keep, adaspa=True)
    memory = memory_peak(ctx, base)
    report = report_of(ctx.model)

    samples: Dict[str, List[float]] = {name: [] for name in PHASE_NAMES.values()}
    for c in calls:
        if c.phase in PHASE_NAMES:
            samples[PHASE_NAMES[c.phase]].append(c.ms)
    ms = {name: median(xs) for name, xs in samples.items()}
    schedule = projected_schedule(spec)
    projected = projected_seconds(ms, spec.calls_per_step, schedule)
    overhead_ms = None
    if projected is not None:
        overhead_ms = spec.calls_per_step * (
            schedule["fused_search"] * (ms["fused_search"] - ms["dense"])
            + schedule["cached_search"] * (ms["cached_search"] - ms["sparse"]))

    sites = report.rewritten
    cache_bytes = sum(s.cache_bytes for s in sites)
    per_site = cache_bytes / len(sites) if sites else 0.0
    densities = [s.mean_density() for s in sites if s.mean_density() is not None]
    recalls = [s.mean_recall() for s in sites if s.mean_recall() is not None]
    errors = {f"{phase} step vs eager": rel_err(keep[step], ctx.refs[step])
              for phase, step in CHECK_STEPS.items()
              if step in ctx.refs and keep.get(step) is not None}
    return {
        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
        "forward_ms": ms, "samples_ms": samples,
        "phases_seen": "".join(c.phase for c in calls if c.branch == 0),
        "warmup_ms": [round(c.ms, 2) for c in warmup],
        "projected_50_s": projected, "schedule_projected": schedule,
        "search_overhead_ms": overhead_ms,
        "search_overhead_pct": None if projected is None else 100 * overhead_ms / 1e3 / projected,
        "selection_ms": [round(t, 2) for s in sites for t in s.search_ms],
        "density": median(densities), "recall": median(recalls),
        "sites_rewritten": len(sites), "sites_left_dense": len(report.skipped),
        "site_shapes": sorted({s.shape for s in sites}),
        "site_text": sorted({s.text for s in sites}),
        "cache_bytes": cache_bytes, "cache_bytes_per_site": per_site,
        "cache_gb_full_depth": per_site * spec.full_layers / 1e9,
        "cache_arithmetic": (f"{per_site / 1e6:.3g} MB per site x {spec.full_layers} layers = "
                             f"{per_site * spec.full_layers / 1e9:.3g} GB"),
        **memory,
        "compile_s": (first_ms - (ms["dense"] or 0.0)) / 1e3,
        "compile_cache": ("cold" if first_adaspa else "warm (FX cache of the first adaspa "
                          "compile)") if ctx.args.cold_compile else "as found",
        "graphs": unique_graphs() - graphs0, "recompiles": unique_graphs() - graphs1,
        "errors": errors,
        "report": str(report),
    }


TAYLORSEER_ATTENTION = (r"^blocks.*attn\d?", r"^transformer_blocks.*attn\d?",
                        r"^single_transformer_blocks.*attn\d?",
                        r"^temporal_transformer_blocks.*attn\d?")


def hooked_modules(experts: List[Any]) -> int:
    """How many modules of the experts carry a diffusers hook (the cache's)."""
    return sum(1 for e in experts for m in e.modules() if getattr(m, "_diffusers_hook", None)
               is not None and m._diffusers_hook.hooks)


def cache_of(method: str) -> Optional[str]:
    """The step cache of a cache method ("fbc", "taylorseer", "magcache"), else None."""
    if method.startswith("cache-"):
        return method[len("cache-"):]
    return method.split("+", 1)[1] if "+" in method else None


def cache_config(name: str):
    """``(diffusers cache config, None)`` or ``(None, why it cannot run)``."""
    import diffusers

    if name == "fbc":
        return diffusers.FirstBlockCacheConfig(threshold=0.05), None
    if name == "taylorseer":
        if not hasattr(diffusers, "TaylorSeerCacheConfig"):
            return None, f"diffusers {diffusers.__version__} has no TaylorSeerCacheConfig"
        # diffusers' default patterns ("^blocks.*attn", fullmatched) miss Wan's and CogVideoX's
        # attn1 / attn2: the same patterns, an optional digit allowed
        return diffusers.TaylorSeerCacheConfig(cache_identifiers=list(TAYLORSEER_ATTENTION)), None
    if name == "magcache":
        return None, ("MagCacheConfig needs model-specific mag_ratios from a calibration run "
                      "(calibrate=True) on real weights; diffusers ships FLUX_MAG_RATIOS only, and "
                      "ratios of random weights would say nothing")
    return None, f"unknown cache {name!r}"


def cache_skip_reason(spec: ModelSpec, model, method: str) -> Optional[str]:
    """Why a cache method cannot run for this model (None: it can)."""
    name = cache_of(method)
    if name is None:
        return None
    config, reason = cache_config(name)
    if reason:
        return reason
    for expert in experts_of(model):
        if not hasattr(expert, "enable_cache"):
            return f"{type(expert).__name__} has no enable_cache (not a diffusers CacheMixin)"
    return None


def cache_generation(ctx: Context, model, experts: List[Any], steps: int) -> float:
    """Seconds of a generation of ``steps`` steps (every branch in its cache context, as the
    pipelines call it), synchronised at both ends; the cache state is reset first."""
    for expert in experts:
        expert._reset_stateful_cache()
    timesteps = timestep_values(steps, ctx.spec.timestep_dtype)
    sync(ctx.device)
    t0 = time.perf_counter()
    for i in range(steps):
        set_step(model, i)
        # the uncompiled expert that runs this step: the hooks' state lives on it
        expert = experts[1 if isinstance(model, ExpertPair) and i >= model.boundary_step else 0]
        for b, kwargs in enumerate(ctx.branches):
            with expert.cache_context("cond" if b == 0 else "uncond"):
                out = forward(model, kwargs, timesteps[i], ctx.spec, ctx.device)
            del out
    sync(ctx.device)
    return time.perf_counter() - t0


def site_key(site) -> str:
    """A site's name with its model's label (two experts have sites of one name)."""
    return site.name + (f" ({site.model})" if site.model else "")


def run_cache(ctx: Context, method: str) -> Dict[str, Any]:
    """A step cache alone (inductor dense, ``torch.compile`` without fullgraph: the cache's
    decisions break the graph) or with adaspa-0.8: a warmup generation, then a timed one."""
    name = cache_of(method)
    config, _ = cache_config(name)
    steps = ctx.args.cache_steps
    search_steps = DEFAULT_SEARCH_STEPS if steps >= DEFAULT_STEPS else BENCH_SEARCH_STEPS
    experts = experts_of(ctx.model)
    torch._dynamo.reset()
    for expert in experts:
        expert.enable_cache(config)
    try:
        adaspa = method.startswith("adaspa")
        options: Dict[str, Any] = {}
        if adaspa:
            options = dict(ADASPA_OPTIONS[method.split("+")[0]], search_steps=search_steps)
            if ctx.args.quick:
                options["min_seq_len"] = 256
            compiled = compile_model(ctx.model, backend="adaspa", options=options)
        else:
            compiled = compile_model(ctx.model)
        if isinstance(compiled, ExpertPair):
            compiled.boundary_step = wan22_boundary_step(steps)
        graphs0 = unique_graphs()
        warmup_s = cache_generation(ctx, compiled, experts, steps)
        graphs1 = unique_graphs()
        adaspa_compile.reset()
        base = memory_start(ctx)
        generation_s = cache_generation(ctx, compiled, experts, steps)
        result: Dict[str, Any] = {
            "cache": type(config).__name__, "cache_config": repr(config),
            "compile": "torch.compile(backend='adaspa')" if adaspa else "torch.compile (inductor)",
            "steps": steps, "calls": steps * len(ctx.branches),
            "hooked_modules": hooked_modules(experts),
            "generation_s": generation_s, "warmup_generation_s": warmup_s,
            "per_50_steps_s": generation_s * DEFAULT_STEPS / steps,
            "graphs": unique_graphs() - graphs0, "recompiles": unique_graphs() - graphs1,
            **memory_peak(ctx, base)}
        if result["recompiles"]:
            result["note"] = ("the timed generation compiled again (the cache state, reset per "
                              "generation as pipelines reset it, differed from the warmup's): "
                              "its time includes that compile")
            log(f"{ctx.spec.name}: {method}: {result['note']}")
        if isinstance(compiled, ExpertPair):
            result["boundary_step"] = compiled.boundary_step
        if adaspa:
            report = report_of(ctx.model)
            sites = report.rewritten
            result.update(
                options={k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
                sites_rewritten=len(sites),
                # per site and branch, the phase of each call the site ran (a step the cache
                # skipped is no call of the sites it skipped)
                site_phases={site_key(s): {str(b): p for b, p in s.phases.items()}
                             for s in sites},
                site_calls={site_key(s): sum(len(p) for p in s.phases.values()) for s in sites},
                density=median([d for s in sites if (d := s.mean_density()) is not None]),
                report=str(report))
        return result
    finally:
        for expert in experts:
            expert.disable_cache()


def checks_for(ctx: Context, method: str, result: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Pass/fail checks of one method's result."""
    out = []

    def check(what: str, ok: bool, value: Any) -> None:
        out.append({"model": ctx.spec.name, "method": method, "what": what, "ok": bool(ok),
                    "value": value})

    if cache_of(method):
        check("generation timed", (result.get("generation_s") or 0) > 0,
              result.get("generation_s"))
        if method.startswith("adaspa"):
            sites = ctx.spec.layers * ctx.spec.experts
            check(f"rewritten sites == layers ({sites})", result["sites_rewritten"] == sites,
                  result["sites_rewritten"])
            check("phases recorded at every site", all(result["site_calls"].values()) and
                  bool(result["site_calls"]), result["site_calls"])
        return out
    tol = FALLBACK_TOL
    if "inductor" in ctx.ref_err and ctx.ref_err["inductor"] == ctx.ref_err["inductor"]:
        tol = max(2 * ctx.ref_err["inductor"], BF16_FLOOR)
    for what, err in result.get("errors", {}).items():
        if what.startswith("sparse"):
            check(f"{what} (informational, rel. L2)", True, err)
        elif method == "inductor":
            check(f"{what} < {FALLBACK_TOL}", err < FALLBACK_TOL, err)
        else:
            check(f"{what} < {tol:.2g} (2x inductor's error, >= {BF16_FLOOR})", err < tol, err)
    if method.startswith("adaspa"):
        check("recompiles == 0", result["recompiles"] == 0, result["recompiles"])
        if method.endswith(REGIONAL):  # a class whose blocks see inputs of other strides (as
            # HunyuanVideo's first dual block) compiles twice in the first call
            graphs = block_classes(ctx.model)
            check(f"graphs >= {graphs} (one per block class)", result["graphs"] >= graphs,
                  result["graphs"])
        else:
            check("graphs == 1 (fullgraph)", result["graphs"] == 1, result["graphs"])
        sites = ctx.spec.layers * ctx.spec.experts
        check(f"rewritten sites == layers ({sites})", result["sites_rewritten"] == sites,
              result["sites_rewritten"])
        want_shape = f"[{ctx.spec.batch},{ctx.spec.heads},{ctx.spec.tokens},{ctx.spec.head_dim}]"
        check(f"site shape {want_shape}", result["site_shapes"] == [want_shape],
              result["site_shapes"])
        boundary = TIMED_BOUNDARY_STEP if ctx.spec.experts == 2 else None
        expected = "".join(Phase(p).letter for p in phase_sequence(
            TIMED_STEPS, BENCH_SEARCH_STEPS, boundary))
        check(f"phases {expected}", result["phases_seen"] == expected, result["phases_seen"])
        target = result["options"].get("recall")
        if result["options"].get("mode") == "recall":
            check(f"recall >= {target}", (result["recall"] or 0.0) >= target - 1e-3,
                  result["recall"])
        else:
            check("density < 1 after search", (result["density"] or 1.0) < 1.0,
                  result["density"])
    return out


# ----------------------------------------------------------------------------- driver
def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build_fitting(specs: List[ModelSpec], args, device, dtype):
    """``(spec, model, branches, depth)``: the first of ``specs`` (deepest first) whose model
    builds and, with --full-depth, runs a first eager forward without running out of CUDA
    memory; memory is freed between tries. ``model`` is None when none fits."""
    oom: List[str] = []
    for spec in specs:
        free_memory(device)  # after the except block: the traceback no longer holds tensors
        log(f"{spec.name}: building ({spec.layers_label} layers, {spec.heads}x{spec.head_dim} "
            f"heads, {spec.tokens:,} tokens, {spec.text_tokens} of them text)")
        try:
            model = build_model(spec, device, dtype)
            branches = spec.inputs(model, device, dtype)
            if args.full_depth:  # the first forward, eager, as the probe of memory
                set_step(model, 0)
                forward(model, branches[0], timestep_values(1, spec.timestep_dtype)[0], spec,
                        device)
                sync(device)
        except torch.cuda.OutOfMemoryError:
            log(f"{spec.name}: out of memory at {spec.layers_label} layers")
            oom.append(spec.layers_label)
            model = branches = None
            continue
        if oom:
            reason = f"out of memory at {' and at '.join(oom)} layers"
        elif args.full_depth:
            reason = "full depth" if spec.layers == spec.full_layers else \
                "full depth asked, built at the truncated default"
        else:
            reason = "truncated (no --full-depth)"
        depth = {"layers": spec.layers, "full": spec.full_layers, "label": spec.layers_label,
                 "reason": reason}
        if spec.experts > 1:
            depth["per"] = "expert"
        return spec, model, branches, depth
    free_memory(device)
    return specs[-1], None, None, {"layers": None, "full": specs[-1].full_layers,
                                   "reason": f"out of memory at {' and at '.join(oom)} layers"}


def run_model(specs: List[ModelSpec], args, device, dtype, payload, all_checks,
              start: float) -> None:
    spec, model, branches, depth = build_fitting(specs, args, device, dtype)
    if model is None:
        payload["models"][spec.name] = {"config": {"depth": depth}, "methods": {},
                                        "error": depth["reason"]}
        all_checks.append({"model": spec.name, "method": "-", "what": "builds", "ok": False,
                           "value": depth["reason"]})
        return
    depth_note = f"{spec.layers_label} layers of {spec.full_layers}" + (
        " per expert" if spec.experts > 1 else "")
    params = sum(p.numel() for m in experts_of(model) for p in m.parameters())
    ctx = Context(args=args, device=device, dtype=dtype, spec=spec, model=model,
                  branches=branches,
                  timesteps=timestep_values(max(TIMED_STEPS, WARMUP_STEPS), spec.timestep_dtype))
    entry = payload["models"][spec.name] = {
        "config": {"heads": spec.heads, "head_dim": spec.head_dim, "tokens": spec.tokens,
                   "text_tokens": spec.text_tokens, "layers": spec.layers_label,
                   "full_layers": spec.full_layers, "batch": spec.batch,
                   "calls_per_step": spec.calls_per_step, "params": params, "notes": spec.notes,
                   "depth": depth,
                   "search_steps_timed": list(BENCH_SEARCH_STEPS),
                   **({"boundary_step_timed": TIMED_BOUNDARY_STEP,
                       "boundary_step_50": wan22_boundary_step(50),
                       "boundary_assumption": f"boundary_ratio {WAN22_BOUNDARY_RATIO}, "
                                              f"FlowMatchEulerDiscreteScheduler(shift="
                                              f"{WAN22_SHIFT})"} if spec.experts == 2 else {})},
        "methods": {},
        "run": {k: args.meta[k] for k in ("device", "time", "torch", "command")}}
    with contextlib.ExitStack() as adaspa_cache:
        first_adaspa = True
        for method in args.methods:
            if time.perf_counter() - start > args.time_limit:
                log(f"{spec.name}: {method} skipped: past --time-limit {args.time_limit:.0f} s")
                entry["methods"][method] = {"skipped": "time limit"}
                continue
            reason = cache_skip_reason(spec, ctx.model, method)
            if reason is None and method.endswith(REGIONAL) and not block_classes(ctx.model):
                reason = f"{type(experts_of(ctx.model)[0]).__name__} declares no repeated blocks"
            if reason is not None:
                log(f"{spec.name}: {method} skipped: {reason}")
                entry["methods"][method] = {"skipped": reason}
                continue
            log(f"{spec.name}: {method} ...")
            t0 = time.perf_counter()
            try:
                if method == "eager":
                    result = run_eager(ctx)
                elif method == "inductor":
                    result = run_inductor(ctx)
                elif cache_of(method):
                    result = run_cache(ctx, method)
                else:
                    result = run_adaspa(ctx, method, adaspa_cache, first_adaspa)
                    first_adaspa = False
            except Exception as exc:  # record and go on: one failure must not hide the others
                import traceback

                traceback.print_exc()
                result = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
                all_checks.append({"model": spec.name, "method": method, "what": "runs",
                                   "ok": False, "value": result["error"][:300]})
            else:
                all_checks.extend(checks_for(ctx, method, result))
            result["wall_s"] = time.perf_counter() - t0
            if "projected_50_s" in result or "generation_s" in result:
                result["depth"] = depth_note  # the depth the projection / generation ran at
            entry["methods"][method] = result
            torch._dynamo.reset()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            log(f"{spec.name}: {method} done in {result['wall_s']:.1f} s: "
                + summary(result))
            if "report" in result and args.verbose:
                print(result["report"], flush=True)
            add_ratios(entry)
            write_results(payload, all_checks, args)
    del ctx, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def summary(r: Dict[str, Any]) -> str:
    if "error" in r:
        return "ERROR " + r["error"][:200]
    if "generation_s" in r:
        return f"{r['steps']} steps in {r['generation_s']:.2f} s"
    ms = ", ".join(f"{k} {v:.1f} ms" for k, v in r.get("forward_ms", {}).items() if v is not None)
    proj = r.get("projected_50_s")
    return ms + (f"; 50 steps {proj:.1f} s" if proj is not None else "")


def add_ratios(entry: Dict[str, Any]) -> None:
    """Speedups over inductor dense (same run, same card)."""
    base = entry["methods"].get("inductor", {})
    b_ms, b_50 = base.get("forward_ms", {}).get("dense"), base.get("projected_50_s")
    b_compile = base.get("compile_s")
    adaspa_50 = entry["methods"].get("adaspa-0.8", {}).get("projected_50_s")
    for r in entry["methods"].values():
        if "generation_s" in r:  # a cache method: a measured generation, not a projection
            scale = r["steps"] / DEFAULT_STEPS  # projections scaled linearly (exact at 50)
            r["inductor_projected_s"] = b_50 * scale if b_50 else None
            r["adaspa-0.8_projected_s"] = adaspa_50 * scale if adaspa_50 else None
            r["x_inductor_gen"] = b_50 * scale / r["generation_s"] if b_50 else None
            r["x_adaspa-0.8_gen"] = adaspa_50 * scale / r["generation_s"] if adaspa_50 else None
            continue
        if "forward_ms" not in r:
            continue
        sparse = r["forward_ms"].get("sparse") or r["forward_ms"].get("dense")
        r["x_inductor_forward"] = b_ms / sparse if b_ms and sparse else None
        r["x_inductor_50"] = b_50 / r["projected_50_s"] if b_50 and r.get("projected_50_s") \
            else None
        r["compile_x_inductor"] = r["compile_s"] / b_compile \
            if b_compile and r.get("compile_s") is not None else None


TARGETS = [
    # (model, method, key, op, bound, what)
    ("hunyuan_video", "adaspa-0.8", "x_inductor_forward", ">=", 2.7,
     "HunyuanVideo sparse-step forward vs inductor, s=0.8"),
    ("hunyuan_video", "adaspa-0.8", "x_inductor_50", ">=", 2.1, "HunyuanVideo 50 steps, s=0.8"),
    ("hunyuan_video", "adaspa-0.8-fp8", "x_inductor_50", ">=", 3.0,
     "HunyuanVideo 50 steps, s=0.8, FP8 sparse steps"),
    ("hunyuan_video", "adaspa-0.9", "x_inductor_50", ">=", 2.4, "HunyuanVideo 50 steps, s=0.9"),
    ("wan", "adaspa-0.9", "x_inductor_50", ">=", 1.9, "Wan2.1-14B 50 steps, s=0.9"),
    ("*", "adaspa-0.8", "search_overhead_pct", "<=", 3.0, "search overhead, % of 50 steps"),
    ("hunyuan_video", "adaspa-0.8", "cache_gb_full_depth", "<=", 1.5,
     "cache memory at 60 HunyuanVideo layers, GB"),
    ("*", "adaspa-0.8", "compile_x_inductor", "<=", 1.5, "compile time / inductor's"),
]


def targets(payload: Dict[str, Any]) -> List[Dict[str, Any]]:
    rows = []
    for model, method, key, op, bound, what in TARGETS:
        for name, entry in payload["models"].items():
            if model not in ("*", name):
                continue
            value = entry["methods"].get(method, {}).get(key)
            ok = None if value is None else (value >= bound if op == ">=" else value <= bound)
            rows.append({"model": name, "method": method, "what": what, "target": f"{op} {bound}",
                         "value": value, "met": ok})
    return rows


def table(payload: Dict[str, Any]) -> str:
    lines = ["| model | layers | method | compile s | dense ms | fused ms | cached ms | sparse ms "
             "| 50 steps s | x ind. fwd | x ind. 50 | search % | peak GiB | cache MB | graphs "
             "/ recompiles | density | recall |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, entry in payload["models"].items():
        layers = entry["config"]["layers"]
        for method, r in entry["methods"].items():
            if "generation_s" in r:  # measured: the 50-steps column holds the generation
                lines.append(
                    f"| {name} | {layers} | {method} | - | - | - | - | - | "
                    f"{fmt(r['generation_s'])} ({r['steps']} steps, measured) | - | "
                    f"{fmt(r.get('x_inductor_gen'), '.2f')} | - | {fmt(r.get('peak_gib'))} | - | "
                    f"{r['graphs']} / {r['recompiles']} | {fmt(r.get('density'), '.3f')} | - |")
                continue
            if "forward_ms" not in r:
                lines.append(f"| {name} | {layers} | {method} | "
                             f"{r.get('error', r.get('skipped', '?'))[:60]} |" + " |" * 13)
                continue
            ms = r["forward_ms"]
            graphs = f"{r['graphs']} / {r['recompiles']}" if "graphs" in r else "-"
            lines.append(
                f"| {name} | {layers} | {method} | {fmt(r.get('compile_s'))} | "
                f"{fmt(ms.get('dense'))} | {fmt(ms.get('fused_search'))} | "
                f"{fmt(ms.get('cached_search'))} | {fmt(ms.get('sparse'))} | "
                f"{fmt(r.get('projected_50_s'))} | {fmt(r.get('x_inductor_forward'), '.2f')} | "
                f"{fmt(r.get('x_inductor_50'), '.2f')} | {fmt(r.get('search_overhead_pct'))} | "
                f"{fmt(r.get('peak_gib'))} | "
                f"{fmt(r['cache_bytes'] / 1e6 if 'cache_bytes' in r else None, '.3g')} | "
                f"{graphs} | "
                f"{fmt(r.get('density'), '.3f')} | {fmt(r.get('recall'), '.3f')} |")
    return "\n".join(lines)


def chart(payload: Dict[str, Any], paths: List[Path]) -> None:
    """Grouped bars: projected 50-step time per method and model (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: no chart (pip install matplotlib)")
        return
    models = list(payload["models"])
    fig, ax = plt.subplots(figsize=(2.8 * max(1, len(models)) + 2, 4.2))
    width = 0.8 / len(METHODS)
    colors = plt.get_cmap("tab10").colors
    for j, method in enumerate(METHODS):
        xs, ys = [], []
        for i, name in enumerate(models):
            v = payload["models"][name]["methods"].get(method, {}).get("projected_50_s")
            if v is not None:
                xs.append(i + (j - (len(METHODS) - 1) / 2) * width)
                ys.append(v)
        if not ys:
            continue
        bars = ax.bar(xs, ys, width, label=method, color=colors[j])
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels([f"{n}\n({payload['models'][n]['config']['layers']} layers)\n"
                        f"{payload['models'][n].get('run', {}).get('device', '')}" for n in models],
                       fontsize=8)
    ax.set_ylabel("projected time of 50 steps, s")
    ax.set_title("End-to-end, random bf16 weights (9 dense + 1 fused + 1 cached + 39 sparse "
                 "steps)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, dpi=120)
    plt.close(fig)


def write_results(payload: Dict[str, Any], all_checks,
                  args) -> Tuple[List[Path], Dict[str, Any]]:
    """Write the JSON, merged by model into an existing results file; return (paths, merged)."""
    payload["checks"] = all_checks
    payload["targets"] = targets(payload)
    merged = dict(payload)
    if args.json.exists() and not args.no_merge:
        try:
            old = json.loads(args.json.read_text())
            if old.get("meta", {}).get("quick") == args.quick:
                models = dict(old.get("models", {}))
                models.update(payload["models"])
                merged = dict(payload, models=models)
                merged["targets"] = targets(merged)
        except (OSError, ValueError):
            pass
    return write_json(merged, args.json), merged


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny widths and lengths (CPU smoke test)")
    ap.add_argument("--models", default="hunyuan_video,wan,cogvideox",
                    help="comma list of hunyuan_video, wan, wan22 (Wan 2.2 A14B: two experts "
                         "of Wan2.1-14B's shape), cogvideox")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma list of {ALL_METHODS} (default: the first {len(METHODS)}); "
                         "cache-NAME: a diffusers step cache on inductor dense, adaspa-0.8+NAME: "
                         "with adaspa; these time a whole generation of --cache-steps steps")
    ap.add_argument("--cache-steps", type=int, default=None,
                    help=f"steps of the cache methods' generation (default {DEFAULT_STEPS}, 8 with "
                         "--quick)")
    ap.add_argument("--full-depth", action="store_true",
                    help="build the models at their real depth (with --quick too); on CUDA, "
                         "halve the layers after an out-of-memory error, down to the truncated "
                         "default")
    ap.add_argument("--hunyuan-layers", default=None,
                    help="DUAL,SINGLE blocks (default 2,4; 1,1 with --quick)")
    ap.add_argument("--wan-layers", type=int, default=None, help="default 4 (2 with --quick)")
    ap.add_argument("--cogvideox-layers", type=int, default=None,
                    help="default 4 (2 with --quick)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cold-compile", action=argparse.BooleanOptionalAction, default=None,
                    help="time the first compile of inductor and adaspa with empty caches "
                         "(default: on CUDA without --quick)")
    ap.add_argument("--time-limit", type=float, default=480.0,
                    help="seconds; methods that would start later are skipped (results so far "
                         "are written after every method)")
    ap.add_argument("--json", type=Path, default=None,
                    help="default benchmarks/results/e2e.json (e2e_quick.json with --quick)")
    ap.add_argument("--no-merge", action="store_true",
                    help="overwrite --json instead of replacing this run's models in it")
    ap.add_argument("--verbose", action="store_true", help="print the adaspa report per method")
    args = ap.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in args.models:
        if m not in ("hunyuan_video", "wan", "wan22", "cogvideox"):
            ap.error(f"--models: unknown model {m!r}")
    for m in args.methods:
        if m not in ALL_METHODS:
            ap.error(f"--methods: unknown method {m!r}; choose from {ALL_METHODS}")
    if args.cache_steps is None:
        args.cache_steps = 8 if args.quick else DEFAULT_STEPS
    if args.hunyuan_layers is None:
        args.hunyuan_layers = "1,1" if args.quick else "2,4"
    if args.wan_layers is None:
        args.wan_layers = 2 if args.quick else 4
    if args.cogvideox_layers is None:
        args.cogvideox_layers = 2 if args.quick else 4
    try:
        dual, single = (int(x) for x in args.hunyuan_layers.split(","))
    except ValueError:
        ap.error("--hunyuan-layers takes DUAL,SINGLE, e.g. 2,4")
    args.hunyuan_layers = (dual, single)
    if args.json is None:
        args.json = RESULTS / ("e2e_quick.json" if args.quick else "e2e.json")
    if args.cold_compile is None:
        args.cold_compile = args.device.startswith("cuda") and not args.quick
    return args


# HunyuanVideo's full depth: 20 dual-stream and 40 single-stream blocks (60 sites in SHAPES).
HUNYUAN_FULL = (20, 40)


def depths(name: str, args) -> List[Any]:
    """The depths to try, deepest first: the truncated default alone, or with --full-depth the
    real depth, then halved (not below the default) down to the default."""
    default = {"hunyuan_video": args.hunyuan_layers, "wan": args.wan_layers,
               "wan22": args.wan_layers, "cogvideox": args.cogvideox_layers}[name]
    if not args.full_depth:
        return [default]
    if name == "hunyuan_video":
        assert sum(HUNYUAN_FULL) == SHAPES["hunyuan"].layers
        out, k = [], 0
        while True:
            d = tuple(max(lo, full >> k) for lo, full in zip(default, HUNYUAN_FULL))
            if d == tuple(default) or (out and d == out[-1]):
                break
            out.append(d)
            k += 1
        return out + [tuple(default)]
    full = SHAPES["cogvideox" if name == "cogvideox" else "wan"].layers
    out = []
    while full > default:
        out.append(full)
        full //= 2
    return out + [default]


def fa4_status() -> str:
    """Whether the fused search's dense pass can run FlashAttention-4 here (an optional
    dependency that changes the fused-search times), with its version."""
    from importlib import metadata

    from adaspa_compile.kernels.fa4_attention import _fa4_forward

    forward = _fa4_forward()
    if isinstance(forward, str):
        return forward
    return (f"flash-attn-4 {metadata.version('flash-attn-4')} "
            f"(ADASPA_FA4={os.environ.get('ADASPA_FA4', '1')})")


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    device = torch.device(args.device)
    dtype = torch.bfloat16
    import diffusers

    registered_by = "entry point"
    if "adaspa" not in torch._dynamo.list_backends(exclude_tags=()):
        # Not pip-installed (a bare checkout): register the same function under the same name.
        from torch._dynamo.backends.registry import register_backend

        from adaspa_compile.backend import adaspa_backend

        register_backend(adaspa_backend, name="adaspa")
        registered_by = "benchmarks/e2e.py (package not installed)"
    meta = {"backend_registered_by": registered_by, **run_meta(device),
            "diffusers": diffusers.__version__, "dtype": "bfloat16", "quick": args.quick,
            "cold_compile": args.cold_compile,
            "schedule_timed": f"search_steps={BENCH_SEARCH_STEPS}, {TIMED_STEPS} steps "
                              f"(after a {WARMUP_STEPS}-step warmup generation)",
            "schedule_projected": DEFAULT_SCHEDULE,
            "note": "random weights: attention is close to uniform, so recall mode keeps most "
                    "blocks and its speed says little about trained models; the fixed-sparsity "
                    "methods cost the same whatever the weights"}
    meta["fused_search_dense_pass_fa4"] = fa4_status()
    args.meta = meta
    log(f"e2e benchmark: {meta}")
    makers = {"hunyuan_video": lambda d: hunyuan_spec(args.quick, *d),
              "wan": lambda d: wan_spec(args.quick, d),
              "wan22": lambda d: wan22_spec(args.quick, d),
              "cogvideox": lambda d: cogvideox_spec(args.quick, d)}
    payload: Dict[str, Any] = {"meta": meta, "models": {}}
    all_checks: List[Dict[str, Any]] = []
    for name in args.models:
        if time.perf_counter() - start > args.time_limit:
            log(f"{name} skipped: past --time-limit {args.time_limit:.0f} s")
            continue
        specs = [makers[name](d) for d in depths(name, args)]
        run_model(specs, args, device, dtype, payload, all_checks, start)

    paths, merged = write_results(payload, all_checks, args)
    png = args.json.with_suffix(".png")
    chart(merged, with_out_copy(png))
    print("\n" + table(payload))
    for name, entry in payload["models"].items():
        r = entry["methods"].get("adaspa-0.8", {})
        if "cache_arithmetic" in r:
            print(f"cache memory, {name} at full depth: {r['cache_arithmetic']}")
    print("\ntargets (ratios from this run):")
    for t in payload["targets"]:
        met = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        print(f"  {t['model']:14s} {t['what']:48s} {t['target']:>7s}  {fmt(t['value'], '.3g'):>8s}"
              f"  {met}")
    print("\nchecks:")
    for c in all_checks:
        value = f"{c['value']:.2e}" if isinstance(c["value"], float) else c["value"]
        print(f"  {'ok  ' if c['ok'] else 'FAIL'} {c['model']:14s} {c['method']:14s} "
              f"{c['what']}: {value}")
    log(f"wrote {', '.join(str(p) for p in paths)}; total {time.perf_counter() - start:.0f} s")
    failed = [c for c in all_checks if not c["ok"]]
    if failed:
        print(f"CHECK FAILURES: {len(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
