"""LSE-cached search kernel variants side by side on the ADASPA.md section 7 shapes.

A variant is (key-block chunk, TMA, num_warps, num_stages, maxnreg); programs own 128 query
rows (two query blocks of 64):

- chunk: 1 reduces each (query block, key block) mass across the tile's rows, and so across
  warps, at every key block (block-wide barriers every iteration); 16 gathers the row sums of 16
  key blocks in registers and reduces once per chunk.
- TMA: K through a tensor descriptor instead of pointer loads.
- maxnreg (``r<N>`` in the label): a cap on registers per thread, so that more programs fit on
  an SM; none = the compiler's choice.
Earlier sweeps (RESULTS.md) also had programs of four query blocks, a paired fp16
``ex2.approx.f16x2`` (on sm_90 it issues two MUFU.EX2.F16, so it saves nothing), a skewed loop
that issues block j + 1's scores before block j's exponentials (overlap visible in the SASS, but
slower on the H100 at every shape) and 1-4 of every 8 exponentials computed by a cubic on the FMA
units (commit 5360108; no gain at head dim 64, slower at 128); all lost and were removed.

Every variant's mass map is checked against the first variant's and each
row of the map against the number of query rows in its block (the rows of ``W`` sum to it). The
LSE comes from cuDNN's attention, as at a cached-search step of the backend. Times are
``triton.testing.do_bench`` medians, bf16, B=1, BSHD memory viewed as BHSD, with cuDNN dense
attention (forward, no LSE) in the same run as the baseline.

    python research/cached_search_variants.py --shapes hunyuan,wan,cogvideox

Writes ``benchmarks/results/cached_search_variants.json`` (and ``$OUT/`` when set).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # kernel_speed, e2e, fidelity

from kernel_speed import SHAPES, bench, random_qkv, rel_err, write_results  # noqa: E402

cached_search = importlib.import_module("adaspa_compile.kernels.cached_search")
cudnn_attention = importlib.import_module("adaspa_compile.kernels.cudnn_attention")

BLOCK = 64
# (chunk, tma, num_warps, num_stages, maxnreg); the first is the reference of the checks.
# maxnreg caps registers per thread so more programs share an SM (ncu: the head-dim-64 pass
# keeps the exponential unit 74% busy at 4 programs of 4 warps per SM, limited by registers).
VARIANTS = [(16, True, 8, 2, None), (16, True, 8, 3, None), (16, True, 4, 2, None),
            (16, True, 4, 3, None), (1, True, 8, 2, None), (16, False, 8, 2, None),
            (32, True, 8, 2, None), (16, True, 4, 2, 96), (16, True, 4, 3, 96),
            (16, True, 4, 2, 80), (16, True, 4, 2, 72), (16, True, 8, 2, 80),
            (16, True, 8, 3, 80)]


def label(variant) -> str:
    chunk, tma, warps, stages, maxnreg = variant
    regs = f" r{maxnreg}" if maxnreg else ""
    return f"chunk{chunk} {'tma' if tma else 'ptr'} w{warps} s{stages}{regs}"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="hunyuan,wan,cogvideox")
    p.add_argument("--variants", default="all", help="comma list of labels (see VARIANTS)")
    p.add_argument("--quick", action="store_true", help="a quarter of each shape's tokens")
    p.add_argument("--rep", type=int, default=600, help="do_bench rep in ms")
    return p.parse_args()


def row_sum_error(mass: torch.Tensor, L: int) -> float:
    """Largest |row sum - query rows in the block| / rows over the mass map."""
    nb = mass.shape[-1]
    rows = torch.full((nb,), float(BLOCK), device=mass.device)
    rows[-1] = L - (nb - 1) * BLOCK
    return float(((mass.sum(-1) - rows) / rows).abs().max())


def run_shape(name, args, variants, rows):
    H, D, L, _, _ = SHAPES[name]
    if args.quick:
        L //= 4
    q, k, v = random_qkv(H, L, D)
    scale = D ** -0.5
    _, lse = cudnn_attention.cudnn_attention_with_lse(q, k, v, scale, None)
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        dense_ms = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
                         args.rep)
    rows.append({"shape": name, "what": "dense cuDNN", "ms": dense_ms, "x_cudnn": 1.0})
    default_ms = bench(lambda: cached_search.cached_search(q, k, lse, scale, BLOCK, None), args.rep)
    rows.append({"shape": name, "what": "default (cached_search)", "ms": default_ms,
                 "x_cudnn": default_ms / dense_ms})
    print(f"{name}: H={H} L={L} D={D}; cuDNN dense {dense_ms:.2f} ms; default cached search "
          f"{default_ms:.2f} ms ({default_ms / dense_ms:.3f}x)", flush=True)
    reference = None
    for variant in variants:
        chunk, tma, warps, stages, maxnreg = variant

        def run():
            return cached_search._launch(q, k, lse, scale, BLOCK, None, None, use_tma=tma,
                                         chunk=chunk, num_warps=warps, num_stages=stages,
                                         maxnreg=maxnreg)
        row = {"shape": name, "what": label(variant)}
        try:
            mass = run()
            torch.cuda.synchronize()
        except Exception as exc:  # report, keep the table going
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            print(f"  {row['what']}: {row['error']}", flush=True)
            rows.append(row)
            continue
        if reference is None:
            reference = mass
        row["err_vs_first"] = rel_err(mass, reference)
        row["row_sum_err"] = row_sum_error(mass, L)
        del mass
        row["ms"] = bench(run, args.rep)
        row["x_cudnn"] = row["ms"] / dense_ms
        print(f"  {row['what']:36s} {row['ms']:8.2f} ms  x cuDNN {row['x_cudnn']:.3f}  "
              f"err {row['err_vs_first']:.1e}  row-sum err {row['row_sum_err']:.1e}", flush=True)
        rows.append(row)


def main():
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("research/cached_search_variants.py needs a CUDA device")
    chosen = VARIANTS if args.variants == "all" else [
        v for v in VARIANTS if label(v) in {s.strip() for s in args.variants.split(",")}]
    meta = {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda,
            "command": "python " + " ".join(sys.argv), "block_size": BLOCK, "dtype": "bfloat16",
            "quick": args.quick, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(meta, flush=True)
    rows = []
    for name in [s.strip() for s in args.shapes.split(",") if s.strip()]:
        run_shape(name, args, chosen, rows)
    print("\n| shape | variant | ms | x cuDNN | rel err vs first | row-sum err |\n"
          "|---|---|---:|---:|---:|---:|")
    for r in rows:
        if "ms" not in r:
            print(f"| {r['shape']} | {r['what']} | error | | | |")
            continue
        print(f"| {r['shape']} | {r['what']} | {r['ms']:.2f} | {r['x_cudnn']:.3f} | "
              f"{r.get('err_vs_first', 0):.1e} | {r.get('row_sum_err', 0):.1e} |")
    write_results("cached_search_variants.json", {"meta": meta, "rows": rows})


if __name__ == "__main__":
    main()
