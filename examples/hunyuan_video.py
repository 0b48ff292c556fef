"""HunyuanVideo text-to-video with AdaSpa sparse attention.

    python examples/hunyuan_video.py --model /path/to/HunyuanVideo --prompt "A cat on the grass"
    python examples/hunyuan_video.py --model ... --sparsity 0.9 --output cat.gif
    python examples/hunyuan_video.py --model ... --backend inductor   # dense reference, same seed

``--model`` is a local folder in diffusers layout (the ``hunyuanvideo-community/HunyuanVideo``
checkpoint). The pipeline is loaded in bf16 on CUDA, ``pipe.transformer`` is compiled with
``backend="adaspa"``, and the video (720p, 129 frames by default) is written with the report.
The guidance-distilled model runs one transformer call per step; ``--true-cfg-scale`` > 1 with a
``--negative-prompt`` adds a second call (a second CFG branch in the report).
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import _common  # examples/_common.py: this folder is on sys.path when the script runs

DEFAULTS = _common.Defaults(name="hunyuan_video", height=720, width=1280, frames=129,
                            guidance=6.0, fps=24)


def build_parser() -> argparse.ArgumentParser:
    """The shared options plus this model's own."""
    parser = _common.build_parser(__doc__.splitlines()[0], DEFAULTS)
    parser.add_argument("--true-cfg-scale", type=float, default=1.0,
                        help="real classifier-free guidance (needs --negative-prompt)")
    return parser


def main(argv: Optional[Sequence[str]] = None, pipe=None) -> _common.Generation:
    """Run the example; ``pipe`` replaces loading from ``--model`` (the tests pass one)."""
    parser = build_parser()
    args = _common.parse_args(parser, argv, have_pipeline=pipe is not None)
    if pipe is None:
        from diffusers import HunyuanVideoPipeline

        pipe = _common.load_pipeline(HunyuanVideoPipeline, args)
    return _common.run(pipe, args, {"true_cfg_scale": args.true_cfg_scale})


if __name__ == "__main__":
    main()
