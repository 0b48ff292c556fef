"""What the pipeline examples share: the command line, compiling the transformer, generating,
saving the video and printing the adaspa report.

Each example (``hunyuan_video.py``, ``wan.py``, ``cogvideox.py``) only says how to load its
pipeline and which extra call arguments it needs; the rest runs here, so all three take the same
path, and the tests in ``tests/examples/`` run that path on tiny random pipelines.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

import adaspa_compile

__all__ = ["Defaults", "Generation", "build_parser", "parse_args", "require", "adaspa_options",
           "compile_transformer", "load_pipeline", "run", "save_video"]

BACKENDS = ("adaspa", "inductor", "eager")


@dataclass(frozen=True)
class Defaults:
    """One model's defaults for the command line. ``None`` leaves the value to the pipeline."""

    name: str
    height: Optional[int]
    width: Optional[int]
    frames: Optional[int]
    guidance: float
    fps: int
    steps: int = 50
    prompt: str = "A cat walks on the grass, realistic, golden hour, the camera follows it."


@dataclass
class Generation:
    """What one run of an example produced."""

    output: Path
    seconds: float
    frames: int
    report: Optional[adaspa_compile.Report]


def build_parser(description: str, defaults: Defaults) -> argparse.ArgumentParser:
    """The options every example takes; an example may add its own before parsing."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", help="local folder of the diffusers pipeline (from_pretrained)")
    p.add_argument("--prompt", default=defaults.prompt, help="what to generate")
    p.add_argument("--negative-prompt", default=None, help="what to steer away from")
    p.add_argument("--height", type=int, default=defaults.height,
                   help="video height in pixels (None: the pipeline's default)")
    p.add_argument("--width", type=int, default=defaults.width,
                   help="video width in pixels (None: the pipeline's default)")
    p.add_argument("--frames", type=int, default=defaults.frames,
                   help="video frames (None: the pipeline's default)")
    p.add_argument("--steps", type=int, default=defaults.steps, help="denoising steps")
    p.add_argument("--guidance", type=float, default=defaults.guidance, help="guidance scale")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--output", type=Path, default=Path(f"{defaults.name}_adaspa.mp4"),
                   help="where to write the video: .mp4 (needs imageio + imageio-ffmpeg, or "
                        "opencv) or .gif")
    p.add_argument("--fps", type=int, default=defaults.fps, help="frame rate of the file")

    a = p.add_argument_group("adaspa (see adaspa_compile.AdaSpaConfig)")
    a.add_argument("--backend", choices=BACKENDS, default="adaspa",
                   help="'inductor' compiles dense, 'eager' does not compile: dense references "
                        "with the same seed")
    a.add_argument("--sparsity", type=float, default=0.8,
                   help="share of video key blocks dropped per layer")
    a.add_argument("--mode", choices=("sparsity", "recall"), default="sparsity",
                   help="'recall': each head keeps the fewest blocks reaching --recall")
    a.add_argument("--recall", type=float, default=0.95, help="target recall in --mode recall")
    a.add_argument("--precision", choices=("bf16", "fp8"), default="bf16",
                   help="'fp8': the block-sparse steps in FP8 (GPUs from Ada and Hopper on, head "
                        "dims 64 and 128)")
    a.add_argument("--search-steps", type=int, nargs="+", default=[9, 29],
                   help="zero-based search steps: fused search at the first, LSE-cached search "
                        "at the others; dense before the first")
    a.add_argument("--min-seq-len", type=int, default=None,
                   help="attention calls shorter than this stay dense (backend default 1024)")
    a.add_argument("--compile-mode", default=None,
                   help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    a.add_argument("--fullgraph", action="store_true", help="fail on a graph break")
    a.add_argument("--regional", action="store_true",
                   help="compile only the repeated transformer blocks "
                        "(transformer.compile_repeated_blocks): a shorter compile")

    d = p.add_argument_group("loading")
    d.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the pipeline runs (bf16 on CUDA, fp32 elsewhere)")
    d.add_argument("--cpu-offload", action="store_true",
                   help="enable_model_cpu_offload() instead of moving the pipeline to --device "
                        "(needs accelerate)")
    d.add_argument("--vae-tiling", action=argparse.BooleanOptionalAction, default=True,
                   help="decode the video in tiles (less memory at 720p); default on")
    return p


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]],
               have_pipeline: bool) -> argparse.Namespace:
    """Parse and check ``argv``; errors name the option and exit like argparse does."""
    args = parser.parse_args(argv)
    if not have_pipeline and not args.model:
        parser.error("--model PATH is required: a local folder holding the diffusers pipeline")
    if args.search_steps[0] >= args.steps and args.backend == "adaspa":
        parser.error(f"--search-steps {args.search_steps}: the first search step must come "
                     f"before --steps {args.steps}, or every step stays dense")
    suffix = args.output.suffix.lower()
    if suffix not in (".mp4", ".gif"):
        parser.error(f"--output {args.output}: use a .mp4 or .gif file name")
    if suffix == ".mp4" and not video_writer_available():
        parser.error("--output .mp4 needs imageio and imageio-ffmpeg (pip install imageio "
                     "imageio-ffmpeg) or opencv-python; or write a .gif")
    if args.cpu_offload:
        require(parser, ["accelerate"], "--cpu-offload")
    try:
        adaspa_options(args)
    except ValueError as exc:  # the config names the bad key and its valid values
        parser.error(str(exc))
    return args


def require(parser: argparse.ArgumentParser, modules: Sequence[str], why: str) -> None:
    """Exit with an install hint when one of ``modules`` cannot be imported."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        parser.error(f"{why} needs {', '.join(missing)}: pip install {' '.join(missing)}")


def video_writer_available() -> bool:
    """True when ``diffusers.utils.export_to_video`` can write an MP4 here."""
    has = importlib.util.find_spec
    return (has("imageio") is not None and has("imageio_ffmpeg") is not None) \
        or has("cv2") is not None


def adaspa_options(args: argparse.Namespace) -> Dict[str, Any]:
    """The ``options=`` of ``torch.compile(..., backend="adaspa")``, validated."""
    options: Dict[str, Any] = {"sparsity": args.sparsity, "mode": args.mode,
                               "recall": args.recall, "search_steps": tuple(args.search_steps),
                               "precision": args.precision}
    if args.min_seq_len is not None:
        options["min_seq_len"] = args.min_seq_len
    adaspa_compile.AdaSpaConfig.from_options(options)  # raises ValueError naming a bad key
    return options


def dtype_keyword(dtype: torch.dtype) -> Dict[str, torch.dtype]:
    """``from_pretrained``'s dtype argument: ``dtype`` since diffusers 0.42, ``torch_dtype``
    before (0.42 still takes it, with a deprecation warning)."""
    import diffusers
    from packaging.version import Version

    new = Version(diffusers.__version__).release >= (0, 42)
    return {"dtype" if new else "torch_dtype": dtype}


def load_pipeline(pipeline_cls: type, args: argparse.Namespace, **components: Any):
    """``pipeline_cls.from_pretrained(args.model)``: bf16 on CUDA (fp32 on CPU), placed on
    ``args.device`` or offloaded. ``components`` replace loaded ones (e.g. an fp32 VAE)."""
    dtype = torch.bfloat16 if str(args.device).startswith("cuda") else torch.float32
    print(f"loading {pipeline_cls.__name__} from {args.model} ({dtype})", flush=True)
    pipe = pipeline_cls.from_pretrained(args.model, **dtype_keyword(dtype), **components)
    if args.cpu_offload:
        pipe.enable_model_cpu_offload(device=args.device)  # needs accelerate
    else:
        pipe.to(args.device)
    return pipe


TRANSFORMERS = ("transformer", "transformer_2")  # Wan 2.2 A14B: high- and low-noise experts


def compile_transformer(pipe, args: argparse.Namespace) -> None:
    """Compile ``pipe.transformer`` (and ``pipe.transformer_2`` where the pipeline has two
    experts), whole or, with ``--regional``, their repeated blocks. Each compiled model keeps
    its own adaspa masks and step clock. Nothing for ``--backend eager``."""
    if args.backend == "eager":
        return
    kwargs: Dict[str, Any] = {"fullgraph": args.fullgraph}
    if args.compile_mode is not None:
        kwargs["mode"] = args.compile_mode
    if args.backend == "adaspa":
        kwargs["options"] = adaspa_options(args)
    for name in TRANSFORMERS:
        model = getattr(pipe, name, None)
        if model is None:
            continue
        if args.regional:
            model.compile_repeated_blocks(backend=args.backend, **kwargs)
        else:
            setattr(pipe, name, torch.compile(model, backend=args.backend, **kwargs))


def save_video(frames: List[Any], path: Path, fps: int) -> Path:
    """Write PIL frames as MP4 (``export_to_video``) or GIF (``export_to_gif``)."""
    from diffusers.utils import export_to_gif, export_to_video

    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".gif":
        export_to_gif(frames, str(path), fps=fps)
    else:
        export_to_video(frames, str(path), fps=fps)
    return path


def run(pipe, args: argparse.Namespace,
        call_kwargs: Optional[Dict[str, Any]] = None) -> Generation:
    """Compile ``pipe.transformer``, generate one video, save it and print the report.

    ``call_kwargs`` are the model-specific arguments of ``pipe(...)``.
    """
    if args.vae_tiling and hasattr(pipe.vae, "enable_tiling"):
        pipe.vae.enable_tiling()
    compile_transformer(pipe, args)

    size = {"height": args.height, "width": args.width, "num_frames": args.frames}
    kwargs = {k: v for k, v in size.items() if v is not None}
    kwargs.update(call_kwargs or {})
    device = _device_of(pipe)
    print(f"generating: {args.steps} steps, backend={args.backend}"
          + (f", options={adaspa_options(args)}" if args.backend == "adaspa" else ""), flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = pipe(prompt=args.prompt, negative_prompt=args.negative_prompt,
                  num_inference_steps=args.steps, guidance_scale=args.guidance,
                  generator=torch.Generator("cpu").manual_seed(args.seed), output_type="pil",
                  **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    frames = result.frames[0]
    path = save_video(frames, args.output, args.fps)
    peak = (f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
            if device.type == "cuda" else "")
    print(f"wrote {path} ({len(frames)} frames); generation took {seconds:.1f} s including "
          f"compilation{peak}", flush=True)
    report = None
    if args.backend == "adaspa":
        report = adaspa_compile.report()
        print(report, flush=True)
    return Generation(output=path, seconds=seconds, frames=len(frames), report=report)


def _device_of(pipe) -> torch.device:
    device = getattr(pipe, "_execution_device", None)
    return torch.device(device) if device is not None else torch.device("cpu")
