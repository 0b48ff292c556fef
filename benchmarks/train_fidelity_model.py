"""Train the fidelity model of issue 4: flow matching on procedural clips, one H100, ~8 minutes.

    python benchmarks/train_fidelity_model.py --minutes 8 --out adaspa_compile/fidelity/weights
    python benchmarks/train_fidelity_model.py --quick      # CPU smoke run of the whole flow

The model is :data:`adaspa_compile.fidelity.FIDELITY_CONFIG` (diffusers
``HunyuanVideoTransformer3DModel``, 7.2 M parameters) on 4 x 4-patchified pixels: 16 x 64 x 64
clips (4,096 video tokens + 16 caption tokens), and every 5th step a batch of 16 x 128 x 128
clips (16,384 tokens) so that a 4x longer sequence is in distribution. bf16 autocast, AdamW,
linear warmup then cosine decay, an EMA of the weights, 10% caption dropout for classifier-free
guidance. Data, initialisation, noise and the step plan are seeded; ``--minutes`` bounds the
training loop, which plans its step count from the first 40 steps and prints it, so
``--steps N`` repeats a run's plan exactly.

After training it writes, in this order (also into ``$OUT`` when set, so that the device tool
returns them): the weights (``save_pretrained``, bf16 safetensors, <= 15 MB, checked), a frame
strip of data clips next to samples of the same captions (``docs/fidelity_samples.png``), the
JSON report (losses, throughput, attention recall of the top-20% blocks of the trained and of the
untrained model, from the backend's exact fused search; ``benchmarks/results/fidelity_model.json``)
and a picture of one site's block masks (``docs/fidelity_masks.png``). The log goes to stdout and
``$OUT/train_log.txt``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

# The base and hires steps alternate two activation shapes; without expandable segments the
# first H100 run (2026-11-27) ran out of memory at step ~2500 of 2597 with 15 GB reserved but
# unallocated. Must be set before CUDA is initialised.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

import adaspa_compile
from adaspa_compile.fidelity import (FIDELITY_CONFIG, Conditioning, FidelityModel,
                                     build_model, default_shift, forward_flops, load_model,
                                     make_batch, sample, save_model, shift_sigmas, to_uint8)

from _common import adaspa_backend_for_compile, environment, export, sync, write_json

WEIGHTS_LIMIT_BYTES = 15_000_000
EVAL_SEED = 10**12  # training clips use seeds below 10**10
RECALL_SIGMAS = (0.8, 0.5, 0.2)
VAL_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)
RECALL_OPTIONS = {"search_steps": (0,), "sparsity": 0.8, "head_budget": "uniform",
                  "min_seq_len": 256, "inner_backend": "eager"}
CALIBRATE = (10, 40)  # steps timed to plan the run: after warm-up, before the plan


# ----------------------------------------------------------------------------- setup
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--minutes", type=float, default=8.0,
                   help="wall-clock limit of the training loop")
    p.add_argument("--steps", type=int, default=None,
                   help="train exactly this many steps (default: as many as fit in --minutes)")
    p.add_argument("--out", default=str(ROOT / "adaspa_compile/fidelity/weights"),
                   help="folder for the weights")
    p.add_argument("--samples-png", default=str(ROOT / "docs/fidelity_samples.png"))
    p.add_argument("--masks-png", default=str(ROOT / "docs/fidelity_masks.png"))
    p.add_argument("--report-json", default=str(ROOT / "benchmarks/results/fidelity_model.json"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=32, help="clips per step at --shape")
    p.add_argument("--shape", default="16x64x64", help="frames x height x width of most steps")
    p.add_argument("--hires-shape", default="16x128x128",
                   help="shape of one step in --hires-every")
    p.add_argument("--hires-every", type=int, default=5, help="0: never")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=200, help="linear warmup steps")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the weights")
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=4.0)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-clips", type=int, default=8)
    p.add_argument("--compile", action="store_true",
                   help="train through torch.compile (inductor); eager SDPA otherwise")
    p.add_argument("--sdpa", choices=("auto", "cudnn", "efficient"), default="auto",
                   help="SDPA kernel for training (the model passes a key-padding mask, so flash "
                        "is never eligible)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke run: tiny clips, 8 steps, everything written to a temp dir")
    args = p.parse_args(argv)
    if args.quick:
        tmp = Path(tempfile.mkdtemp(prefix="fidelity_quick_"))
        args.device = args.device or "cpu"
        args.out, args.samples_png = str(tmp / "weights"), str(tmp / "fidelity_samples.png")
        args.masks_png = str(tmp / "fidelity_masks.png")
        args.report_json = str(tmp / "fidelity_model.json")
        args.shape, args.hires_shape, args.hires_every = "4x32x32", "4x48x48", 3
        args.batch, args.steps, args.warmup = 2, args.steps or 8, 2
        args.minutes = min(args.minutes, 3.0)
        args.sample_steps, args.log_every, args.eval_clips = 6, 2, 2
    args.shape, args.hires_shape = parse_shape(args.shape), parse_shape(args.hires_shape)
    return args


def parse_shape(text: str) -> Tuple[int, int, int]:
    try:
        frames, height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"a shape is FRAMESxHEIGHTxWIDTH, e.g. 16x64x64; got {text!r}") from None
    p = FIDELITY_CONFIG["patch_size"]
    if height % p or width % p:
        raise SystemExit(f"height and width must be multiples of the patch size {p}: {text!r}")
    return frames, height, width


class Log:
    """Print and append to ``$OUT/train_log.txt`` as it goes, so a killed run still leaves a log."""

    def __init__(self) -> None:
        out = os.environ.get("OUT")
        self.path = Path(out) / "train_log.txt" if out else None

    def __call__(self, message: str) -> None:
        print(message, flush=True)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(message + "\n")


def sdpa_context(choice: str):
    from contextlib import nullcontext

    if choice == "auto":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"cudnn": SDPBackend.CUDNN_ATTENTION,
                        "efficient": SDPBackend.EFFICIENT_ATTENTION}[choice])


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# ----------------------------------------------------------------------------- measurements
def flow_batch(clips: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor):
    """Noisy input, timestep and velocity target of flow matching (diffusers' convention)."""
    s = sigma.view(-1, 1, 1, 1, 1)
    return (1 - s) * clips + s * noise, sigma * 1000.0, noise - clips


@torch.no_grad()
def validation_loss(transformer: torch.nn.Module, clips: torch.Tensor, cond: Conditioning,
                    device: torch.device) -> Dict[str, Any]:
    """Flow-matching MSE on fixed clips and noise at fixed noise levels (deterministic)."""
    was_training = transformer.training
    transformer.eval()
    dtype = next(transformer.parameters()).dtype
    noise = torch.randn(clips.shape, generator=torch.Generator().manual_seed(1)).to(device)
    per_sigma = []
    for value in VAL_SIGMAS:
        sigma = torch.full((clips.shape[0],), value, device=device)
        sigma = shift_sigmas(sigma, default_shift(*clips.shape[2:]))
        x, t, target = flow_batch(clips, noise, sigma)
        with autocast(device):
            pred = transformer(hidden_states=x.to(dtype), timestep=t, return_dict=False,
                               **cond.to(device, dtype).model_kwargs())[0]
        per_sigma.append(float(F.mse_loss(pred.float(), target)))
    transformer.train(was_training)
    return {"mean": sum(per_sigma) / len(per_sigma),
            "per_sigma": dict(zip([f"{s:g}" for s in VAL_SIGMAS], per_sigma))}


@torch.no_grad()
def attention_recall(transformer: torch.nn.Module, clips: torch.Tensor, cond: Conditioning,
                     device: torch.device, masks_png: Optional[str] = None) -> Dict[str, Any]:
    """Recall of the row-wise top-20% block masks at every self-attention site and head.

    The model runs under ``backend="adaspa"`` with its fused search at step 0, which computes the
    exact block mass of each site and the share of it that the chosen mask keeps (text blocks and
    the diagonal are always kept, outside the 20%). One fresh generation per noise level.
    """
    torch._dynamo.reset()
    dtype = next(transformer.parameters()).dtype
    compiled = torch.compile(transformer.eval(), backend=adaspa_backend_for_compile(),
                             options=RECALL_OPTIONS, fullgraph=True)
    noise = torch.randn(clips.shape, generator=torch.Generator().manual_seed(2)).to(device)
    kwargs = cond.to(device, dtype).model_kwargs()
    result: Dict[str, Any] = {}
    for value in RECALL_SIGMAS:
        adaspa_compile.reset()
        sigma = torch.full((clips.shape[0],), value, device=device)
        x, t, _ = flow_batch(clips, noise, sigma)
        compiled(hidden_states=x.to(dtype), timestep=t, return_dict=False, **kwargs)
        sites = {}
        for s in adaspa_compile.report(transformer).rewritten:
            heads = torch.tensor(s.recall).mean(0)  # mean over the batch
            sites[s.name] = {"recall": s.mean_recall(), "density": s.mean_density(),
                             "heads": [round(float(h), 4) for h in heads]}
        if not sites:
            raise RuntimeError("no attention site was rewritten:\n"
                               f"{adaspa_compile.report(transformer)}")
        result[f"{value:g}"] = {
            "recall": sum(v["recall"] for v in sites.values()) / len(sites),
            "density": sum(v["density"] for v in sites.values()) / len(sites),
            "min_head_recall": min(min(v["heads"]) for v in sites.values()),
            "sites": sites}
        if masks_png and value == 0.5:
            rewritten = adaspa_compile.report(transformer).rewritten
            adaspa_compile.plot_masks(site=rewritten[len(rewritten) // 2].site_id, path=masks_png,
                                      module=transformer)
    torch._dynamo.reset()
    return result


def eval_data(shape: Tuple[int, int, int], n: int, device: torch.device, model: FidelityModel):
    return make_batch(n, *shape, seed=EVAL_SEED, device=device, text_encoder=model.text_encoder)


# ----------------------------------------------------------------------------- training
def train(args: argparse.Namespace, model: FidelityModel, device: torch.device,
          log: Log) -> Dict[str, Any]:
    """The training loop; returns its record, with the EMA weights in ``record["ema_params"]``."""
    transformer = model.transformer.to(device).train()
    encoder = model.text_encoder.to(device)
    null = encoder([""])
    params = list(transformer.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01,
                            fused=device.type == "cuda")
    # Skips a step whose gradients are not finite, without a host sync (fused AdamW reads
    # found_inf on the device). The scale never grows and halves at each skip: skips = -log2(scale).
    scaler = torch.amp.GradScaler(device.type, init_scale=1.0, growth_factor=1.0001,
                                  backoff_factor=0.5, growth_interval=2**30)
    ema = [p.detach().clone() for p in params]
    gen = torch.Generator(device=device).manual_seed(args.seed)
    forward = torch.compile(transformer) if args.compile else transformer
    hires_batch = max(1, round(args.batch * (_seq(args.shape) / _seq(args.hires_shape)) ** 2))
    flops = {False: 3 * forward_flops(frames=args.shape[0], height=args.shape[1],
                                      width=args.shape[2])["total"] * args.batch,
             True: 3 * forward_flops(frames=args.hires_shape[0], height=args.hires_shape[1],
                                     width=args.hires_shape[2])["total"] * hires_batch}
    hires_text = (f", every {args.hires_every} steps one of {hires_batch} x {args.hires_shape} "
                  "(about equal attention FLOPs)" if args.hires_every else "")
    log(f"train: batch {args.batch} x {args.shape}{hires_text}; "
        f"{flops[False] / 1e12:.1f} / {flops[True] / 1e12:.1f} TFLOP per step (3x forward)")

    planned = args.steps
    deadline = time.perf_counter() + args.minutes * 60.0
    losses: Dict[bool, List[torch.Tensor]] = {False: [], True: []}
    curve, step, clips_seen, total_flops = [], 0, 0, 0.0
    t_start = t_log = time.perf_counter()
    flops_since_log, calib_start = 0.0, None
    while planned is None or step < planned:
        if time.perf_counter() >= deadline:
            log(f"train: time limit of {args.minutes:g} min reached at step {step}")
            break
        hires = bool(args.hires_every) and step % args.hires_every == args.hires_every - 1
        shape, batch = (args.hires_shape, hires_batch) if hires else (args.shape, args.batch)
        data = make_batch(batch, *shape, seed=args.seed * 1_000_003 + step, device=device,
                          text_encoder=encoder)
        cond = _drop_captions(data.cond, null, args.caption_dropout, gen)
        noise = torch.randn(data.pixels.shape, generator=gen, device=device)
        sigma = shift_sigmas(torch.sigmoid(torch.randn(batch, generator=gen, device=device)),
                             default_shift(*shape))
        x, t, target = flow_batch(data.pixels, noise, sigma)
        for group in opt.param_groups:
            group["lr"] = _lr(args, step, planned)
        try:
            loss = _loss_and_backward(forward, x, t, target, cond, opt, scaler, args.sdpa, device)
        except torch.OutOfMemoryError:
            # Keep what was learned: the EMA weights are intact, so stop and save them.
            log(f"train: CUDA out of memory at step {step} ({shape}); stopping early")
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            break
        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(opt)
        scaler.update()
        torch._foreach_lerp_(ema, [p.detach() for p in params],
                             1.0 - min(args.ema, (1.0 + step) / (10.0 + step)))
        losses[hires].append(loss.detach())
        step += 1
        clips_seen += batch
        total_flops += flops[hires]
        flops_since_log += flops[hires]

        if planned is None and step in CALIBRATE:
            sync(device)
            if step == CALIBRATE[0]:
                calib_start = time.perf_counter()
            else:
                per_step = (time.perf_counter() - calib_start) / (CALIBRATE[1] - CALIBRATE[0])
                planned = step + int(0.98 * (deadline - time.perf_counter()) / per_step)
                log(f"train: {per_step * 1e3:.1f} ms/step -> planned {planned} steps "
                    f"(repeat with --steps {planned})")
        if step % args.log_every == 0 or step == planned:
            sync(device)
            now = time.perf_counter()
            low, high = (_mean(losses[h][-args.log_every:]) for h in (False, True))
            if not math.isfinite(low) and losses[False]:
                log("train: warning: non-finite loss; steps with non-finite gradients are skipped")
            skipped = round(-math.log2(scaler.get_scale()))
            curve.append({"step": step, "loss": _finite(low), "hires_loss": _finite(high)})
            log(f"step {step:6d}/{planned or '?'}  loss {low:.4f}  hires {high:.4f}  "
                f"lr {_lr(args, step - 1, planned):.2e}  |g| {float(grad_norm):.3f}  "
                f"{flops_since_log / (now - t_log) / 1e12:6.1f} TFLOP/s  "
                f"{clips_seen / (now - t_start):6.1f} clips/s  {now - t_start:6.1f} s"
                + (f"  skipped {skipped}" if skipped else ""))
            t_log, flops_since_log = now, 0.0
    sync(device)
    seconds = time.perf_counter() - t_start
    record = {
        "steps": step, "planned_steps": planned, "seconds": round(seconds, 1),
        "clips_seen": clips_seen, "batch": args.batch, "hires_batch": hires_batch,
        "shape": list(args.shape), "hires_shape": list(args.hires_shape),
        "hires_every": args.hires_every, "lr": args.lr, "warmup": args.warmup, "ema": args.ema,
        "caption_dropout": args.caption_dropout, "compile": args.compile, "sdpa": args.sdpa,
        "skipped_steps": round(-math.log2(scaler.get_scale())),
        "final_loss": _finite(_mean(losses[False][-max(1, len(losses[False]) // 10):])),
        "final_hires_loss": _finite(_mean(losses[True][-max(1, len(losses[True]) // 10):])),
        "flops_per_step": {"base": flops[False], "hires": flops[True]},
        "achieved_tflops": round(total_flops / seconds / 1e12, 1),
        "clips_per_second": round(clips_seen / seconds, 1),
        "loss_curve": curve,
    }
    record["ema_params"] = ema
    return record


def _loss_and_backward(forward, x, t, target, cond: Conditioning, opt, scaler, sdpa: str,
                       device: torch.device) -> torch.Tensor:
    with sdpa_context(sdpa):
        with autocast(device):
            pred = forward(hidden_states=x, timestep=t, return_dict=False,
                           **cond.model_kwargs())[0]
        loss = F.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
    return loss


def _mean(values: List[torch.Tensor]) -> float:
    return torch.stack(values).mean().item() if values else math.nan


def _finite(x: float) -> Optional[float]:
    """``x``, or None where JSON has no number (NaN, inf)."""
    return x if math.isfinite(x) else None


def _seq(shape: Tuple[int, int, int]) -> int:
    return int(forward_flops(frames=shape[0], height=shape[1], width=shape[2])["tokens"])


def _lr(args: argparse.Namespace, step: int, planned: Optional[int]) -> float:
    """Linear warmup, then cosine from ``lr`` to ``lr / 10`` over the planned steps."""
    warm = min(1.0, (step + 1) / max(1, args.warmup))
    if planned is None:
        return args.lr * warm
    progress = min(1.0, step / max(1, planned))
    return args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _drop_captions(cond: Conditioning, null: Conditioning, p: float,
                   gen: torch.Generator) -> Conditioning:
    """Replace each caption by the empty one with probability ``p`` (classifier-free guidance)."""
    drop = torch.rand(len(cond), generator=gen, device=gen.device) < p
    return Conditioning(
        torch.where(drop[:, None, None], null.encoder_hidden_states, cond.encoder_hidden_states),
        torch.where(drop[:, None], null.encoder_attention_mask, cond.encoder_attention_mask),
        torch.where(drop[:, None], null.pooled_projections, cond.pooled_projections),
        cond.captions)


# ----------------------------------------------------------------------------- pictures
def frame_strip(rows: List[Tuple[str, torch.Tensor]], path: str, frames: int = 8,
                tile: int = 128) -> None:
    """A PNG with one labelled row of ``frames`` frames per ``(label, clip [3, F, H, W])``."""
    from PIL import Image, ImageDraw

    label_h, pad = 14, 4
    width = pad + frames * (tile + pad)
    img = Image.new("RGB", (width, len(rows) * (label_h + tile + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    y = pad
    for label, clip in rows:
        draw.text((pad, y), label, fill=(0, 0, 0))
        y += label_h
        pixels = to_uint8(clip)
        idx = torch.linspace(0, pixels.shape[1] - 1, frames).round().long()
        for i, f in enumerate(idx.tolist()):
            frame = Image.fromarray(pixels[:, f].permute(1, 2, 0).numpy())
            scale = tile / max(frame.size)
            frame = frame.resize((round(frame.size[0] * scale), round(frame.size[1] * scale)),
                                 Image.NEAREST)
            img.paste(frame, (pad + i * (tile + pad), y))
        y += tile + pad
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def samples_png(args: argparse.Namespace, model: FidelityModel, device: torch.device,
                log: Log) -> Dict[str, Any]:
    """Real clips next to samples of their captions, at the base shape (4) and the hires one (2)."""
    rows, info = [], {"steps": args.sample_steps, "guidance_scale": args.guidance_scale,
                      "scheduler": "FlowMatchEulerDiscreteScheduler", "clips": []}
    for shape, n in ((args.shape, 4), (args.hires_shape, 2)):
        real = make_batch(n, *shape, seed=EVAL_SEED + 1, device=device,
                          text_encoder=model.text_encoder)
        t0 = time.perf_counter()
        fake = sample(model.transformer, real.cond, steps=args.sample_steps, shape=shape, seed=0,
                      guidance_scale=args.guidance_scale, negative=model.conditioning([""] * n))
        sync(device)
        log(f"samples: {n} x {shape} in {time.perf_counter() - t0:.1f} s")
        name = "x".join(map(str, shape))
        for i, caption in enumerate(real.captions):
            rows.append((f"data {name}: {caption}", real.pixels[i]))
            rows.append((f"model, seed {i}, {args.sample_steps} steps, cfg {args.guidance_scale:g}",
                         fake[i]))
            info["clips"].append({"shape": list(shape), "caption": caption, "seed": i,
                                  "sample_mean_abs": round(float(fake[i].abs().mean()), 4)})
    frame_strip(rows, args.samples_png)
    return info


# ----------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    log = Log()
    t_script = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    if importlib.util.find_spec("matplotlib") is None:
        log(f"matplotlib is not installed: no mask picture ({args.masks_png})")
        args.masks_png = None
    model = build_model(seed=args.seed)
    n_params = sum(p.numel() for p in model.transformer.parameters())
    fw = forward_flops(frames=args.shape[0], height=args.shape[1], width=args.shape[2])
    report: Dict[str, Any] = {
        "model": {"class": type(model.transformer).__name__, "config": FIDELITY_CONFIG,
                  "parameters": n_params, "video_tokens": int(fw["tokens"]),
                  "hires_video_tokens": _seq(args.hires_shape),
                  "forward_gflops_per_clip": {"linear": fw["linear"] / 1e9,
                                              "attention": fw["attention"] / 1e9}},
        "environment": environment(device),
        "args": {k: (list(v) if isinstance(v, tuple) else _rel(v)) for k, v in vars(args).items()},
    }
    log(f"model: {n_params / 1e6:.2f} M parameters, {int(fw['tokens'])} video tokens per "
        f"{args.shape} clip; forward {fw['total'] / 1e9:.0f} GFLOP per clip "
        f"({fw['attention'] / fw['total']:.0%} attention); "
        f"device {report['environment']['device']}")

    def write_report() -> None:
        write_json(report, Path(args.report_json))

    # The untrained model's attention, as a baseline for the trained one.
    evals = eval_data(args.shape, args.eval_clips, device, model)
    init = copy.deepcopy(model.transformer).to(device)
    if device.type == "cuda":
        init = torch.nn.Module.to(init, dtype=torch.bfloat16)
    t0 = time.perf_counter()
    untrained = attention_recall(init, evals.pixels, evals.cond, device)
    report["attention_recall"] = {"options": RECALL_OPTIONS, "sigmas": RECALL_SIGMAS,
                                  "untrained": {"x".join(map(str, args.shape)): untrained}}
    report["validation_loss"] = {"untrained": validation_loss(init, evals.pixels, evals.cond,
                                                              device)}
    del init
    log(f"untrained: recall of top-20% blocks "
        f"{_recall_line(report['attention_recall']['untrained'])}; measured in "
        f"{time.perf_counter() - t0:.1f} s")

    record = train(args, model, device, log)
    ema = record.pop("ema_params")
    report["training"] = record
    write_report()

    # Ship the EMA weights unless the raw ones validate better (short runs).
    raw_val = validation_loss(model.transformer, evals.pixels, evals.cond, device)
    raw = [p.detach().clone() for p in model.transformer.parameters()]
    with torch.no_grad():
        torch._foreach_copy_(list(model.transformer.parameters()), ema)
    ema_val = validation_loss(model.transformer, evals.pixels, evals.cond, device)
    shipped = "ema" if ema_val["mean"] <= raw_val["mean"] else "raw"
    if shipped == "raw":
        with torch.no_grad():
            torch._foreach_copy_(list(model.transformer.parameters()), raw)
    size = save_model(model, args.out)
    export(Path(args.out), "weights")
    report["model"].update({"weights_bytes": size, "weights": shipped, "folder": _rel(args.out)})
    report["validation_loss"].update({"raw": raw_val, "ema": ema_val})
    log(f"saved {shipped} weights to {args.out}: {size / 1e6:.2f} MB; validation loss "
        f"raw {raw_val['mean']:.4f}, ema {ema_val['mean']:.4f}, untrained "
        f"{report['validation_loss']['untrained']['mean']:.4f}")
    if size > WEIGHTS_LIMIT_BYTES:
        raise SystemExit(f"the weights take {size} bytes, over the {WEIGHTS_LIMIT_BYTES} limit")
    write_report()

    # Everything below uses the saved folder, loaded as users load it.
    loaded = load_model(args.out, device=device,
                        dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    report["validation_loss"]["loaded"] = validation_loss(loaded.transformer, evals.pixels,
                                                          evals.cond, device)
    report["samples"] = samples_png(args, loaded, device, log)
    report["samples"]["png"] = _rel(args.samples_png)
    export(Path(args.samples_png))
    write_report()

    t0 = time.perf_counter()
    trained = {}
    for shape in (args.shape, args.hires_shape):
        data = evals if shape == args.shape else eval_data(shape, max(1, args.eval_clips // 4),
                                                           device, loaded)
        trained["x".join(map(str, shape))] = attention_recall(
            loaded.transformer, data.pixels, data.cond, device,
            masks_png=args.masks_png if shape == args.shape else None)
    report["attention_recall"]["trained"] = trained
    report["masks_png"] = _rel(args.masks_png)
    if args.masks_png:
        export(Path(args.masks_png))
    report["seconds_total"] = round(time.perf_counter() - t_script, 1)
    write_report()
    for name, by_sigma in trained.items():
        log(f"trained {name}: recall of top-20% blocks {_recall_line({name: by_sigma})}")
    log(f"done in {report['seconds_total']:.0f} s (recall measured in "
        f"{time.perf_counter() - t0:.1f} s): {args.out}, {args.samples_png}, {args.masks_png}, "
        f"{args.report_json}")
    return report


def _rel(value: Any) -> Any:
    """A path inside the repository as a repository-relative string; anything else unchanged."""
    if not isinstance(value, str) or not os.path.isabs(value):
        return value
    try:
        return str(Path(value).resolve().relative_to(ROOT))
    except ValueError:
        return value


def _recall_line(by_shape: Dict[str, Any]) -> str:
    by_sigma = next(iter(by_shape.values()))
    return ", ".join(f"sigma {s}: {v['recall']:.3f} (density {v['density']:.3f})"
                     for s, v in by_sigma.items())


if __name__ == "__main__":
    main()
