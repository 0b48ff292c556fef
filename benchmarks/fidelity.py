"""Fidelity of AdaSpa against peer selectors at equal density (issue 4, section 3).

    python benchmarks/fidelity.py                      # full run, one H100, about 8 minutes
    python benchmarks/fidelity.py --quick              # CPU smoke run of the whole flow, < 1 min
    python benchmarks/fidelity.py --pairs 16 --steps 30 --resolutions 16x64x64   # cut down

Loads the trained fidelity model (``adaspa_compile/fidelity/weights/``, or ``--weights``), samples
(prompt, seed) pairs with 50-step flow matching (``adaspa_compile.fidelity.sample``, diffusers'
``FlowMatchEulerDiscreteScheduler``, true CFG) at two resolutions, densely (the eager model) and
under ``backend="adaspa"`` with each method at densities 0.2 and 0.1:

- ``adaspa``: the default selector (exact block mass, head-adaptive, LSE cache);
- ``adaspa-no-head-adaptive``, ``adaspa-no-lse-cache`` (fused search at every search step),
  ``adaspa-shared-cfg`` (``share_cfg_mask=True``: the uncond branch uses the cond branch's mask);
- ``adaspa-recall``: ``mode="recall"`` (its density is what the target recall needs, so it runs
  once per resolution);
- ``window``: static 3D local window on the latent token grid; ``pooled``: mean-pooled q.k.

Every compiled run uses ``inner_backend="eager"`` (``--inner-backend``), so the only difference
from the dense reference is the attention. Search steps scale with the step count as the paper's
zero-based 9 and 29 of 50. Metrics against the dense clip of the same (prompt, seed): PSNR and SSIM
(Gaussian window 11, sigma 1.5) on the final frames in [0, 1]; attention recall and density per
layer at each search step (``adaspa_compile.report()``, both CFG branches); wall time.

Writes ``benchmarks/results/fidelity.json`` (``--quick``: ``fidelity_quick.json``), prints a
markdown table and the issue's goals (met / missed), and writes a PSNR-vs-density plot and a frame
strip (dense, adaspa, window, pooled) as PNGs; everything is also copied into ``$OUT`` when set.
``--max-minutes`` stops launching runs that would not finish in time (they are listed as skipped),
so one device call always returns results.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

import adaspa_compile
from adaspa_compile.schedule import scaled_search_steps as search_steps_for
from adaspa_compile.fidelity import (FIDELITY_CONFIG, WEIGHTS_DIR, FidelityModel,
                                     build_model, default_shift, forward_flops, load_model,
                                     make_batch, random_captions, sample, shift_sigmas)
from train_fidelity_model import adaspa_backend_for_compile, frame_strip

PROMPT_SEED = 10**12 + 4  # held-out captions: training clips use seeds below 10**10
PAPER_STEPS = 50
METHODS = ("adaspa", "window", "pooled", "adaspa-no-head-adaptive", "adaspa-no-lse-cache",
           "adaspa-shared-cfg", "adaspa-recall")
STRIP_METHODS = ("adaspa", "window", "pooled")
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
    p.add_argument("--recall-target", type=float, default=0.9, help="target of adaspa-recall")
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
    results = ROOT / "benchmarks" / "results"
    args.out_json = args.out_json or str(results / f"fidelity{suffix}.json")
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


def export(path: str) -> None:
    """Copy a result file into ``$OUT`` when it is set."""
    out = os.environ.get("OUT")
    if out and os.path.isfile(path):
        shutil.copy2(path, Path(out) / Path(path).name)


def shape_name(shape: Tuple[int, int, int]) -> str:
    return "x".join(map(str, shape))


def token_grid(shape: Tuple[int, int, int]) -> Tuple[int, int, int]:
    p, pt = FIDELITY_CONFIG["patch_size"], FIDELITY_CONFIG["patch_size_t"]
    return shape[0] // pt, shape[1] // p, shape[2] // p


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    """Per clip PSNR (dB) of ``[N, 3, F, H, W]`` frames in [0, 1]; capped at 100 dB (identical)."""
    mse = (x - ref).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp(min=1e-10))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-r * r / (2 * sigma * sigma))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()


def ssim(x: torch.Tensor, ref: torch.Tensor, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per clip SSIM (Wang et al. 2004) of ``[N, 3, F, H, W]`` frames in [0, 1]: Gaussian window
    ``size`` / ``sigma``, valid filtering, ``C1 = 0.01^2``, ``C2 = 0.03^2``; the mean over
    channels, frames and positions."""
    n, c, f, h, w = x.shape
    if min(h, w) < size:
        raise ValueError(f"SSIM needs frames of at least {size} pixels, got {h} x {w}")
    win = gaussian_window(size, sigma).to(x)[None, None]
    a = x.permute(0, 2, 1, 3, 4).reshape(n * f * c, 1, h, w)
    b = ref.permute(0, 2, 1, 3, 4).reshape(n * f * c, 1, h, w)
    mu_a, mu_b = F.conv2d(a, win), F.conv2d(b, win)
    var_a = F.conv2d(a * a, win) - mu_a * mu_a
    var_b = F.conv2d(b * b, win) - mu_b * mu_b
    cov = F.conv2d(a * b, win) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1)
                                                      * (var_a + var_b + c2))
    return s.reshape(n, -1).mean(1)


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


def mean(values: Sequence[float]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


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
    opts: Dict[str, Any] = {"search_steps": search, "block_size": args.block_size,
                            "min_seq_len": args.min_seq_len, "inner_backend": args.inner_backend}
    if density is not None:
        opts["sparsity"] = round(1.0 - density, 6)
    if method == "adaspa-no-head-adaptive":
        opts["head_adaptive"] = False
    elif method == "adaspa-no-lse-cache":
        opts["lse_cache"] = False
    elif method == "adaspa-shared-cfg":
        opts["share_cfg_mask"] = True
    elif method == "adaspa-recall":
        opts.update(mode="recall", recall=args.recall_target)
    elif method == "window":
        opts.update(selector="window", video_grid=token_grid(shape))
    elif method == "pooled":
        opts["selector"] = "pooled"
    return opts


def generate(transformer, model: FidelityModel, prompts: List[str], seeds: List[int],
             args: argparse.Namespace, shape: Tuple[int, int, int], device: torch.device,
             on_batch=None) -> Tuple[List[float], List[torch.Tensor]]:
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
        if on_batch is not None:
            on_batch(len(clips))
    return seconds, clips


def run_label(method: str, density: Optional[float]) -> str:
    return method if density is None else f"{method} @ {density:g}"


def plan_runs(args: argparse.Namespace) -> List[Tuple[Tuple[int, int, int], str, Optional[float]]]:
    """Per resolution: the compared selectors at every density first, then recall mode, then the
    ablations, so that a run cut by ``--max-minutes`` loses the least important ones."""
    runs = []
    core = [m for m in args.methods if m in STRIP_METHODS]
    ablations = [m for m in args.methods if m not in STRIP_METHODS and m != "adaspa-recall"]
    for shape in args.resolutions:
        runs += [(shape, m, d) for d in args.densities for m in core]
        if "adaspa-recall" in args.methods:
            runs.append((shape, "adaspa-recall", None))
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
def markdown_table(results: List[Dict[str, Any]], dense: Dict[str, Any]) -> str:
    head = ("| resolution | method | target density | PSNR dB | SSIM | recall (search steps) "
            "| density achieved | wall s |")
    lines = [head, "|" + "---|" * 8]
    for name, d in dense.items():
        lines.append(f"| {name} | dense | 1 | - | - | - | 1 | {d['seconds']:.1f} |")
    for r in results:
        if r.get("skipped"):
            lines.append(f"| {r['resolution']} | {r['method']} | {_fmt(r['density'])} | skipped: "
                         f"{r['skipped']} | | | | |")
            continue
        steps = r["search"]
        recall = " / ".join(f"{v['recall']:.3f}" for v in steps.values()) or "-"
        dens = " / ".join(f"{v['density']:.3f}" for v in steps.values()) or "-"
        lines.append(f"| {r['resolution']} | {r['method']} | {_fmt(r['density'])} | "
                     f"{r['psnr_mean']:.2f} | {r['ssim_mean']:.4f} | {recall} | {dens} | "
                     f"{r['seconds']:.1f} |")
    return "\n".join(lines)


def _fmt(density: Optional[float]) -> str:
    return "auto (recall mode)" if density is None else f"{density:g}"


def check_goals(results: List[Dict[str, Any]], args: argparse.Namespace) -> List[Dict[str, Any]]:
    done = {(r["resolution"], r["method"], r["density"]): r for r in results
            if not r.get("skipped")}
    goals = []
    for shape in args.resolutions:
        res = shape_name(shape)
        for density in args.densities:
            ours = done.get((res, "adaspa", density))
            for peer in ("window", "pooled"):
                other = done.get((res, peer, density))
                goal = f"{res} density {density:g}: adaspa beats {peer} by >= 1 dB PSNR"
                if ours is None or other is None:
                    goals.append({"goal": goal, "status": "not run"})
                    continue
                gap = ours["psnr_mean"] - other["psnr_mean"]
                goals.append({"goal": goal, "value": round(gap, 3),
                              "detail": f"{ours['psnr_mean']:.2f} vs {other['psnr_mean']:.2f} dB",
                              "status": "met" if gap >= 1.0 else "missed"})
        ours = done.get((res, "adaspa", 0.2))
        goal = f"{res}: adaspa recall >= 0.9 at density 0.2 (every search step)"
        if ours is None or not ours["search"]:
            goals.append({"goal": goal, "status": "not run"})
        else:
            recalls = {s: v["recall"] for s, v in ours["search"].items()}
            goals.append({"goal": goal, "value": recalls,
                          "status": "met" if min(recalls.values()) >= 0.9 else "missed"})
        rec = done.get((res, "adaspa-recall", None))
        goal = (f"{res}: recall mode lands within +-0.01 of its target {args.recall_target:g} "
                "at the search steps")
        if rec is None or not rec["search"]:
            goals.append({"goal": goal, "status": "not run"})
        else:
            recalls = {s: v["recall"] for s, v in rec["search"].items()}
            ok = all(abs(v - args.recall_target) <= 0.01 for v in recalls.values())
            goals.append({"goal": goal, "value": recalls, "status": "met" if ok else "missed"})
    return goals


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
def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    import diffusers

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
        "environment": {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
                        else (platform.processor() or "cpu"), "torch": torch.__version__,
                        "diffusers": diffusers.__version__, "python": platform.python_version()},
        "settings": {"pairs": args.pairs, "steps": args.steps, "search_steps": list(search),
                     "resolutions": [shape_name(s) for s in args.resolutions],
                     "densities": args.densities, "methods": args.methods,
                     "recall_target": args.recall_target, "batch": args.batch,
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
        Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out_json, "w") as f:
            json.dump(report, f, indent=1)
        export(args.out_json)

    strip_shape = args.resolutions[-1]
    strip_rows: List[Tuple[str, torch.Tensor]] = []
    deadline = t_start + args.max_minutes * 60.0
    backend = adaspa_backend_for_compile()
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
        write()
        per_run = sum(seconds)
        for shape_r, method, density in runs:
            if shape_r != shape:
                continue
            label = run_label(method, density)
            entry: Dict[str, Any] = {"resolution": res, "method": method, "density": density}
            remaining = deadline - time.perf_counter()
            if remaining < per_run * 1.1:
                entry["skipped"] = (f"time budget: {remaining:.0f} s left, a run takes about "
                                    f"{per_run:.0f} s")
                say(f"skip {res} {label}: {entry['skipped']}")
                report["results"].append(entry)
                write()
                continue
            opts = method_options(method, density, args, shape, search)
            entry["options"] = {k: (list(v) if isinstance(v, tuple) else v)
                                for k, v in opts.items()}
            torch._dynamo.reset()
            compiled = torch.compile(model.transformer, backend=backend, options=opts,
                                     dynamic=False, fullgraph=True)
            probe = SearchProbe(compiled, search)
            t0 = time.perf_counter()
            seconds, clips = generate(probe, model, prompts, seeds, args, shape, device)
            wall = time.perf_counter() - t0
            out = torch.cat(clips)
            p, s = psnr(out, dense), ssim(out, dense)
            summary = summarise_search(probe.records)
            entry.update({
                "psnr": [round(float(v), 3) for v in p], "ssim": [round(float(v), 5) for v in s],
                "psnr_mean": round(float(p.mean()), 3), "ssim_mean": round(float(s.mean()), 5),
                "search": summary,
                "recall_mean": mean([v["recall"] for v in summary.values()]),
                "density_mean": mean([v["density"] for v in summary.values()]),
                "seconds": round(wall, 2), "seconds_per_batch": [round(x, 2) for x in seconds],
                "phases": next(iter(probe.phases.values()), {}),
            })
            if not summary:
                entry["note"] = ("no search result was reported: every site stayed dense (see "
                                 "phases); check min_seq_len")
            report["results"].append(entry)
            # A run costs about the dense run plus its trace; re-plan from the longest seen.
            per_run = max(per_run, wall)
            rec = " / ".join(f"{v['recall']:.3f}" for v in summary.values()) or "-"
            den = " / ".join(f"{v['density']:.3f}" for v in summary.values()) or "-"
            say(f"{res} {label:28s} PSNR {entry['psnr_mean']:6.2f} dB  SSIM "
                f"{entry['ssim_mean']:.4f}  recall {rec}  density {den}  {wall:.1f} s  "
                f"[{time.perf_counter() - t_start:.0f} s total]")
            if shape == strip_shape and method in STRIP_METHODS and density == args.densities[0]:
                strip_rows.append((f"{label}: PSNR {float(p[0]):.2f} dB, SSIM {float(s[0]):.3f}",
                                   out[0] * 2 - 1))
            write()
            del compiled, probe
        torch._dynamo.reset()

    report["goals"] = check_goals(report["results"], args)
    report["seconds_total"] = round(time.perf_counter() - t_start, 1)
    table = markdown_table(report["results"], report["dense"])
    report["table_markdown"] = table
    say("\n" + ("QUICK run, tiny stand-in model: NOT a fidelity measurement\n" if args.quick
                else "") + table)
    say("\nrecall / density columns: mean over layers, heads, clips and CFG branches at each "
        f"search step {search}, in order")
    say("\ngoals (issue 4):" + (" [QUICK: tiny model, not meaningful]" if args.quick else ""))
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
    write()
    say(f"\nwrote {args.out_json}, {args.strip_png}"
        + (f", {report['plot_png']}" if report["plot_png"] else "")
        + f" in {report['seconds_total']:.0f} s")
    return report


if __name__ == "__main__":
    main()
