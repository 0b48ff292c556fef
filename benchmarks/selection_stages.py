"""Where the block selection's time goes: ``select_blocks`` and each of its stages, timed apart.

The selection runs once per search step and layer (twice per layer in the 50 steps of the
default schedule), so at CogVideoX's batch-2 shape it is part of issue 5's search overhead.
Mass maps are synthetic: positive, row sums equal to the block's rows, with a local diagonal
band and random background (what a search step hands over), at the e2e shapes' batch.

    python benchmarks/selection_stages.py                  # e2e shapes, on a GPU
    python benchmarks/selection_stages.py --quick          # small, runs on the CPU

Prints one table (ms per stage) and writes JSON to ``$OUT/selection_stages.json`` when set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adaspa_compile import selection as sel  # noqa: E402
from adaspa_compile.blockmask import BlockMask  # noqa: E402
from adaspa_compile.config import AdaSpaConfig  # noqa: E402

# name: (batch as e2e runs it, heads, tokens, text tokens, text first?)
SHAPES = {"cogvideox": (2, 48, 45_106, 226, True), "hunyuan": (1, 24, 119_056, 256, False),
          "wan": (1, 40, 75_600, 0, False)}


def synthetic_mass(B, H, nb, block, device, seed=0):
    """fp32 ``[B,H,nb,nb]``: a decaying diagonal band plus random background, rows sum to ``block``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.rand(B, H, nb, nb, generator=g).to(device)
    dist = (torch.arange(nb, device=device)[:, None] - torch.arange(nb, device=device)).abs()
    band = torch.exp(-dist.float() / 8.0)
    mass = noise * 0.2 + band
    return mass / mass.sum(-1, keepdim=True) * block


def timer(device):
    if device.type == "cuda":
        import triton

        def run(fn):
            fn()
            torch.cuda.synchronize()
            return float(triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median"))
    else:
        import time

        def run(fn):
            fn()
            t0 = time.perf_counter()
            for _ in range(3):
                fn()
            return (time.perf_counter() - t0) / 3 * 1e3
    return run


def stages(mass, layout, cfg):
    """The stage functions of ``select_blocks`` on this mass map, as zero-argument callables."""
    B = mass.shape[0]
    candidate, forced = sel._candidates(layout, B, mass.device, cfg.text_sink)
    order = sel._row_order(mass, candidate)
    curve, total = sel._recall_curve(mass, candidate, forced, order)
    keep = torch.full(mass.shape[:2], max(1, round(0.2 * mass.shape[-1])), device=mass.device)
    dense = sel._mask_from_order(order, keep.long(), candidate, forced)
    return {
        "select_blocks s=0.8 tiers": lambda: sel.select_blocks(mass, layout, cfg),
        "_candidates": lambda: sel._candidates(layout, B, mass.device, cfg.text_sink),
        "_row_order (masked_fill + stable sort)": lambda: sel._row_order(mass, candidate),
        "torch.sort stable, fp32 rows": lambda: torch.sort(mass, dim=-1, descending=True, stable=True),
        "torch.sort unstable, fp32 rows": lambda: torch.sort(mass, -1, descending=True),
        "torch.topk k=0.3*nb": lambda: torch.topk(mass, max(1, round(0.3 * mass.shape[-1])), -1),
        "_recall_curve (gather + cumsum)": lambda: sel._recall_curve(mass, candidate, forced, order),
        "_mask_from_order (scatter)": lambda: sel._mask_from_order(order, keep.long(), candidate,
                                                                   forced),
        "BlockMask.from_dense (pack + sync)": lambda: BlockMask.from_dense(
            dense, block_size=layout.block_size, seq_len=layout.seq_len),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--quick", action="store_true", help="a twentieth of the tokens")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = timer(device)
    block = 64
    rows = []
    for name in args.shapes.split(","):
        B, H, L, text, first = SHAPES[name]
        if args.quick:
            L, H = L // 20, max(2, H // 8)
        nb = -(-L // block)
        span = None if not text else ((0, text) if first else (L - text, L))
        layout = sel.BlockLayout(seq_len=L, block_size=block, text_span=span)
        mass = synthetic_mass(B, H, nb, block, device)
        for label, fn in stages(mass, layout, AdaSpaConfig(sparsity=0.8)).items():
            ms = run(fn)
            rows.append({"shape": name, "B": B, "H": H, "nb": nb, "stage": label, "ms": ms})
            print(f"{name:10s} B={B} H={H} nb={nb}  {label:40s} {ms:8.3f} ms", flush=True)
        del mass
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__}
    out = os.environ.get("OUT")
    if out:
        Path(out, "selection_stages.json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                                 indent=1))


if __name__ == "__main__":
    main()
