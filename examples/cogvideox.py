"""CogVideoX text-to-video with AdaSpa sparse attention.

    python examples/cogvideox.py --model /path/to/CogVideoX1.5-5B --prompt "A cat on the grass"
    python examples/cogvideox.py --model /path/to/CogVideoX-5b --fps 8 --sparsity 0.9
    python examples/cogvideox.py --model ... --backend inductor   # dense reference, same seed

``--model`` is a local folder in diffusers layout (``THUDM/CogVideoX1.5-5B``, ``CogVideoX-5b``,
``CogVideoX-2b``). Height, width and frames default to the checkpoint's own (768x1360, 81 frames
for 1.5). The pipeline is loaded in bf16 on CUDA, ``pipe.transformer`` is compiled with
``backend="adaspa"``, and the video is written with the report. CogVideoX batches the two
classifier-free guidance branches into one call, so masks are kept per batch element of one
branch.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import _common  # examples/_common.py: this folder is on sys.path when the script runs

DEFAULTS = _common.Defaults(name="cogvideox", height=None, width=None, frames=None,
                            guidance=6.0, fps=16)


def build_parser() -> argparse.ArgumentParser:
    """The shared options plus this model's own."""
    parser = _common.build_parser(__doc__.splitlines()[0], DEFAULTS)
    parser.add_argument("--dynamic-cfg", action=argparse.BooleanOptionalAction, default=True,
                        help="the pipeline's use_dynamic_cfg (advised for the 5B models)")
    return parser


def main(argv: Optional[Sequence[str]] = None, pipe=None) -> _common.Generation:
    """Run the example; ``pipe`` replaces loading from ``--model`` (the tests pass one)."""
    parser = build_parser()
    args = _common.parse_args(parser, argv, have_pipeline=pipe is not None)
    if pipe is None:
        from diffusers import CogVideoXPipeline

        pipe = _common.load_pipeline(CogVideoXPipeline, args)
    return _common.run(pipe, args, {"use_dynamic_cfg": args.dynamic_cfg})


if __name__ == "__main__":
    main()
