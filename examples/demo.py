"""Demo: a trained video DiT samples clips densely and with ``backend="adaspa"``, side by side.

    python examples/demo.py                                   # CPU: 8x64x64, 16 steps
    python examples/demo.py --prompt "red circle bouncing, camera static" --out red.gif
    python examples/demo.py --device cuda --size 16x128x128 --steps 50   # the paper's schedule

The model is the one shipped in ``adaspa_compile/fidelity/weights``: a 7.18M-parameter diffusers
``HunyuanVideoTransformer3DModel`` (2 dual + 4 single blocks, 4 heads of 64, 4x4 pixel patches),
trained on procedural 16-frame clips of coloured shapes moving over a checkerboard, with captions
such as "red circle bouncing, camera static". It is loaded the way a user loads HunyuanVideo, with
``HunyuanVideoTransformer3DModel.from_pretrained(folder)``, and sampled with diffusers'
``FlowMatchEulerDiscreteScheduler`` and true classifier-free guidance (a second call per step with
the empty caption), once eager and dense, once through ``torch.compile(transformer,
backend="adaspa")``. Prints both wall times, the PSNR of the adaspa frames against the dense ones
and ``adaspa_compile.report()``, and writes the two clips as a frame strip (``--out x.png``: a dense
row and an adaspa row per caption) or an animation (``--out x.gif``).

On a CPU the attention runs the library's pure-PyTorch reference, not the Triton kernels, and a
sparse step is slower than the dense one: the times show the path working, not the speedup
(``benchmarks/RESULTS.md`` has the H100 numbers).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

import adaspa_compile
from adaspa_compile.schedule import DEFAULT_STEPS as PAPER_STEPS, scaled_search_steps

CAPTION = "yellow diamond bouncing, camera static"
CPU_SIZE, CUDA_SIZE = "8x64x64", "16x128x128"  # frames x height x width, in pixels
PATCH = 4  # the model's pixel patch (patch_size in its config.json)


class DemoResult(NamedTuple):
    """What one run of the demo measured and wrote."""

    seconds: Dict[str, float]  # "dense", "adaspa" (wall time of the whole sampling loop)
    psnr: List[float]  # dB per caption, adaspa frames vs dense frames in [0, 1]
    report: adaspa_compile.Report
    out: Path


# ----------------------------------------------------------------------------- command line
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", action="append", default=None,
                   help=f"a caption in the model's vocabulary; give it twice for two clips "
                        f"(default: {CAPTION!r})")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda when available, else cpu")
    p.add_argument("--size", default=None,
                   help=f"FRAMESxHEIGHTxWIDTH in pixels (default: {CPU_SIZE} on a CPU, "
                        f"{CUDA_SIZE} on CUDA; trained at 16x64x64 and 16x128x128)")
    p.add_argument("--steps", type=int, default=None, help="default: 16 on a CPU, 50 on CUDA")
    p.add_argument("--guidance-scale", type=float, default=4.0, help="true CFG scale (4)")
    p.add_argument("--seed", type=int, default=0,
                   help="noise seed of the first caption, +1 for the second (0)")
    p.add_argument("--sparsity", type=float, default=0.8, help="adaspa's sparsity (0.8)")
    p.add_argument("--search-steps", type=int, nargs="+", default=None,
                   help="default: the paper's steps 9 and 29 of 50, scaled to --steps")
    p.add_argument("--block-size", type=int, default=None,
                   help="default: 64, or 16 when the attention is shorter than 1024 tokens")
    p.add_argument("--min-seq-len", type=int, default=None,
                   help="default: 1024, lowered to the attention length when shorter")
    p.add_argument("--inner-backend", default="inductor",
                   choices=("inductor", "aot_eager", "eager"),
                   help="what compiles the rest of the graph (inductor)")
    p.add_argument("--out", default="demo_out.png",
                   help="a .png frame strip or a .gif (demo_out.png)")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.prompt = args.prompt or [CAPTION]
    args.size = parse_size(p, args.size or (CUDA_SIZE if cuda else CPU_SIZE))
    args.steps = args.steps if args.steps is not None else (PAPER_STEPS if cuda else 16)
    if args.steps < 1:
        p.error(f"--steps must be at least 1, got {args.steps}")
    args.search_steps = tuple(args.search_steps or scaled_search_steps(args.steps))
    check_prompts(p, args.prompt)
    if Path(args.out).suffix.lower() not in (".png", ".gif"):
        p.error(f"--out {args.out}: use a .png (frame strip) or a .gif (animation)")
    try:
        args.options = adaspa_options(args)
        adaspa_compile.AdaSpaConfig.from_options(args.options)
    except ValueError as e:
        p.error(str(e))
    if args.search_steps[-1] >= args.steps:
        p.error(f"--search-steps {' '.join(map(str, args.search_steps))} must come before "
                f"--steps {args.steps} (zero-based)")
    return args


def parse_size(parser: argparse.ArgumentParser, text: str) -> Tuple[int, int, int]:
    try:
        frames, height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        parser.error(f"--size is FRAMESxHEIGHTxWIDTH, e.g. {CPU_SIZE}; got {text!r}")
    if min(frames, height, width) < 1 or height % PATCH or width % PATCH:
        parser.error(f"--size {text}: height and width must be multiples of the {PATCH}-pixel "
                     "patch")
    return frames, height, width


def check_prompts(parser: argparse.ArgumentParser, prompts: List[str]) -> None:
    """Every word must be in the model's vocabulary (it has no other text encoder)."""
    from adaspa_compile.fidelity import text

    if not 1 <= len(prompts) <= 2:
        parser.error(f"give one or two --prompt, got {len(prompts)}")
    for prompt in prompts:
        words = prompt.replace(",", " ").lower().split()
        unknown = [w for w in words if w not in text.VOCAB or w in (text.PAD, text.NULL)]
        if unknown or not words or len(words) > text.MAX_TOKENS:
            parser.error(
                f"--prompt {prompt!r}: " + (f"unknown word(s) {', '.join(unknown)}" if unknown
                                            else f"use 1 to {text.MAX_TOKENS} words")
                + f".\nValid words: colours {' '.join(text.COLOURS)}; shapes "
                f"{' '.join(text.SHAPES)}; motions {' '.join(text.MOTIONS)}; camera "
                f"{' '.join(text.CAMERA_WORDS)}; joining {' '.join(text.GLUE_WORDS)}.\n"
                f"The model was trained on captions like {CAPTION!r} or 'red square "
                "spinning and green ring hopping behind bar, camera zooms in'.")


def attention_length(size: Tuple[int, int, int]) -> int:
    """Tokens in one joint attention call: video patches, then the padded caption."""
    from adaspa_compile.fidelity import MAX_TOKENS

    frames, height, width = size
    return frames * (height // PATCH) * (width // PATCH) + MAX_TOKENS


def adaspa_options(args: argparse.Namespace) -> Dict[str, object]:
    """The library defaults, except what a small clip needs to be sparse at all: a site shorter
    than ``min_seq_len`` stays dense, and a few large blocks leave nothing to choose from."""
    length = attention_length(args.size)
    return {"sparsity": args.sparsity, "search_steps": args.search_steps,
            "block_size": args.block_size or (64 if length >= 1024 else 16),
            "min_seq_len": args.min_seq_len or min(1024, length),
            "inner_backend": args.inner_backend}


# ----------------------------------------------------------------------------- sampling
class Progress(torch.nn.Module):
    """Calls the transformer and moves a tqdm bar one step per ``calls_per_step`` calls.

    ``sample()`` reads ``.config`` and ``.parameters()``, which come from the wrapped model.
    """

    def __init__(self, transformer, config, calls_per_step: int, bar) -> None:
        super().__init__()
        self.inner, self.config, self.per_step, self.bar = transformer, config, calls_per_step, bar
        self.seconds: List[float] = []  # per call; the first one compiles a compiled model

    def forward(self, **kwargs):
        start = time.perf_counter()
        out = self.inner(**kwargs)
        self.seconds.append(time.perf_counter() - start)
        if len(self.seconds) % self.per_step == 0:
            self.bar.update(1)
        return out


def denoise(transformer, model, args: argparse.Namespace, label: str) -> Tuple[torch.Tensor, float,
                                                                               float]:
    """The clips of ``args.prompt`` (``[B, 3, F, H, W]`` in ``[-1, 1]``), the wall time of the
    sampling loop and that of its first transformer call (which compiles a compiled model)."""
    from tqdm.auto import tqdm

    from adaspa_compile.fidelity import sample

    cond = model.conditioning(args.prompt)
    negative = model.conditioning([""] * len(args.prompt))
    branches = 2 if args.guidance_scale > 1 else 1
    with tqdm(total=args.steps, desc=label, unit="step") as bar:
        wrapped = Progress(transformer, model.transformer.config, branches, bar)
        start = time.perf_counter()
        clips = sample(wrapped, cond, steps=args.steps, shape=args.size, seed=args.seed,
                       guidance_scale=args.guidance_scale, negative=negative)
        if clips.is_cuda:
            torch.cuda.synchronize()
    return clips, time.perf_counter() - start, wrapped.seconds[0]


def psnr(x: torch.Tensor, ref: torch.Tensor) -> List[float]:
    """PSNR (dB) per clip of ``[-1, 1]`` pixels, taken in ``[0, 1]`` after clamping."""
    x, ref = ((t.float().cpu().clamp(-1, 1) + 1) / 2 for t in (x, ref))
    mse = (x - ref).pow(2).flatten(1).mean(1).clamp(min=1e-10)
    return (10 * torch.log10(1 / mse)).tolist()


# ----------------------------------------------------------------------------- output
def to_frames(clip: torch.Tensor) -> list:
    """``[3, F, H, W]`` in ``[-1, 1]`` -> F RGB images."""
    from PIL import Image

    from adaspa_compile.fidelity import to_uint8

    pixels = to_uint8(clip).permute(1, 2, 3, 0).numpy()
    return [Image.fromarray(frame) for frame in pixels]


def save_png(rows: List[Tuple[str, torch.Tensor]], path: Path, frames: int = 8,
             tile: int = 96) -> None:
    """One labelled row of ``frames`` evenly spaced frames per ``(label, clip)``."""
    from PIL import Image, ImageDraw

    label_h, pad = 14, 4
    img = Image.new("RGB", (pad + frames * (tile + pad), len(rows) * (label_h + tile + pad) + pad),
                    (255, 255, 255))
    draw, y = ImageDraw.Draw(img), pad
    for label, clip in rows:
        draw.text((pad, y), label, fill=(0, 0, 0))
        images = to_frames(clip)
        picks = torch.linspace(0, len(images) - 1, frames).round().long().tolist()
        for i, f in enumerate(picks):
            img.paste(images[f].resize((tile, tile), Image.NEAREST), (pad + i * (tile + pad),
                                                                     y + label_h))
        y += label_h + tile + pad
    img.save(path)


def save_gif(rows: List[Tuple[str, torch.Tensor]], path: Path, tile: int = 128) -> None:
    """An animation: per frame, dense then adaspa for each caption, left to right."""
    from PIL import Image

    clips = [to_frames(clip) for _, clip in rows]
    frames = []
    for t in range(len(clips[0])):
        canvas = Image.new("RGB", (len(clips) * tile, tile))
        for i, images in enumerate(clips):
            canvas.paste(images[t].resize((tile, tile), Image.NEAREST), (i * tile, 0))
        frames.append(canvas)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=1000 // 8, loop=0)


def save(dense: torch.Tensor, sparse: torch.Tensor, scores: List[float],
         args: argparse.Namespace) -> Path:
    rows = []
    for i, caption in enumerate(args.prompt):
        rows += [(f"dense: {caption}", dense[i]),
                 (f"adaspa, sparsity {args.sparsity} ({scores[i]:.1f} dB vs dense): {caption}",
                  sparse[i])]
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    (save_gif if path.suffix.lower() == ".gif" else save_png)(rows, path)
    return path


# ----------------------------------------------------------------------------- main
def load(args: argparse.Namespace):
    """The shipped model: ``HunyuanVideoTransformer3DModel.from_pretrained(WEIGHTS_DIR)`` and its
    caption encoder, bf16 on CUDA, fp32 on the CPU."""
    from adaspa_compile.fidelity import load_model

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_model(device=device, dtype=dtype)
    params = sum(p.numel() for p in model.transformer.parameters()) / 1e6
    print(f"HunyuanVideoTransformer3DModel, {params:.2f}M parameters, {dtype}, {device}; clip "
          f"{'x'.join(map(str, args.size))} -> attention over {attention_length(args.size)} "
          f"tokens; {args.steps} steps, CFG {args.guidance_scale}\n"
          f"adaspa options: {args.options}")
    return model


def main(argv: Optional[Sequence[str]] = None) -> DemoResult:
    args = parse_args(argv)
    model = load(args)
    dense, t_dense, _ = denoise(model.transformer, model, args, "dense (eager)")
    compiled = torch.compile(model.transformer, backend="adaspa", options=args.options)
    sparse, t_sparse, t_first = denoise(compiled, model, args, "adaspa")

    scores = psnr(sparse, dense)
    print(f"wall time: dense (eager) {t_dense:.1f} s, adaspa {t_sparse:.1f} s, of which "
          f"{t_first:.1f} s is the first call (it compiles the graph)")
    for caption, value in zip(args.prompt, scores):
        print(f"PSNR adaspa vs dense, {caption!r}: {value:.2f} dB")
    report = adaspa_compile.report(model.transformer)
    print(report)
    out = save(dense, sparse, scores, args)
    print(f"wrote {out}")
    return DemoResult({"dense": t_dense, "adaspa": t_sparse}, scores, report, out)


if __name__ == "__main__":
    main()
