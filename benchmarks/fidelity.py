"""Fidelity of AdaSpa against peer selectors at equal density.

    python benchmarks/fidelity.py                      # full run, one H100, about 10 minutes
    python benchmarks/fidelity.py --resolutions 16x128x128   # one resolution, about 7 minutes
    python benchmarks/fidelity.py --quick              # CPU smoke run of the whole flow
    python benchmarks/fidelity.py --pairs 16 --steps 30 --resolutions 16x64x64   # cut down

Loads the trained fidelity model (``adaspa_compile/fidelity/weights/``, or ``--weights``), samples
(prompt, seed) pairs with 50-step flow matching (``adaspa_compile.fidelity.sample``, diffusers'
``FlowMatchEulerDiscreteScheduler``, true CFG) at two resolutions, densely (the eager model) and
under ``backend="adaspa"`` with each method at densities 0.2 and 0.1:

- ``default``: the backend's default options; ``paper``: ``options={"preset": "paper"}`` (a
  method whose options equal an earlier one's at a resolution reuses its clips);
- ``window``: static 3D local window on the latent token grid; ``pooled``: mean-pooled q.k;
- ``recall0.9``: ``mode="recall"``, ``recall=0.9`` (its density is what the target recall
  needs, so it runs once per resolution);
- ablations of the defaults: ``cfg-cond`` / ``cfg-sum`` (``cfg_mask``), ``layer-budget``
  (``head_budget="layer"``), ``no-tiers`` (``head_budget="uniform"``);
- ``fp8``: the defaults with ``precision="fp8"`` (FP8 block-sparse steps), compared with
  ``default`` (bf16) on the same pairs: the PSNR difference to it with its interval, and the
  per-call attention error of the FP8 kernel against bf16 on the run's own q, k, v.

Every compiled run uses ``inner_backend="eager"`` (``--inner-backend``), so the only difference
from the dense reference is the attention. Search steps scale with the step count as the paper's
zero-based 9 and 29 of 50. Metrics against the dense clip of the same (prompt, seed): PSNR and SSIM
(torchmetrics; SSIM per frame, Gaussian window 11, sigma 1.5) on the final frames in [0, 1];
attention recall and density per layer at each search step (``adaspa_compile.report()``, both CFG
branches); wall time; and per (resolution, density, method) the mean PSNR difference to
``window`` and to ``pooled`` with its 95% paired-bootstrap interval over the (prompt, seed) pairs
(``scipy.stats.bootstrap``).

Writes ``benchmarks/results/fidelity.json`` (every clip's numbers) and
``benchmarks/results/fidelity_summary.json`` (one row per resolution, density and method;
``--quick``: ``*_quick.json``), prints a markdown table and the goals (met / missed), and writes a
PSNR-vs-density plot and a frame strip (dense, default, window, pooled) as PNGs; everything is also
copied into ``$OUT`` when set. ``--quick`` also checks the harness: sparsity 0 must reproduce the
dense clips (PSNR >= 60 dB), else the script fails. ``--max-minutes`` stops launching runs that
would not finish in time (they are listed as skipped), so one device call always returns results.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import bootstrap
from torchmetrics.functional.image import (peak_signal_noise_ratio,
                                           structural_similarity_index_measure)


import adaspa_compile
from adaspa_compile import AdaSpaConfig
from adaspa_compile.schedule import scaled_search_steps as search_steps_for
from adaspa_compile.fidelity import (FIDELITY_CONFIG, MAX_TOKENS, WEIGHTS_DIR, FidelityModel,
                                     build_model, default_shift, forward_flops, load_model,
                                     make_batch, random_captions, sample, shift_sigmas)
from _common import (RESULTS, adaspa_backend_for_compile, environment, export, mean, rel_err,
                     sync, write_json)
from train_fidelity_model import frame_strip

PROMPT_SEED = 10**12 + 4  # held-out captions: training clips use seeds below 10**10
PAPER_STEPS = 50
RECALL_TARGET = 0.9
# The options each method adds to the run's schedule, block size and density.
METHOD_OPTIONS: Dict[str, Dict[str, Any]] = {
    "default": {},
    "paper": {"preset": "paper"},
    "window": {"selector": "window"},
    "pooled": {"selector": "pooled"},
    "recall0.9": {"mode": "recall", "recall": RECALL_TARGET},
    "cfg-cond": {"cfg_mask": "cond"},
    "cfg-sum": {"cfg_mask": "sum"},
    "layer-budget": {"head_budget": "layer"},
    "no-tiers": {"head_budget": "uniform"},
    "fp8": {"precision": "fp8"},
}
METHODS = tuple(METHOD_OPTIONS)
CORE = ("default", "paper", "window", "pooled")  # run first at every density
PEERS = ("window", "pooled")  # every row's PSNR is compared with these
STRIP_METHODS = ("default", "window", "pooled")
SANITY_PSNR = 60.0  # --quick: sparsity 0 against dense
PSNR_CAP = 100.0  # dB, for identical clips
# Assumed effective throughput of the plan's estimate (bf16 dense forwards, efficient SDPA with a
# key-padding mask, on one H100); the run measures the real one and re-plans after each dense run.
ASSUMED_TFLOPS = {"cuda": 200.0, "cpu": 0.2}
TRAIN_COMMAND = "python benchmarks/train_fidelity_model.py --minutes 8"


# ----------------------------------------------------------------------------- setup
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--weights", default=str(WEIGHTS_DIR), help="folder written by save_model")
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke run: trains a tiny model for a few seconds (unless --weights "
                        "holds one), 2 pairs, 8 steps, tiny resolutions, block size 16")
    p.add_argument("--pairs", type=int, default=None, help="(prompt, seed) pairs (full: 32)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (full: 50)")
    p.add_argument("--resolutions", default=None,
                   help="comma-separated FRAMESxHEIGHTxWIDTH (full: 16x64x64,16x128x128)")
    p.add_argument("--densities", default="0.2,0.1", help="comma-separated target densities")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of "
                   + ", ".join(METHODS))
    p.add_argument("--batch", type=int, default=None,
                   help="clips per sample() call (full: 16; all runs use the same batches)")
    p.add_argument("--guidance-scale", type=float, default=4.0)
    p.add_argument("--block-size", type=int, default=None, help="full: 64, quick: 16")
    p.add_argument("--min-seq-len", type=int, default=None, help="full: 1024, quick: 64")
    p.add_argument("--inner-backend", default="eager", choices=("eager", "aot_eager", "inductor"))
    p.add_argument("--max-minutes", type=float, default=8.5,
                   help="skip runs that would end after this many minutes from the start")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--out-json", default=None)
    p.add_argument("--summary-json", default=None)
    p.add_argument("--plot-png", default=None)
    p.add_argument("--strip-png", default=None)
    args = p.parse_args(argv)
    q = args.quick
    args.pairs = args.pairs or (2 if q else 32)
    args.steps = args.steps or (8 if q else PAPER_STEPS)
    args.resolutions = [parse_shape(s) for s in
                        (args.resolutions or ("4x16x16,4x32x32" if q else "16x64x64,16x128x128"))
                        .split(",")]
    args.densities = [float(d) for d in args.densities.split(",")]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = sorted(set(args.methods) - set(METHODS))
    if bad:
        raise SystemExit(f"unknown method(s) {bad}; valid: {', '.join(METHODS)}")
    if any(not 0.0 < d <= 1.0 for d in args.densities):
        raise SystemExit(f"densities must be in (0, 1], got {args.densities}")
    args.batch = min(args.batch or (2 if q else 16), args.pairs)
    args.block_size = args.block_size or (16 if q else 64)
    args.min_seq_len = args.min_seq_len or (64 if q else 1024)
    suffix = "_quick" if q else ""
    results = RESULTS
    args.out_json = args.out_json or str(results / f"fidelity{suffix}.json")
    args.summary_json = args.summary_json or str(results / f"fidelity_summary{suffix}.json")
    args.plot_png = args.plot_png or str(results / f"fidelity_psnr{suffix}.png")
    args.strip_png = args.strip_png or str(results / f"fidelity_strip{suffix}.png")
    return args


def parse_shape(text: str) -> Tuple[int, int, int]:
    try:
        frames, height, width = (int(v) for v in text.lower().strip().split("x"))
    except ValueError:
        raise SystemExit(f"a resolution is FRAMESxHEIGHTxWIDTH, e.g. 16x64x64; got {text!r}") \
            from None
    p = FIDELITY_CONFIG["patch_size"]
    if height % p or width % p:
        raise SystemExit(f"height and width must be multiples of the patch size {p}: {text!r}")
    return frames, height, width


def say(message: str) -> None:
    print(message, flush=True)


def shape_name(shape: Tuple[int, int, int]) -> str:
    return "x".join(map(str, shape))


def token_grid(shape: Tuple[int, int, int]) -> Tuple[int, int, int]:
    p, pt = FIDELITY_CONFIG["patch_size"], FIDELITY_CONFIG["patch_size_t"]
    return shape[0] // pt, shape[1] // p, shape[2] // p


# ----------------------------------------------------------------------------- the model
def quick_train(device: torch.device, shape: Tuple[int, int, int], steps: int = 40,
                batch: int = 4, seed: int = 0) -> Tuple[FidelityModel, Dict[str, Any]]:
    """A few flow-matching steps of the fidelity model on tiny clips (fp32, the training script's
    recipe without EMA, schedule or CFG dropout): enough for a smoke run, NOT a trained model."""
    model = build_model(seed=seed)
    transformer = model.transformer.to(device).train()
    encoder = model.text_encoder.to(device)
    opt = torch.optim.AdamW(transformer.parameters(), lr=1e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    t0 = time.perf_counter()
    for step in range(steps):
        data = make_batch(batch, *shape, seed=seed * 1_000_003 + step, text_encoder=encoder)
        clips = data.pixels
        noise = torch.randn(clips.shape, generator=gen)
        sigma = shift_sigmas(torch.sigmoid(torch.randn(batch, generator=gen)),
                             default_shift(*shape))
        s = sigma.view(-1, 1, 1, 1, 1)
        x, target = ((1 - s) * clips + s * noise).to(device), (noise - clips).to(device)
        pred = transformer(hidden_states=x, timestep=(sigma * 1000.0).to(device),
                           return_dict=False, **data.cond.to(device).model_kwargs())[0]
        loss = F.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        losses.append(float(loss))
    transformer.eval()
    info = {"source": "quick-trained in this process (NOT the shipped weights)", "steps": steps,
            "batch": batch, "shape": list(shape), "seconds": round(time.perf_counter() - t0, 1),
            "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4)}
    return model, info


def get_model(args: argparse.Namespace, device: torch.device) -> Tuple[FidelityModel, Dict]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    folder = Path(args.weights)
    if (folder / "config.json").is_file():
        model = load_model(folder, device=device, dtype=dtype)
        return model, {"source": "weights", "folder": str(folder), "dtype": str(dtype)}
    if not args.quick:
        raise SystemExit(
            f"error: no trained fidelity model in {folder} (config.json is missing).\n"
            f"Train it first (one CUDA GPU, about 10 minutes):\n    {TRAIN_COMMAND}\n"
            "or pass --weights FOLDER, or run --quick for a smoke run with a tiny model "
            "trained on the spot.")
    say(f"QUICK: no weights in {folder}; training a tiny stand-in model for a few seconds on "
        f"{device}. Its numbers say NOTHING about AdaSpa's fidelity.")
    model, info = quick_train(device, args.resolutions[0])
    model.transformer = torch.nn.Module.to(model.transformer, dtype=dtype)
    info["dtype"] = str(dtype)
    say(f"QUICK: trained {info['steps']} steps of batch {info['batch']} x {info['shape']} in "
        f"{info['seconds']} s (loss {info['loss_first']} -> {info['loss_last']})")
    return model, info


# ----------------------------------------------------------------------------- metrics
def to_unit(clips: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` pixels -> ``[0, 1]``, clamped, fp32 on the CPU."""
    return ((clips.detach().float().cpu().clamp(-1, 1) + 1) / 2)


def psnr(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per clip PSNR (dB) of ``[N, 3, F, H, W]`` frames in [0, 1] (torchmetrics), capped at
    100 dB (identical clips)."""
    return peak_signal_noise_ratio(x, ref, data_range=1.0, reduction="none",
                                   dim=(1, 2, 3, 4)).clamp(max=PSNR_CAP)


def ssim(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per clip SSIM of ``[N, 3, F, H, W]`` frames in [0, 1]: torchmetrics' SSIM of each frame
    (Gaussian window 11, sigma 1.5), the mean over frames."""
    n, c, f, h, w = x.shape

    def frames(clips: torch.Tensor) -> torch.Tensor:
        return clips.permute(0, 2, 1, 3, 4).reshape(n * f, c, h, w)

    per_frame = structural_similarity_index_measure(frames(x), frames(ref), data_range=1.0,
                                                    gaussian_kernel=True, sigma=1.5,
                                                    kernel_size=11, reduction="none")
    return per_frame.view(n, f).mean(1)


def paired_difference(ours: Sequence[float], peer: Sequence[float],
                      seed: int = 0) -> Tuple[float, List[float]]:
    """Mean of ``ours - peer`` over the same (prompt, seed) pairs and its 95% paired-bootstrap
    interval ``[low, high]`` (``scipy.stats.bootstrap``: BCa, percentile where BCa is undefined
    for so few pairs); ``[d, d]`` when every pair differs by the same ``d``."""
    a, b = np.asarray(ours, dtype=float), np.asarray(peer, dtype=float)
    diff = float(np.mean(a - b))
    if np.ptp(a - b) == 0:
        return round(diff, 3), [round(diff, 3)] * 2
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ci = bootstrap((a, b), lambda x, y, axis: np.mean(x - y, axis=axis), paired=True,
                           vectorized=True, confidence_level=0.95, method=method,
                           rng=np.random.default_rng(seed)).confidence_interval
        if np.isfinite(ci.low) and np.isfinite(ci.high):
            break
    return round(diff, 3), [round(float(ci.low), 3), round(float(ci.high), 3)]


class SearchProbe:
    """Calls the compiled transformer and, after each call at a search step, records what every
    rewritten site's search found (``report()``: density and recall ``[B][H]``), per CFG branch.

    ``sample`` reads ``.config`` and ``.parameters()``; both come from the wrapped module.
    """

    def __init__(self, compiled: torch.nn.Module, search_steps: Sequence[int]) -> None:
        self.compiled = compiled
        self.config = compiled.config
        self.search_steps = set(search_steps)
        self.records: Dict[int, Dict[str, Dict[str, List[float]]]] = {}
        self.phases: Dict[str, Dict[int, str]] = {}

    def parameters(self):
        return self.compiled.parameters()

    def __call__(self, **kwargs):
        out = self.compiled(**kwargs)
        rep = adaspa_compile.report(self.compiled)
        if rep.step in self.search_steps:
            for site in rep.rewritten:
                if site.recall is None or site.density is None:
                    continue
                rec = self.records.setdefault(rep.step, {}).setdefault(
                    site.name, {"recall": [], "density": []})
                rec["recall"] += [v for row in site.recall for v in row]
                rec["density"] += [v for row in site.density for v in row]
        for site in rep.rewritten:
            self.phases[site.name] = dict(site.phases)
        return out


def summarise_search(records: Dict[int, Dict[str, Dict[str, List[float]]]]) -> Dict[str, Any]:
    """Per search step: per layer mean / min recall and mean density (over clips, branches,
    heads), and their means over layers."""
    out: Dict[str, Any] = {}
    for step in sorted(records):
        layers = {name: {"recall": round(mean(r["recall"]), 4),
                         "min_head_recall": round(min(r["recall"]), 4),
                         "density": round(mean(r["density"]), 4)}
                  for name, r in records[step].items()}
        out[str(step)] = {"recall": round(mean([v["recall"] for v in layers.values()]), 4),
                          "density": round(mean([v["density"] for v in layers.values()]), 4),
                          "layers": layers}
    return out


# ----------------------------------------------------------------------------- runs
def method_options(method: str, density: Optional[float], args: argparse.Namespace,
                   shape: Tuple[int, int, int], search: Tuple[int, ...]) -> Dict[str, Any]:
    """The ``options=`` of one run: the method's own, then the run's schedule, block size and
    density (these override a preset)."""
    opts: Dict[str, Any] = dict(METHOD_OPTIONS[method], search_steps=search,
                                block_size=args.block_size, min_seq_len=args.min_seq_len,
                                inner_backend=args.inner_backend)
    if density is not None:
        opts["sparsity"] = round(1.0 - density, 6)
    if method == "window":
        opts["video_grid"] = token_grid(shape)
    return opts


def generate(transformer, model: FidelityModel, prompts: List[str], seeds: List[int],
             args: argparse.Namespace, shape: Tuple[int, int, int],
             device: torch.device) -> Tuple[List[float], List[torch.Tensor]]:
    """Sample every pair in batches of ``args.batch``; returns per batch seconds and the final
    clips in [0, 1] on the CPU (one tensor per batch)."""
    seconds, clips = [], []
    for start in range(0, len(prompts), args.batch):
        idx = list(range(start, min(start + args.batch, len(prompts))))
        cond = model.conditioning([prompts[i] for i in idx])
        negative = model.conditioning([""] * len(idx))
        sync(device)
        t0 = time.perf_counter()
        out = sample(transformer, cond, steps=args.steps, shape=shape, seed=[seeds[i] for i in idx],
                     guidance_scale=args.guidance_scale, negative=negative)
        sync(device)
        seconds.append(time.perf_counter() - t0)
        clips.append(to_unit(out))
    return seconds, clips


def run_label(method: str, density: Optional[float]) -> str:
    return method if density is None else f"{method} @ {density:g}"


def plan_runs(args: argparse.Namespace) -> List[Tuple[Tuple[int, int, int], str, Optional[float]]]:
    """Per resolution: the default, the paper preset and the peers at every density first, then
    recall mode, then the ablations, so that a run cut by ``--max-minutes`` loses the least
    important ones."""
    runs = []
    core = [m for m in args.methods if m in CORE]
    ablations = [m for m in args.methods if m not in CORE and m != "recall0.9"]
    for shape in args.resolutions:
        runs += [(shape, m, d) for d in args.densities for m in core]
        if "recall0.9" in args.methods:
            runs.append((shape, "recall0.9", None))
        runs += [(shape, m, d) for d in args.densities for m in ablations]
    return runs


def estimate_seconds(args: argparse.Namespace, device: torch.device) -> Dict[str, Any]:
    """Dense-equivalent FLOPs of the plan and seconds at an assumed throughput (sparse runs are
    counted as dense: an upper bound for their sparse steps, a lower one for their searches)."""
    per_res, total = {}, 0.0
    runs = plan_runs(args)
    for shape in args.resolutions:
        fw = forward_flops(frames=shape[0], height=shape[1], width=shape[2])
        n_runs = 1 + sum(1 for r in runs if r[0] == shape)
        calls = (2 if args.guidance_scale > 1 else 1) * args.steps * args.pairs
        flops = fw["total"] * calls * n_runs
        per_res[shape_name(shape)] = {"video_tokens": int(fw["tokens"]), "runs": n_runs,
                                      "model_calls_per_run": calls // args.batch,
                                      "pflop": round(flops / 1e15, 4)}
        total += flops
    tflops = ASSUMED_TFLOPS[device.type]
    return {"per_resolution": per_res, "pflop": round(total / 1e15, 4),
            "assumed_tflops": tflops, "seconds": round(total / (tflops * 1e12), 1)}


# ----------------------------------------------------------------------------- outputs
def summary_rows(results: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per (resolution, density, method) that ran: mean PSNR and SSIM against dense, the
    achieved density and recall (means over layers, heads, clips, branches and search steps), and
    the PSNR difference to ``window``, ``pooled`` and ``default`` at the same density with its 95%
    paired bootstrap interval (``None`` where that one did not run; recall mode has no
    density)."""
    done = {(r["resolution"], r["method"], r["density"]): r for r in results
            if not r.get("skipped")}
    rows = []
    for (res, method, density), r in done.items():
        row = {"resolution": res, "density": density, "method": method, "pairs": len(r["psnr"]),
               "psnr": r["psnr_mean"], "ssim": r["ssim_mean"],
               "density_achieved": r["density_mean"], "recall": r["recall_mean"]}
        for peer in PEERS + ("default",):
            other = done.get((res, peer, density)) if density is not None else None
            diff, ci = paired_difference(r["psnr"], other["psnr"]) if other else (None, None)
            row[f"vs_{peer}_db"], row[f"vs_{peer}_ci95"] = diff, ci
        rows.append(row)
    return rows


def markdown_table(rows: List[Dict[str, Any]]) -> str:
    head = ("| resolution | method | target density | PSNR dB | SSIM | recall | density achieved "
            "| vs window dB [95% CI] | vs pooled dB [95% CI] | vs default dB [95% CI] |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['resolution']} | {r['method']} | {_fmt(r['density'])} | "
                     f"{r['psnr']:.2f} | {r['ssim']:.4f} | {_num(r['recall'])} | "
                     f"{_num(r['density_achieved'])} | {_vs(r, 'window')} | {_vs(r, 'pooled')} | "
                     f"{_vs(r, 'default')} |")
    return "\n".join(lines)


def _fmt(density: Optional[float]) -> str:
    return "auto (recall mode)" if density is None else f"{density:g}"


def _num(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def _vs(row: Dict[str, Any], peer: str) -> str:
    diff, ci = row[f"vs_{peer}_db"], row[f"vs_{peer}_ci95"]
    return "-" if diff is None else f"{diff:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]"


def check_goals(results: List[Dict[str, Any]], rows: List[Dict[str, Any]],
                args: argparse.Namespace) -> List[Dict[str, Any]]:
    done = {(r["resolution"], r["method"], r["density"]): r for r in results
            if not r.get("skipped")}
    by_row = {(r["resolution"], r["method"], r["density"]): r for r in rows}
    goals = []
    for shape in args.resolutions:
        res = shape_name(shape)
        for density in args.densities:
            ours = by_row.get((res, "default", density))
            for peer in PEERS:
                goal = f"{res} density {density:g}: default beats {peer} by >= 1 dB PSNR"
                if ours is None or ours[f"vs_{peer}_db"] is None:
                    goals.append({"goal": goal, "status": "not run"})
                    continue
                gap, ci = ours[f"vs_{peer}_db"], ours[f"vs_{peer}_ci95"]
                goals.append({"goal": goal, "value": gap, "ci95": ci,
                              "detail": f"{gap:+.2f} dB, 95% CI [{ci[0]:+.2f}, {ci[1]:+.2f}]",
                              "status": "met" if gap >= 1.0 else "missed"})
        goals.append(_fp8_goal(by_row.get((res, "fp8", 0.2)), res))
        goals.append(_recall_goal(done.get((res, "default", 0.2)),
                                  f"{res}: default recall >= 0.9 at density 0.2 (every search "
                                  "step)", lambda v: min(v) >= 0.9))
        goals.append(_recall_goal(done.get((res, "recall0.9", None)),
                                  f"{res}: recall mode lands within +-0.01 of its target "
                                  f"{RECALL_TARGET:g} at the search steps",
                                  lambda v: all(abs(x - RECALL_TARGET) <= 0.01 for x in v)))
    return goals


def _fp8_goal(row: Optional[Dict[str, Any]], res: str) -> Dict[str, Any]:
    """FP8 sparse steps lose at most 0.5 dB PSNR against bf16 (``default``) at density 0.2."""
    goal = f"{res} density 0.2: fp8 within 0.5 dB PSNR of default (bf16)"
    if row is None or row["vs_default_db"] is None:
        return {"goal": goal, "status": "not run"}
    gap, ci = row["vs_default_db"], row["vs_default_ci95"]
    return {"goal": goal, "value": gap, "ci95": ci,
            "detail": f"{gap:+.2f} dB, 95% CI [{ci[0]:+.2f}, {ci[1]:+.2f}]",
            "status": "met" if gap >= -0.5 else "missed"}


def _recall_goal(entry: Optional[Dict[str, Any]], goal: str, met) -> Dict[str, Any]:
    """A goal on the recall of one run at each search step."""
    if entry is None or not entry["search"]:
        return {"goal": goal, "status": "not run"}
    recalls = {s: v["recall"] for s, v in entry["search"].items()}
    return {"goal": goal, "value": recalls, "status": "met" if met(recalls.values()) else "missed"}


def plot(results: List[Dict[str, Any]], args: argparse.Namespace) -> Optional[str]:
    if importlib.util.find_spec("matplotlib") is None:
        say(f"matplotlib is not installed: no plot ({args.plot_png})")
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = [shape_name(s) for s in args.resolutions]
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 4.2), squeeze=False)
    for ax, res in zip(axes[0], shapes):
        for method in args.methods:
            pts = sorted((r["density_mean"], r["psnr_mean"]) for r in results
                         if r["resolution"] == res and r["method"] == method
                         and not r.get("skipped") and r["density_mean"] is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.set_title(f"{res} ({'QUICK, tiny model' if args.quick else f'{args.pairs} pairs'})")
        ax.set_xlabel("density achieved (mean over layers, heads, search steps)")
        ax.set_ylabel("PSNR vs dense (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(args.plot_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot_png, dpi=110)
    plt.close(fig)
    return args.plot_png


# ----------------------------------------------------------------------------- main
def run_method(model: FidelityModel, opts: Dict[str, Any], search: Tuple[int, ...],
               prompts: List[str], seeds: List[int], args: argparse.Namespace,
               shape: Tuple[int, int, int], device: torch.device,
               dense: torch.Tensor) -> Tuple[Dict[str, Any], torch.Tensor]:
    """Every pair generated under ``backend="adaspa"`` with ``opts``: the metrics against
    ``dense`` and the clips."""
    torch._dynamo.reset()
    compiled = torch.compile(model.transformer, backend=adaspa_backend_for_compile(),
                             options=opts, dynamic=False, fullgraph=True)
    probe = SearchProbe(compiled, search)
    t0 = time.perf_counter()
    seconds, clips = generate(probe, model, prompts, seeds, args, shape, device)
    wall = time.perf_counter() - t0
    out = torch.cat(clips)
    p, s = psnr(out, dense), ssim(out, dense)
    summary = summarise_search(probe.records)
    metrics = {
        "psnr": [round(float(v), 3) for v in p], "ssim": [round(float(v), 5) for v in s],
        "psnr_mean": round(float(p.mean()), 3), "ssim_mean": round(float(s.mean()), 5),
        "search": summary,
        "recall_mean": mean([v["recall"] for v in summary.values()]),
        "density_mean": mean([v["density"] for v in summary.values()]),
        "seconds": round(wall, 2), "seconds_per_batch": [round(x, 2) for x in seconds],
        "phases": next(iter(probe.phases.values()), {}),
    }
    if not summary:
        metrics["note"] = ("no search result was reported: every site stayed dense (see phases); "
                           "check min_seq_len")
    return metrics, out


class _SdpaCapture(torch.overrides.TorchFunctionMode):
    """Records the ``(q, k, v, attn_mask, scale)`` of every SDPA call while ``active()``."""

    def __init__(self, active):
        super().__init__()
        self.active, self.calls = active, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and self.active():
            named = dict(zip(("query", "key", "value", "attn_mask"), args), **kwargs)
            self.calls.append((named["query"], named["key"], named["value"],
                               named.get("attn_mask"), named.get("scale")))
        return func(*args, **kwargs)


def capture_attention(model: FidelityModel, prompt: str, seed: int, args: argparse.Namespace,
                      shape: Tuple[int, int, int], step: int) -> List[Tuple[Any, ...]]:
    """The self-attention inputs of the conditional model call at ``step`` of a dense
    generation of one pair."""
    calls_per_step = 2 if args.guidance_scale > 1 else 1
    count = {"calls": 0}
    hook = model.transformer.register_forward_pre_hook(
        lambda *_: count.__setitem__("calls", count["calls"] + 1))
    capture = _SdpaCapture(lambda: count["calls"] == step * calls_per_step + 1)
    try:
        with capture, torch.no_grad():
            sample(model.transformer, model.conditioning([prompt]), steps=step + 1, shape=shape,
                   seed=[seed], guidance_scale=args.guidance_scale,
                   negative=model.conditioning([""]))
    finally:
        hook.remove()
    return [c for c in capture.calls if c[0].shape == c[1].shape
            and c[0].shape[2] >= args.min_seq_len]


def fp8_attention_error(model: FidelityModel, prompt: str, seed: int,
                        args: argparse.Namespace, shape: Tuple[int, int, int],
                        search: Tuple[int, ...]) -> Dict[str, Any]:
    """Per call, the error of FP8 block-sparse attention against bf16 on the same mask (and of
    both against dense attention), on the model's own q, k, v at the first search step, with the
    masks the default selection picks at each density: means over the calls (layers)."""
    from adaspa_compile import ops
    from adaspa_compile.selection import BlockLayout, select_blocks

    calls = capture_attention(model, prompt, seed, args, shape, search[0])
    errors: Dict[str, Dict[str, List[float]]] = {}
    for q, k, v, attn_mask, scale in calls:
        B, _, L, D = q.shape
        scale = D ** -0.5 if scale is None else scale
        valid = ops.key_valid_from_mask(attn_mask, B, L)
        dense, _, mass = ops.fused_search(q, k, v, scale, args.block_size, valid)
        layout = BlockLayout(seq_len=L, block_size=args.block_size,
                             text_span=(L - MAX_TOKENS, L), key_valid=valid)
        for density in args.densities:
            cfg = AdaSpaConfig(sparsity=round(1.0 - density, 6), block_size=args.block_size)
            mask = select_blocks(mass, layout, cfg).mask
            bf16 = ops.sparse_forward(q, k, v, mask, scale, valid)
            fp8 = ops.sparse_forward(q, k, v, mask, scale, valid, "fp8")
            row = errors.setdefault(f"{density:g}", {"fp8_vs_bf16": [], "bf16_vs_dense": [],
                                                     "fp8_vs_dense": []})
            row["fp8_vs_bf16"].append(rel_err(fp8, bf16))
            row["bf16_vs_dense"].append(rel_err(bf16, dense))
            row["fp8_vs_dense"].append(rel_err(fp8, dense))
    return {"step": search[0], "calls": len(calls),
            "densities": {d: {key: mean(vals) for key, vals in row.items()}
                          for d, row in errors.items()}}


def sanity_check(model: FidelityModel, search: Tuple[int, ...], prompts: List[str],
                 seeds: List[int], args: argparse.Namespace, shape: Tuple[int, int, int],
                 device: torch.device, dense: torch.Tensor) -> Dict[str, Any]:
    """Sparsity 0 keeps every block: the clips must equal the dense ones (PSNR >= 60 dB)."""
    opts = method_options("default", 1.0, args, shape, search)
    metrics, _ = run_method(model, opts, search, prompts, seeds, args, shape, device, dense)
    worst = min(metrics["psnr"])
    result = {"resolution": shape_name(shape), "method": "default", "density": 1.0,
              "psnr_min": worst, "threshold": SANITY_PSNR, "passed": worst >= SANITY_PSNR}
    say(f"sanity: sparsity 0 at {result['resolution']}: min PSNR {worst:.1f} dB against dense "
        f"({'ok' if result['passed'] else 'FAILED'}, needs >= {SANITY_PSNR:g})")
    return result


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True

    plan = estimate_seconds(args, device if not args.dry_run else torch.device("cuda"))
    if args.dry_run:
        say(json.dumps({"runs": [(shape_name(s), m, d) for s, m, d in plan_runs(args)],
                        "search_steps": search_steps_for(args.steps), **plan}, indent=1))
        return plan
    model, model_info = get_model(args, device)
    runs = plan_runs(args)
    search = search_steps_for(args.steps)
    prompts = random_captions(args.pairs, seed=PROMPT_SEED)
    seeds = list(range(args.pairs))
    say(f"plan: {args.pairs} pairs x {args.steps} steps (search steps {search}, CFG "
        f"{args.guidance_scale:g}), batch {args.batch}, block {args.block_size}, resolutions "
        + ", ".join(f"{shape_name(s)} ({v['video_tokens']} video tokens, {v['runs']} runs)"
                    for s, v in zip(args.resolutions, plan["per_resolution"].values()))
        + f"; densities {args.densities}; methods {args.methods}; device {device}")
    say(f"plan: {len(runs) + len(args.resolutions)} generations of all pairs, "
        f"{plan['pflop']} PFLOP dense-equivalent: about {plan['seconds'] / 60:.1f} min at an "
        f"assumed {plan['assumed_tflops']:g} TFLOP/s, plus one Dynamo trace per run; "
        f"budget --max-minutes {args.max_minutes:g}")
    if not args.quick and device.type != "cuda":
        say("warning: the full run is meant for a CUDA GPU; on a CPU it takes hours")

    report: Dict[str, Any] = {
        "quick": args.quick,
        "model": model_info,
        "environment": environment(device),
        "settings": {"pairs": args.pairs, "steps": args.steps, "search_steps": list(search),
                     "resolutions": [shape_name(s) for s in args.resolutions],
                     "densities": args.densities, "methods": args.methods,
                     "recall_target": RECALL_TARGET, "batch": args.batch,
                     "guidance_scale": args.guidance_scale, "block_size": args.block_size,
                     "min_seq_len": args.min_seq_len, "inner_backend": args.inner_backend,
                     "scheduler": "FlowMatchEulerDiscreteScheduler (default_shift)",
                     "dense_reference": "the same model, eager (uncompiled)",
                     "prompt_seed": PROMPT_SEED, "noise_seeds": seeds},
        "prompts": prompts,
        "plan": plan,
        "dense": {},
        "results": [],
    }
    if args.quick:
        report["warning"] = ("QUICK run with a tiny stand-in model: the numbers test the harness, "
                             "not AdaSpa")

    def write() -> None:
        for path, data in ((args.out_json, report),
                           (args.summary_json, summary_rows(report["results"]))):
            write_json(data, Path(path))

    strip_shape = args.resolutions[-1]
    strip_rows: List[Tuple[str, torch.Tensor]] = []
    deadline = t_start + args.max_minutes * 60.0
    ran: Dict[Tuple[str, AdaSpaConfig], Dict[str, Any]] = {}  # the run of each option set
    for shape in args.resolutions:
        res = shape_name(shape)
        say(f"\n== {res}: token grid {token_grid(shape)}, dense reference (eager)")
        seconds, dense_clips = generate(model.transformer, model, prompts, seeds, args, shape,
                                        device)
        dense = torch.cat(dense_clips)
        report["dense"][res] = {"seconds": round(sum(seconds), 2),
                                "seconds_per_batch": [round(s, 2) for s in seconds]}
        say(f"dense {res}: {sum(seconds):.1f} s ({len(seconds)} batches)")
        if shape == strip_shape:
            strip_rows.append((f"dense {res}: {prompts[0]}", dense[0] * 2 - 1))
        if "fp8" in args.methods:
            report.setdefault("attention_error", {})[res] = fp8_attention_error(
                model, prompts[0], seeds[0], args, shape, search)
            say(f"{res} per-call attention error, FP8 against bf16 on the same mask: "
                + json.dumps(report["attention_error"][res]["densities"]))
        if args.quick and shape == args.resolutions[0]:
            report["sanity"] = sanity_check(model, search, prompts, seeds, args, shape, device,
                                            dense)
        write()
        per_run = sum(seconds)
        for shape_r, method, density in runs:
            if shape_r != shape:
                continue
            label = run_label(method, density)
            entry: Dict[str, Any] = {"resolution": res, "method": method, "density": density}
            opts = method_options(method, density, args, shape, search)
            entry["options"] = {k: (list(v) if isinstance(v, tuple) else v)
                                for k, v in opts.items()}
            key = (res, AdaSpaConfig.from_options(opts))
            remaining = deadline - time.perf_counter()
            if key in ran:
                same = ran[key]
                entry.update({k: v for k, v in same.items() if k not in entry},
                             same_as=run_label(same["method"], same["density"]))
                say(f"{res} {label}: the options of {entry['same_as']}, its clips reused")
            elif remaining < per_run * 1.1:
                entry["skipped"] = (f"time budget: {remaining:.0f} s left, a run takes about "
                                    f"{per_run:.0f} s")
                say(f"skip {res} {label}: {entry['skipped']}")
            else:
                metrics, out = run_method(model, opts, search, prompts, seeds, args, shape,
                                          device, dense)
                entry.update(metrics)
                ran[key] = entry
                # A run costs about the dense run plus its trace; re-plan from the longest seen.
                per_run = max(per_run, metrics["seconds"])
                say_run(entry, label, t_start)
                if shape == strip_shape and method in STRIP_METHODS \
                        and density == args.densities[0]:
                    strip_rows.append((f"{label}: PSNR {entry['psnr'][0]:.2f} dB, SSIM "
                                       f"{entry['ssim'][0]:.3f}", out[0] * 2 - 1))
            report["results"].append(entry)
            write()
        torch._dynamo.reset()

    finish(report, strip_rows, strip_shape, args, t_start)
    write()
    say(f"\nwrote {args.out_json}, {args.summary_json}, {args.strip_png}"
        + (f", {report['plot_png']}" if report["plot_png"] else "")
        + f" in {report['seconds_total']:.0f} s")
    if not report.get("sanity", {"passed": True})["passed"]:
        raise SystemExit("sanity check failed: sparsity 0 does not reproduce the dense clips")
    return report


def say_run(entry: Dict[str, Any], label: str, t_start: float) -> None:
    steps = entry["search"].values()
    rec = " / ".join(f"{v['recall']:.3f}" for v in steps) or "-"
    den = " / ".join(f"{v['density']:.3f}" for v in steps) or "-"
    say(f"{entry['resolution']} {label:28s} PSNR {entry['psnr_mean']:6.2f} dB  SSIM "
        f"{entry['ssim_mean']:.4f}  recall {rec}  density {den}  {entry['seconds']:.1f} s  "
        f"[{time.perf_counter() - t_start:.0f} s total]")


def finish(report: Dict[str, Any], strip_rows: List[Tuple[str, torch.Tensor]],
           strip_shape: Tuple[int, int, int], args: argparse.Namespace, t_start: float) -> None:
    """The goals, the table, the frame strip and the plot, printed and added to ``report``."""
    rows = summary_rows(report["results"])
    report["goals"] = check_goals(report["results"], rows, args)
    report["seconds_total"] = round(time.perf_counter() - t_start, 1)
    table = markdown_table(rows)
    report["table_markdown"] = table
    say("\n" + ("QUICK run, tiny stand-in model: NOT a fidelity measurement\n" if args.quick
                else "") + table)
    say("\nrecall / density: means over layers, heads, clips, CFG branches and the search steps "
        f"{report['settings']['search_steps']}; vs window / pooled: mean PSNR difference over "
        "the same (prompt, seed) pairs, 95% paired-bootstrap interval")
    say("\ngoals:" + (" [QUICK: tiny model, not meaningful]" if args.quick else ""))
    for g in report["goals"]:
        detail = g.get("detail") or (json.dumps(g["value"]) if "value" in g else "")
        say(f"  {g['status']:>7}: {g['goal']}" + (f"  ({detail})" if detail else ""))
    if strip_rows:
        frame_strip(strip_rows, args.strip_png, frames=min(8, strip_shape[0]))
        report["strip_png"] = args.strip_png
        export(args.strip_png)
    report["plot_png"] = plot(report["results"], args)
    if report["plot_png"]:
        export(report["plot_png"])


if __name__ == "__main__":
    main()
