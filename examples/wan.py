"""Wan 2.1 and Wan 2.2 text-to-video with AdaSpa sparse attention.

    python examples/wan.py --model /path/to/Wan2.1-T2V-14B-Diffusers --prompt "A cat on the grass"
    python examples/wan.py --model /path/to/Wan2.2-T2V-A14B-Diffusers   # two experts
    python examples/wan.py --model ... --height 480 --width 832 --mode recall --recall 0.95
    python examples/wan.py --model ... --regional          # compile the repeated blocks only
    python examples/wan.py --model ... --backend inductor   # dense reference, same seed

``--model`` is a local folder in diffusers layout (``Wan-AI/Wan2.1-T2V-14B-Diffusers``, the 1.3B
one, or ``Wan-AI/Wan2.2-T2V-A14B-Diffusers``). The pipeline is loaded in bf16 on CUDA with the
VAE in fp32 (as diffusers advises), the transformer is compiled with ``backend="adaspa"``, and the
video (720p, 81 frames by default) is written with the report. Wan runs classifier-free guidance
as two transformer calls per step: the report shows two CFG branches, each with its own LSE cache
and masks. Wan 2.2 A14B has two experts, ``transformer`` for the high-noise steps and
``transformer_2`` for the rest: both are compiled, and each searches its own masks (the
low-noise expert starts with a fused search at its first step).
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import _common  # examples/_common.py: this folder is on sys.path when the script runs

DEFAULTS = _common.Defaults(name="wan", height=720, width=1280, frames=81, guidance=5.0, fps=16)


def build_parser() -> argparse.ArgumentParser:
    """The shared options plus this model's own."""
    parser = _common.build_parser(__doc__.splitlines()[0], DEFAULTS)
    parser.add_argument("--flow-shift", type=float, default=None,
                        help="scheduler flow shift; default for Wan 2.1 5.0 from 720p up, 3.0 "
                             "below (diffusers' advice); Wan 2.2 keeps its checkpoint's")
    return parser


def main(argv: Optional[Sequence[str]] = None, pipe=None) -> _common.Generation:
    """Run the example; ``pipe`` replaces loading from ``--model`` (the tests pass one)."""
    parser = build_parser()
    args = _common.parse_args(parser, argv, have_pipeline=pipe is not None)
    if pipe is None:
        # WanTransformer3DModel keeps some modules in fp32, which from_pretrained only does
        # with low_cpu_mem_usage, that is with accelerate.
        _common.require(parser, ["accelerate"], "loading Wan")
        import torch
        from diffusers import AutoencoderKLWan, WanPipeline

        vae = AutoencoderKLWan.from_pretrained(args.model, subfolder="vae",
                                               **_common.dtype_keyword(torch.float32))
        pipe = _common.load_pipeline(WanPipeline, args, vae=vae)
    set_flow_shift(pipe, args)
    return _common.run(pipe, args)


def set_flow_shift(pipe, args) -> None:
    """Rebuild the scheduler with the flow shift that suits the resolution."""
    shift = args.flow_shift
    if shift is None and getattr(pipe, "transformer_2", None) is not None:
        return  # Wan 2.2: the scheduler of the checkpoint
    if shift is None:
        shift = 5.0 if (args.height or 480) >= 720 else 3.0
    if "flow_shift" in pipe.scheduler.config:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, flow_shift=shift)


if __name__ == "__main__":
    main()
