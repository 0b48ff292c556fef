"""Kernel speed: one run, one table (the benchmark shapes of docs, B=1, bf16).

For each shape, in one process on one GPU: cuDNN and flash dense SDPA, our block-sparse kernels
and FlexAttention on the identical block masks (densities 1.0, 0.5, head-adaptive 0.2 = heads at
0.1 / 0.2 / 0.3, and 0.1), the exact search (dense attention+LSE, then the mass) and the
LSE-cached search (the mass alone), plus the mask-to-index conversion (the PyTorch reference
``BlockMask.to_indices`` and the Triton ``mask_to_indices`` kernel that the sparse path runs at
every call, checked equal), a top-k over the mass map and the whole
block selection (``select_blocks``, once per search step and layer). Median times from
``triton.testing.do_bench``; every kernel's output is checked against a reference in the same
run. Inputs are random, in the diffusers layout (BSHD memory viewed as BHSD).

    python benchmarks/kernel_speed.py                 # full lengths, all shapes
    python benchmarks/kernel_speed.py --quick         # a quarter of the tokens
    python benchmarks/kernel_speed.py --shapes hunyuan --tune

Writes JSON to ``benchmarks/results/kernels.json`` and, when set, ``$OUT/kernels.json``.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from adaspa_compile import kernels, ops
from adaspa_compile.blockmask import BlockMask
from adaspa_compile.config import AdaSpaConfig
from adaspa_compile.kernels import dispatch
from adaspa_compile.kernels.cudnn_attention import cudnn_attention_with_lse
from adaspa_compile.selection import BlockLayout, select_blocks

from _common import SHAPES, bench, random_qkv, rel_err, run_meta, write_results

DENSITIES = ("1.0", "0.5", "0.2-tiers", "0.1")


def text_blocks(L: int, bs: int, text: int, where: str, device) -> torch.Tensor:
    nb = -(-L // bs)
    tok = torch.zeros(nb * bs, dtype=torch.bool, device=device)
    if text:
        if where == "last":
            tok[L - text:L] = True
        else:
            tok[:text] = True
    return tok.view(nb, bs).any(-1)


def make_mask(H: int, L: int, bs: int, densities, text_blk: torch.Tensor, seed: int) -> BlockMask:
    """Row-wise top-k of random scores; diagonal and text blocks always kept (docs/method.md,
    Selection)."""
    nb = text_blk.numel()
    device = text_blk.device
    gen = torch.Generator(device=device).manual_seed(seed)
    scores = torch.rand(1, H, nb, nb, device=device, generator=gen)
    forced = torch.eye(nb, dtype=torch.bool, device=device) | text_blk[None, :] | text_blk[:, None]
    scores = scores.masked_fill(forced, 2.0)
    dense = torch.zeros(1, H, nb, nb, dtype=torch.bool, device=device)
    for h in range(H):
        k = max(1, min(nb, round(densities[h] * nb)))
        top = scores[:, h].topk(k, dim=-1).indices
        dense[:, h].scatter_(-1, top, True)
    dense |= forced
    return BlockMask.from_dense(dense, block_size=bs, seq_len=L)


def head_densities(name: str, H: int):
    """Per-head density of a mask named ``"<density>[-...]"``; ``"0.2-tiers..."`` gives a third of
    the heads 0.1, 0.2 and 0.3 each (suffixes such as ``-random`` / ``-local`` are ignored)."""
    if name.startswith("0.2-tiers"):
        return [(0.1, 0.2, 0.3)[h * 3 // H] for h in range(H)]
    return [float(name.split("-")[0])] * H


def flex_block_mask(counts, indices, L, bs, nb):
    from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

    full = torch.zeros(*indices.shape[:3], nb, dtype=torch.int32, device=indices.device)
    full[..., : indices.shape[-1]] = indices
    return FlexBlockMask.from_kv_blocks(counts, full, BLOCK_SIZE=bs, seq_lengths=(L, L),
                                        compute_q_blocks=False)


def run_shape(name, args, flex_fn, rows, checks):
    shape = SHAPES[name]
    H, D, L_full = shape.heads, shape.head_dim, shape.tokens
    text, where = shape.text_tokens, shape.text_position
    L = L_full // 4 if args.quick else L_full
    text = text if L > text else 0
    bs = args.block_size
    nb = -(-L // bs)
    dev = "cuda"
    q, k, v = random_qkv(H, L, D, dev)
    scale = D ** -0.5
    dense_flops = 4.0 * H * L * L * D

    def add(label, ms, flops=None, extra=None):
        row = {"shape": name, "what": label, "ms": ms,
               "tflops": (flops / ms / 1e9) if flops else None}
        row.update(extra or {})
        rows.append(row)
        print(f"  {name:10s} {label:38s} {ms:9.3f} ms", flush=True)

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
        add("dense cuDNN", bench(lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, scale=scale), args.rep), dense_flops)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        add("dense flash", bench(lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, scale=scale), args.rep), dense_flops)

    # The exact search's two halves, and the cached search (the mass alone).
    call = dispatch.Call.of(q, bs, tensors=(q, k, v))
    attn_opts, mass_opts = dispatch.attention_lse_options(call), dispatch.block_mass_options(call)
    out2, lse = kernels.attention_with_lse(q, k, v, scale, None, attn_opts)
    checks.append((name, "attention+LSE vs cuDNN", rel_err(out2, ref)))
    add("ours dense attention+LSE", bench(
        lambda: kernels.attention_with_lse(q, k, v, scale, None, attn_opts), args.rep),
        dense_flops)
    dense_lse = cudnn_attention_with_lse(q, k, v, scale, None)
    if dense_lse is not None:
        checks.append((name, "cuDNN LSE vs ours", rel_err(dense_lse[1], lse)))
        add("cuDNN dense attention+LSE", bench(
            lambda: cudnn_attention_with_lse(q, k, v, scale, None), args.rep), dense_flops)
        # The text tail padded (HunyuanVideo passes a key-padding mask): the bias path.
        key_valid = torch.ones(1, L, dtype=torch.bool, device=dev)
        key_valid[:, L - text // 2:] = False
        padded = cudnn_attention_with_lse(q, k, v, scale, key_valid) if text else None
        if padded is not None:
            _, lse_p = kernels.attention_with_lse(q, k, v, scale, key_valid, attn_opts)
            checks.append((name, "cuDNN padded LSE vs ours", rel_err(padded[1], lse_p)))
            add("cuDNN dense attention+LSE, key padding", bench(
                lambda: cudnn_attention_with_lse(q, k, v, scale, key_valid), args.rep),
                dense_flops)
    out, _, mass = ops.fused_search(q, k, v, scale, bs, None)
    checks.append((name, "exact search out vs cuDNN", rel_err(out, ref)))
    valid_rows = torch.full((nb,), float(bs), device=dev)
    valid_rows[-1] = L - (nb - 1) * bs
    checks.append((name, "mass row sums", rel_err(mass.sum(-1), valid_rows.expand(1, H, nb))))
    add("exact search as the backend runs it (ops)", bench(
        lambda: ops.fused_search(q, k, v, scale, bs, None), args.rep), dense_flops * 1.5)
    del dense_lse
    mass2 = kernels.mass_from_lse(q, k, lse, scale, bs, None, mass_opts)
    checks.append((name, "mass from our LSE vs the exact search's", rel_err(mass2, mass)))
    add("ours cached search (mass)", bench(
        lambda: kernels.mass_from_lse(q, k, lse, scale, bs, None, mass_opts), args.rep),
        dense_flops * 0.5)
    kk = max(1, round(0.2 * nb))
    add(f"topk(k={kk}) over mass map", bench(lambda: torch.topk(mass, kk, dim=-1), args.rep))
    # The whole selection of one search step and layer (sort, recall curve, tiers, packing; one
    # host sync for max_kept), on this run's mass map (random inputs: near-uniform attention).
    span = None if not text else ((L - text, L) if where == "last" else (0, text))
    layout = BlockLayout(seq_len=L, block_size=bs, text_span=span)
    for label, cfg in (("select_blocks s=0.8 tiers", AdaSpaConfig(sparsity=0.8)),
                       ("select_blocks recall=0.95", AdaSpaConfig(mode="recall", recall=0.95))):
        try:
            add(label, bench(lambda: select_blocks(mass, layout, cfg), args.rep))
        except Exception as exc:  # report, keep the table going
            print(f"  {label} failed for {name}: {type(exc).__name__}: {exc}"[:400])
            rows.append({"shape": name, "what": label,
                         "error": f"{type(exc).__name__}: {exc}"[:400]})
    del out, out2, mass2

    text_blk = text_blocks(L, bs, text, where, dev)
    for dname in DENSITIES:
        bm = make_mask(H, L, bs, head_densities(dname, H), text_blk, seed=1)
        counts, indices = bm.to_indices()
        kept = float(counts.sum()) / (H * nb * nb)
        add(f"BlockMask.to_indices d={dname}", bench(bm.to_indices, args.rep))
        kc, ki = kernels.mask_to_indices(bm.bits, bm.num_kv_blocks, bm.max_kept)
        checks.append((name, f"mask_to_indices d={dname} mismatches", float(
            (kc != counts).sum() + (ki != indices).sum())))
        add(f"mask_to_indices kernel d={dname}", bench(
            lambda: kernels.mask_to_indices(bm.bits, bm.num_kv_blocks, bm.max_kept), args.rep),
            None, {"max_kept": bm.max_kept, "index_mb": ki.numel() * 4 / 1e6})
        del kc, ki
        sp_flops = dense_flops * kept
        # The Triton kernel with the options the dispatch gives it, whichever executor it picks.
        plan = dispatch.block_sparse_plan(
            dispatch.Call.of(q, bs, full_mask=bm.is_full, tensors=(q, k, v)), False)
        o = kernels.block_sparse_triton(q, k, v, counts, indices, scale, bs, None, plan.options)
        if dname == "1.0":
            checks.append((name, "sparse d=1.0 vs cuDNN", rel_err(o, ref)))
        add(f"ours block-sparse Triton d={dname} ({kept:.3f})", bench(
            lambda: kernels.block_sparse_triton(q, k, v, counts, indices, scale, bs, None,
                                                plan.options),
            args.rep), sp_flops, {"density": kept})
        # As the backend runs it: index lists from the bits on the GPU, then the executor the
        # dispatch picks (the Gluon kernel on Hopper at head dim 128).
        executor = dispatch.block_sparse_plan(
            dispatch.Call.of(q, bs, full_mask=bm.is_full, tensors=(q, k, v)),
            kernels.GLUON_AVAILABLE).executor
        checks.append((name, f"sparse (ops) d={dname} vs Triton", rel_err(
            ops.sparse_forward(q, k, v, bm, scale, None), o)))
        add(f"ours block-sparse as the backend runs it (ops, {executor}) d={dname}",
            bench(lambda: ops.sparse_forward(q, k, v, bm, scale, None), args.rep),
            sp_flops, {"density": kept, "executor": executor})
        if flex_fn is not None:
            try:
                fbm = flex_block_mask(counts, indices, L, bs, nb)
                kopts = {"BLOCK_M": bs, "BLOCK_N": bs}
                fo = flex_fn(q, k, v, block_mask=fbm, scale=scale, kernel_options=kopts)
                checks.append((name, f"sparse d={dname} vs Flex", rel_err(o, fo)))
                add(f"Flex block-sparse d={dname}", bench(
                    lambda: flex_fn(q, k, v, block_mask=fbm, scale=scale, kernel_options=kopts),
                    args.rep), sp_flops, {"density": kept})
                del fo, fbm
            except Exception as exc:  # report, keep the table going
                print(f"  Flex failed for {name} d={dname}: {type(exc).__name__}: {exc}"[:400])
                rows.append({"shape": name, "what": f"Flex block-sparse d={dname}",
                             "error": f"{type(exc).__name__}: {exc}"[:400]})
        del o, counts, indices, bm
    torch.cuda.empty_cache()


def tune(args):
    """Sweep num_warps / num_stages of the Triton kernels at a quarter of each shape."""
    results = []
    for name in args.shapes:
        H, D, L = SHAPES[name].heads, SHAPES[name].head_dim, SHAPES[name].tokens
        L = L // 4
        bs = args.block_size
        q, k, v = random_qkv(H, L, D)
        scale = D ** -0.5
        call = dispatch.Call.of(q, bs, tensors=(q, k, v))
        _, lse = kernels.attention_with_lse(q, k, v, scale, None,
                                            dispatch.attention_lse_options(call))
        bm = make_mask(H, L, bs, head_densities("0.2-tiers", H),
                       text_blocks(L, bs, 0, "last", "cuda"), seed=1)
        counts, indices = bm.to_indices()
        sparse = dispatch.block_sparse_plan(call, False).options
        mass, attn = dispatch.block_mass_options(call), dispatch.attention_lse_options(call)
        for w, s in [(4, 2), (4, 3), (8, 2), (8, 3)]:
            for kern, fn in [
                ("sparse", lambda: kernels.block_sparse_triton(
                    q, k, v, counts, indices, scale, bs, None,
                    sparse.replace(num_warps=w, num_stages=s))),
                ("mass", lambda: kernels.mass_from_lse(
                    q, k, lse, scale, bs, None, mass.replace(num_warps=w, num_stages=s))),
                ("attn", lambda: kernels.attention_with_lse(
                    q, k, v, scale, None, attn.replace(num_warps=w, num_stages=s))),
            ]:
                try:
                    ms = bench(fn, 200)
                except Exception as exc:
                    ms = float("nan")
                    print(f"tune {name} {kern} w{w} s{s} failed: {type(exc).__name__}"[:200])
                results.append({"shape": name, "L": L, "kernel": kern, "num_warps": w,
                                "num_stages": s, "ms": ms})
                print(f"tune {name:10s} L={L} {kern:10s} warps={w} stages={s} {ms:8.3f} ms",
                      flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a quarter of each shape's tokens")
    ap.add_argument("--shapes", default="hunyuan,wan,cogvideox",
                    help=f"comma list of {sorted(SHAPES)}")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--rep", type=int, default=600, help="do_bench repetition time, ms")
    ap.add_argument("--tune", action="store_true", help="sweep launch configs first")
    ap.add_argument("--no-flex", action="store_true")
    args = ap.parse_args()
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for s in args.shapes:
        if s not in SHAPES:
            ap.error(f"unknown shape {s!r}; choose from {sorted(SHAPES)}")
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernel_speed.py needs a CUDA device")

    run = run_meta()
    meta = {"card": run.pop("device"), **run, "block_size": args.block_size,
            "quick": args.quick, "dtype": "bfloat16", "layout": "BSHD viewed as BHSD"}
    print(meta, flush=True)
    tuning = tune(args) if args.tune else None

    flex_fn = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex_fn = torch.compile(flex_attention, dynamic=False)
    rows, checks = [], []
    for name in args.shapes:
        run_shape(name, args, flex_fn, rows, checks)

    # Ratios to cuDNN dense of the same shape.
    for name in args.shapes:
        base = next(r["ms"] for r in rows if r["shape"] == name and r["what"] == "dense cuDNN")
        for r in rows:
            if r["shape"] == name and r.get("ms"):
                r["x_cudnn"] = r["ms"] / base
    print("\n| shape | what | ms | x cuDNN | TFLOP/s |\n|---|---|---:|---:|---:|")
    for r in rows:
        if "ms" not in r:
            print(f"| {r['shape']} | {r['what']} | error | | |")
            continue
        tf = f"{r['tflops']:.0f}" if r.get("tflops") else ""
        print(f"| {r['shape']} | {r['what']} | {r['ms']:.2f} | {r['x_cudnn']:.3f} | {tf} |")
    print("\nchecks (relative error):")
    for name, what, err in checks:
        print(f"  {name:10s} {what:32s} {err:.2e}")
    payload = {"meta": meta, "rows": rows,
               "checks": [{"shape": s, "what": w, "rel_err": e} for s, w, e in checks],
               "tuning": tuning}
    write_results("kernels.json", payload)
    bad = [c for c in checks if not (c[2] < 2e-2)]
    if bad:
        print(f"CHECK FAILURES: {bad}")
        sys.exit(1)


if __name__ == "__main__":
    main()
