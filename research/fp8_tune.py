"""FP8 block-sparse kernel: launch configs (block size, warps, stages) at the full HunyuanVideo
and Wan shapes (densities 0.2 and 1.0), beside cuDNN dense and the bf16 executor at the same
block size, in one run; the FP8 output's error against bf16. Prints a table, writes
$OUT/fp8_tune.json.

    python research/fp8_tune.py [--shapes hunyuan,wan] [--rep 200] [--configs 64:4x3,128:8x2]
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from _common import SHAPES, bench, random_qkv, rel_err, run_meta  # noqa: E402
from kernel_speed import make_mask, text_blocks  # noqa: E402

from adaspa_compile import kernels, ops  # noqa: E402
from adaspa_compile.kernels import dispatch  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="hunyuan,wan")
    ap.add_argument("--rep", type=int, default=200)
    ap.add_argument("--configs", default="64:4x2,64:4x3,64:8x2,128:8x2,128:8x3",
                    help="block:warpsxstages,...")
    ap.add_argument("--densities", default="0.2,1.0")
    args = ap.parse_args()
    rows = []
    meta = run_meta()
    print(meta, flush=True)
    for name in args.shapes.split(","):
        sh = SHAPES[name]
        H, D, L = sh.heads, sh.head_dim, sh.tokens
        q, k, v = random_qkv(H, L, D)
        scale = D ** -0.5
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            dense = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, scale=scale), args.rep)
        rows.append({"shape": name, "what": "cuDNN dense", "ms": dense, "ratio": 1.0})
        print(f"{name} cuDNN dense {dense:.2f} ms", flush=True)
        t = bench(lambda: kernels.quantize_fp8(q, k, v, 64), args.rep)
        rows.append({"shape": name, "what": "quantize_fp8", "ms": t, "ratio": t / dense})
        print(f"{name} quantize_fp8 {t:.2f} ms ({t / dense:.4f}x)", flush=True)
        text_blk = {bs: text_blocks(L, bs, sh.text_tokens, sh.text_position, "cuda")
                    for bs in (64, 128)}
        for density in [float(d) for d in args.densities.split(",")]:
            masks, bf16 = {}, {}
            for bs in sorted({int(c.split(":")[0]) for c in args.configs.split(",")}):
                bm = make_mask(H, L, bs, [density] * H, text_blk[bs], seed=1)
                masks[bs] = bm, *bm.to_indices()
                bf16[bs] = ops.sparse_forward(q, k, v, bm, scale, None)
                t = bench(lambda: ops.sparse_forward(q, k, v, bm, scale, None), args.rep)
                rows.append({"shape": name, "what": f"bf16 ops bs={bs} d={density}", "ms": t,
                             "ratio": t / dense})
                print(f"{name} d={density} bs={bs} bf16 (ops) {t:.2f} ms {t / dense:.3f}x",
                      flush=True)
            for cfg in args.configs.split(","):
                bs, ws = cfg.split(":")
                bs = int(bs)
                w, s = (int(x) for x in ws.split("x"))
                bm, counts, indices = masks[bs]
                call = dispatch.Call.of(q, bs, full_mask=bm.is_full, fp8=True)
                opts = dispatch.block_sparse_plan(call).options.replace(num_warps=w, num_stages=s)
                label = f"fp8 bs={bs} w{w}s{s} d={density}"
                try:
                    out = kernels.block_sparse_fp8(q, k, v, counts, indices, scale, bs, None, opts)
                    err = rel_err(out, bf16[bs])
                    t = bench(lambda: kernels.block_sparse_fp8(q, k, v, counts, indices, scale,
                                                               bs, None, opts), args.rep)
                except Exception as exc:
                    print(f"{name} {label} failed: {type(exc).__name__}: {exc}"[:600], flush=True)
                    rows.append({"shape": name, "what": label,
                                 "error": f"{type(exc).__name__}: {exc}"[:600]})
                    continue
                rows.append({"shape": name, "what": label, "ms": t, "ratio": t / dense,
                             "rel_err_vs_bf16": err})
                print(f"{name} {label} {t:.2f} ms {t / dense:.3f}x err {err:.4f}", flush=True)
            del masks, bf16
        del q, k, v
        torch.cuda.empty_cache()
    out = Path(os.environ.get("OUT", ".")) / "fp8_tune.json"
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
