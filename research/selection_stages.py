"""Where the block selection's time goes: ``select_blocks`` and each of its stages, timed apart.

The selection runs once per search step and layer (twice per layer in the 50 steps of the
default schedule), so at CogVideoX's batch-2 shape it is part of issue 5's search overhead.
Mass maps are synthetic: positive, row sums equal to the block's rows, with a local diagonal
band and random background (what a search step hands over), at the e2e shapes' batch.

    python research/selection_stages.py                  # e2e shapes, on a GPU
    python research/selection_stages.py --quick          # small, runs on the CPU

Prints one table (ms per stage) and writes JSON to ``$OUT/selection_stages.json`` when set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # kernel_speed, e2e, fidelity

from adaspa_compile import selection as sel  # noqa: E402
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
    """``select_blocks`` and its two passes over the mass map, in PyTorch and as kernels (CUDA),
    as zero-argument callables."""
    B, _, nb, _ = mass.shape
    text = layout.text_blocks(mass.device)
    valid = layout.valid_key_blocks(B, mass.device)
    keep = torch.full(mass.shape[:2], max(1, round(0.2 * nb)), device=mass.device,
                      dtype=torch.long)
    ranked = sel.sorted_candidate_rows(mass, text, valid)[0]
    out = {"select_blocks s=0.8 tiers": lambda: sel.select_blocks(mass, layout, cfg),
           "torch: sorted_candidate_rows": lambda: sel.sorted_candidate_rows(mass, text, valid),
           "torch: keep_best": lambda: sel.keep_best(mass, text, valid, keep, ranked),
           "torch.sort fp32 rows (for scale)": lambda: torch.sort(mass, dim=-1, descending=True)}
    if mass.is_cuda:
        from adaspa_compile import kernels

        out["kernel: sorted_candidate_mass"] = lambda: kernels.sorted_candidate_mass(
            mass, text, valid)
        out["kernel: keep_blocks"] = lambda: kernels.keep_blocks(mass, text, valid, keep, ranked)
        out["select_blocks, PyTorch passes"] = lambda: _torch_select(mass, layout, cfg)
    return out


def _torch_select(mass, layout, cfg):
    saved = sel._selection_kernels
    sel._selection_kernels = lambda _mass: None
    try:
        return sel.select_blocks(mass, layout, cfg)
    finally:
        sel._selection_kernels = saved


def check_kernels(mass, layout, cfg):
    """Largest differences between the kernel and PyTorch selections: (mask bits differ,
    recall abs diff); run where the kernels run."""
    fast, slow = sel.select_blocks(mass, layout, cfg), _torch_select(mass, layout, cfg)
    bits = int((fast.mask.bits != slow.mask.bits).sum())
    return bits, float((fast.recall - slow.recall).abs().max())


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
        cfg = AdaSpaConfig(sparsity=0.8)
        if device.type == "cuda":
            bits, recall = check_kernels(mass, layout, cfg)
            rows.append({"shape": name, "check": "kernel vs torch", "bits_differ": bits,
                         "recall_abs_diff": recall})
            print(f"{name:10s} kernel vs torch selection: {bits} mask bytes differ, recall "
                  f"diff {recall:.1e}", flush=True)
        for label, fn in stages(mass, layout, cfg).items():
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
