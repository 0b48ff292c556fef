"""What the benchmark scripts share: the benchmark shapes, random inputs, timing, run metadata and
result writing.

The scripts import it by bare name (``from _common import ...``): Python puts a script's own
folder first on ``sys.path``, so ``python benchmarks/<script>.py`` finds it. It needs only torch;
triton and diffusers are imported where they are used.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch

RESULTS = Path(__file__).resolve().parent / "results"


# ----------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Shape:
    """One benchmarked model's self-attention at its generation size (per CFG branch)."""

    model: str  # the model and generation it stands for
    heads: int
    head_dim: int
    latent: Tuple[int, int, int]  # frames, height, width of the VAE latent
    patch: Tuple[int, int, int]  # the transformer's patch: frames, height, width
    text_tokens: int  # text inside self-attention (0: cross-attention only)
    text_position: str  # where that text sits in the sequence: "first" or "last"
    prompt_tokens: int  # text-encoder tokens the transformer is given
    layers: int  # self-attention sites of the full model

    @property
    def video_tokens(self) -> int:
        (f, h, w), (pf, ph, pw) = self.latent, self.patch
        return (f // pf) * (h // ph) * (w // pw)

    @property
    def tokens(self) -> int:
        """The self-attention sequence length: video tokens and the text among them."""
        return self.video_tokens + self.text_tokens


SHAPES: Dict[str, Shape] = {
    # 119,056 tokens: 33 x 45 x 80 video + 256 text (padded; the rest of the prompt is masked)
    "hunyuan": Shape("HunyuanVideo 720p, 129 frames", heads=24, head_dim=128,
                     latent=(33, 90, 160), patch=(1, 2, 2), text_tokens=256,
                     text_position="last", prompt_tokens=256, layers=60),
    # 75,600 tokens: 21 x 45 x 80 video; its 512 text tokens enter through cross-attention
    "wan": Shape("Wan2.1-14B 720p, 81 frames", heads=40, head_dim=128, latent=(21, 90, 160),
                 patch=(1, 2, 2), text_tokens=0, text_position="last", prompt_tokens=512,
                 layers=40),
    # 45,106 tokens: 226 text first, then 11 x 48 x 85 video (21 latent frames padded to 22)
    "cogvideox": Shape("CogVideoX1.5-5B 768 x 1360, 81 frames", heads=48, head_dim=64,
                       latent=(22, 96, 170), patch=(2, 2, 2), text_tokens=226,
                       text_position="first", prompt_tokens=226, layers=42),
}

# The phase letters of ``adaspa_compile.report()`` and the steps of each phase in a default
# 50-step generation (search_steps=(9, 29)), which the projected 50-step times use.
PHASE_NAMES = {"D": "dense", "F": "fused_search", "C": "cached_search", "S": "sparse"}
DEFAULT_SCHEDULE = {"dense": 9, "fused_search": 1, "cached_search": 1, "sparse": 39}


def projected_seconds(ms: Dict[str, Optional[float]], calls_per_step: int,
                      schedule: Dict[str, int] = DEFAULT_SCHEDULE) -> Optional[float]:
    """Seconds of a generation that runs ``schedule`` (steps per phase), ``calls_per_step``
    model calls a step, from the ms of one call in each phase; None when a phase is untimed."""
    if any(ms.get(phase) is None for phase in schedule):
        return None
    return calls_per_step * sum(n * ms[p] for p, n in schedule.items()) / 1e3


# ----------------------------------------------------------------------------- inputs
def random_qkv(H: int, L: int, D: int, device: str = "cuda"):
    """Seeded random bf16 q, k, v ``[1, H, L, D]``: BSHD memory viewed as BHSD (diffusers'
    layout), never zeros."""
    torch.manual_seed(0)
    return [torch.randn(1, L, H, D, device=device, dtype=torch.bfloat16).transpose(1, 2)
            for _ in range(3)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of ``a`` against ``b`` (NaN when ``a`` is not finite)."""
    a, b = a.float(), b.float()
    if not torch.isfinite(a).all():
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def mean(values: Iterable[Optional[float]]) -> Optional[float]:
    """The mean of the values that are not None; None when there are none."""
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


# ----------------------------------------------------------------------------- timing
MIN_CALLS = 10


def bench(fn: Callable[[], Any], rep_ms: int) -> float:
    """Median ms of ``fn`` (``triton.testing.do_bench``) over ``rep_ms`` of calls, and at least
    ``MIN_CALLS`` calls: do_bench alone times a 300 ms kernel once at ``rep=100``."""
    import triton

    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    once_ms = (time.perf_counter() - start) * 1e3
    rep = max(rep_ms, MIN_CALLS * once_ms)
    return float(triton.testing.do_bench(fn, warmup=max(25, rep / 4), rep=rep,
                                         return_mode="median"))


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- reporting
def log(msg: str) -> None:
    """Print with the time of day, flushed."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fmt(v: Any, spec: str = ".1f") -> str:
    """A table cell: ``v`` formatted, ``-`` for None."""
    return "-" if v is None else format(v, spec)


def device_name(device: Union[torch.device, str, None] = None, cpu: str = "cpu") -> str:
    """The CUDA card's name, else ``cpu``."""
    device = torch.device(device) if device is not None else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu


def run_meta(device: Union[torch.device, str, None] = None,
             command: Optional[str] = None) -> Dict[str, Any]:
    """Card, torch / triton / CUDA versions, command line and date of this run. ``command``
    defaults to ``python`` and the arguments (``sys.argv``)."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": device_name(device), "torch": torch.__version__, "triton": triton_version,
            "cuda": torch.version.cuda,
            "command": command if command is not None else "python " + " ".join(sys.argv),
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def environment(device: torch.device) -> Dict[str, Any]:
    """Card (the CPU's name on a CPU), torch, diffusers and Python versions: the fidelity
    scripts' record of where they ran."""
    import diffusers

    return {"device": device_name(device, platform.processor() or "cpu"),
            "torch": torch.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version()}


# ----------------------------------------------------------------------------- writing
def with_out_copy(path: Optional[Path], name: Optional[str] = None) -> List[Path]:
    """``[path]`` and, when ``$OUT`` is set, ``$OUT/<name or path's name>`` (the copy that the
    device tool returns)."""
    paths = [Path(path)] if path is not None else []
    out = os.environ.get("OUT")
    if out:
        paths.append(Path(out) / (name or Path(path).name))
    return paths


def write_json(payload: Any, path: Optional[Path], name: Optional[str] = None) -> List[Path]:
    """``payload`` as JSON (indent 1; what JSON lacks as ``str``) to ``path`` and, when ``$OUT``
    is set, to ``$OUT/<name or path's name>``; returns the paths written."""
    paths = with_out_copy(path, name)
    text = json.dumps(payload, indent=1, default=str)
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return paths


def write_results(name: str, payload: Any) -> List[Path]:
    """``payload`` as JSON to ``benchmarks/results/<name>`` and, when set, ``$OUT/<name>``."""
    return write_json(payload, RESULTS / name)


def export(path: Union[Path, str], name: Optional[str] = None) -> None:
    """Copy a file (or a folder's files) into ``$OUT``, as ``name`` when given, when ``$OUT`` is
    set; a path that does not exist is skipped."""
    out = os.environ.get("OUT")
    path = Path(path)
    if not out or not path.exists():
        return
    target = Path(out) / (name or path.name)
    if path.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        for f in path.iterdir():
            shutil.copy2(f, target / f.name)
    else:
        shutil.copy2(path, target)


def adaspa_backend_for_compile():
    """``"adaspa"`` when the entry point is installed, else the backend function itself (a
    checkout run with ``PYTHONPATH=.``, as on the device machine)."""
    if "adaspa" in torch._dynamo.list_backends():
        return "adaspa"
    from adaspa_compile.backend import adaspa_backend

    return adaspa_backend
