"""Block-sparse kernel variants side by side: 64-row programs vs pair programs that share key
blocks (``kernels/shared_pairs.py``), pointer loads vs tensor descriptors (TMA), launch configs
and the rotated list walk, on the ADASPA.md section 7 shapes.

Masks: density 1.0; head-adaptive 0.2 (heads at 0.1 / 0.2 / 0.3) and 0.1, either random (row-wise
top-k of uniform scores) or *local*: row-wise top-k of a score that falls with the distance
between the blocks' (frame, row, column) centroids on the video grid, plus Gumbel noise, with a
per-head spatial and temporal reach. Random masks are the worst case for pair programs (adjacent
query blocks share few key blocks); local masks have the structure of video attention maps
(`research/pair_inflation.py` measures the pair overlap of real AdaSpa masks). Text blocks and
the diagonal are always kept. ``shared`` = the fraction of kept blocks that both query blocks of
a pair keep (``2 - BlockMask.pair_overhead``).

Every variant's output is checked against the first variant run (and, at density 1.0, against
cuDNN) in the same run, and against fp32 attention on a sample of query blocks (3 heads x 6
blocks, ``exact``). Times are ``triton.testing.do_bench`` medians, bf16, B=1,
BSHD memory viewed as BHSD (the diffusers layout).

    python research/block_sparse_variants.py --shapes hunyuan
    python research/block_sparse_variants.py --shapes wan,cogvideox --quick

Writes ``benchmarks/results/block_sparse_variants.json`` (and ``$OUT/`` when set).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # kernel_speed, e2e, fidelity

from adaspa_compile.blockmask import BlockMask  # noqa: E402
from kernel_speed import bench, head_densities, random_qkv, rel_err, write_results  # noqa: E402

block_sparse = importlib.import_module("adaspa_compile.kernels.block_sparse")
shared_pairs = importlib.import_module("adaspa_compile.kernels.shared_pairs")
mask_indices = importlib.import_module("adaspa_compile.kernels.mask_indices")
hopper = importlib.import_module("adaspa_compile.kernels.block_sparse_hopper")

# name: (heads, head_dim, (frames, rows, cols) of the video grid, text tokens, text position)
SHAPES = {
    "hunyuan": (24, 128, (33, 45, 80), 256, "last"),
    "wan": (40, 128, (21, 45, 80), 0, "last"),
    "cogvideox": (48, 64, (11, 48, 85), 226, "first"),
}
BLOCK = 64
# (program kind, TMA, num_warps, num_stages, layout, rotate period); kind 1: 64-row programs,
# "shared": pair programs (``shared_pairs``); layout "bhsd":
# q, k, v copied to contiguous [B, H, L, D] (a probe of what the BSHD strides cost), else the
# diffusers BSHD view. Rotate period P (``block_sparse._launch(rotate_period=P)``): program p
# starts its walk at the fraction (p mod P) / P of its list, so the ~P programs resident at once
# read K/V in step (ncu: the HunyuanVideo random mask re-reads 204 GB from DRAM at a 49% L2 hit
# rate without it). 0 = no rotation; "auto" = the launcher's default
# (``block_sparse.default_rotate_period``).
VARIANTS = [(1, False, 4, 2, "bshd", 0), (1, False, 4, 3, "bshd", 0),
            (1, True, 4, 2, "bshd", 0), (1, True, 4, 3, "bshd", 0), (1, True, 4, 2, "bhsd", 0)]
VARIANTS += [(1, True, 4, 2, "bshd", p) for p in (132, 264, 396, 528, 660, 792, 1056, "auto")]
VARIANTS += [("shared", True, w, s, "bshd", p) for w, s, p in
             ((4, 2, 0), (4, 2, "auto"), (4, 3, 0), (4, 3, "auto"), (8, 2, "auto"))]
# "split": shared pairs in two launches (``shared_pair_attention(split=True)``): pair programs
# over the shared blocks (rotated with the period given), then rotated 64-row programs over each
# row's own blocks, resuming the softmax state.
VARIANTS += [("split", True, 4, 2, "bshd", p) for p in (0, 396, 528)]
# "hopper": the Gluon 64-row kernel (``block_sparse_hopper``: the next block's scores issued
# with this block's P @ V, both asynchronous wgmmas), always TMA, 4 warps; s = K/V buffers.
# "hopper3": the same with 2 K buffers, 1 V buffer and at most 168 registers, so 3 programs fit
# on an SM instead of 2 (the launcher's default).
VARIANTS += [("hopper", True, 4, s, "bshd", p) for s in (2, 3) for p in (0, "auto")]
VARIANTS += [("hopper3", True, 4, 2, "bshd", p) for p in (0, 396, 792, "auto")]
# "range" (with --key-padding): the key bias only on the kept blocks inside the range of blocks
# that hold a padded key (``block_sparse._launch(bias_range=True)``), not on every block.
RANGE_VARIANTS = {"single-tma w4 s2 rotauto range", "single-tma w4 s2 range"}


def variant_rows():
    """Every variant with its ``bias_range`` flag: the ``VARIANTS`` without, and the 64-row
    TMA ones named in ``RANGE_VARIANTS`` with."""
    rows = [(*v, False) for v in VARIANTS]
    rows += [(*v, True) for v in VARIANTS if f"{variant_label(*v)} range" in RANGE_VARIANTS]
    return rows


def variant_label(qb, tma, w, s, layout, rotate=0) -> str:
    kind = "single" if qb == 1 else qb
    return (f"{kind}{'-tma' if tma else ''} w{w} s{s}"
            f"{' bhsd' if layout == 'bhsd' else ''}{f' rot{rotate}' if rotate else ''}")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="hunyuan,wan,cogvideox")
    p.add_argument("--masks", default="1.0,0.2-tiers-random,0.2-tiers-local,0.1-local")
    p.add_argument("--variants", default="all",
                   help="comma list of variant labels, e.g. 'single-tma w4 s2,pair-tma w4 s2'")
    p.add_argument("--quick", action="store_true", help="a quarter of the frames")
    p.add_argument("--rep", type=int, default=50, help="do_bench rep in ms")
    p.add_argument("--fa4", action="store_true",
                   help="also FlashAttention-4's block-sparse forward (flash-attn-4, CuTe DSL)")
    p.add_argument("--split-estimate", action="store_true",
                   help="also time the two halves of a two-launch pair scheme: pair programs on "
                        "the shared blocks only, then 64-row programs on each row's own blocks")
    p.add_argument("--key-padding", action="store_true",
                   help="also run the text tail half padded (the bias path) for shapes with text")
    return p.parse_args()


def token_layout(grid, text, where):
    """Per token: (frame, row, col) as floats, NaN for text tokens; and the text flags."""
    T, Hh, W = grid
    t, r, c = torch.meshgrid(torch.arange(T), torch.arange(Hh), torch.arange(W), indexing="ij")
    video = torch.stack([t, r, c], -1).reshape(-1, 3).float()
    pad = torch.full((text, 3), float("nan"))
    coords = torch.cat([video, pad]) if where == "last" else torch.cat([pad, video])
    is_text = torch.isnan(coords[:, 0])
    return coords, is_text


def block_stats(coords, is_text, L, bs):
    nb = -(-L // bs)
    padded = torch.nn.functional.pad(coords, (0, 0, 0, nb * bs - L), value=float("nan"))
    centroid = padded.view(nb, bs, 3).nanmean(1)
    text_blk = torch.nn.functional.pad(is_text, (0, nb * bs - L)).view(nb, bs).any(-1)
    return centroid, text_blk


def make_mask(H, L, bs, densities, centroid, text_blk, local, device, seed=1):
    nb = text_blk.numel()
    gen = torch.Generator().manual_seed(seed)
    if local:
        c = torch.nan_to_num(centroid, nan=0.0)
        dt = (c[:, None, 0] - c[None, :, 0]).abs()
        ds = ((c[:, None, 1:] - c[None, :, 1:]) ** 2).sum(-1).sqrt()
    dense = torch.zeros(1, H, nb, nb, dtype=torch.bool)
    forced = torch.eye(nb, dtype=torch.bool) | text_blk[None, :] | text_blk[:, None]
    for h in range(H):
        if local:
            reach_s = 4.0 + 20.0 * torch.rand((), generator=gen)
            reach_t = 1.0 + 8.0 * torch.rand((), generator=gen)
            gumbel = -torch.log(-torch.log(torch.rand(nb, nb, generator=gen).clamp_min(1e-9)))
            scores = -ds / reach_s - dt / reach_t + 0.5 * gumbel
        else:
            scores = torch.rand(nb, nb, generator=gen)
        scores = scores.masked_fill(forced, float("inf"))
        k = max(1, min(nb, round(densities[h] * nb)))
        dense[0, h].scatter_(-1, scores.topk(k, dim=-1).indices, True)
    dense |= forced
    return BlockMask.from_dense(dense.to(device), block_size=bs, seq_len=L)


def fa4_forward():
    """FlashAttention-4's forward (``flash_attn.cute``), or None when it is not installed."""
    try:
        from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
        from flash_attn.cute.interface import _flash_attn_fwd
    except Exception as exc:  # not installed, or the CuTe DSL cannot load
        print(f"FlashAttention-4 unavailable: {type(exc).__name__}: {exc}"[:300])
        return None

    def forward(q, k, v, scale, counts=None, indices=None, nb=None):
        bst = None
        if counts is not None:
            idx = torch.nn.functional.pad(indices, (0, nb - indices.shape[-1]))
            # Kept blocks as FA4's "full" blocks (no mask_mod); no partially masked blocks.
            bst = BlockSparseTensorsTorch(
                mask_block_cnt=torch.zeros_like(counts), mask_block_idx=torch.zeros_like(idx),
                full_block_cnt=counts, full_block_idx=idx, block_size=(BLOCK, BLOCK))
        out = _flash_attn_fwd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                              softmax_scale=scale, block_sparse_tensors=bst)[0]
        return out.transpose(1, 2)
    return forward


def exact_sample(q, k, v, bits, nb, scale, L, key_valid=None):
    """fp32 attention of a sample of query blocks (3 heads x 6 blocks) over their kept key
    blocks: ``(heads, rows, out)``, the yardstick for every variant's error."""
    H = q.shape[1]
    heads = sorted({0, H // 2, H - 1})
    blocks = torch.linspace(0, nb - 1, 6).round().long().tolist()
    rows = torch.cat([torch.arange(b * BLOCK, min(L, (b + 1) * BLOCK)) for b in blocks])
    rows = rows.to(q.device)
    shifts = torch.arange(8, device=q.device)
    outs = []
    for h in heads:
        keep = ((bits[0, h, blocks].long()[..., None] >> shifts) & 1).flatten(1)[:, :nb].bool()
        tok = keep.repeat_interleave(BLOCK, dim=1)[:, :L]
        tok = torch.cat([tok[i].expand(min(L, (b + 1) * BLOCK) - b * BLOCK, L)
                         for i, b in enumerate(blocks)])
        if key_valid is not None:
            tok = tok & key_valid[0][None, :]
        s = (q[0, h, rows].float() @ k[0, h].float().T) * scale
        p = torch.softmax(s.masked_fill(~tok, float("-inf")), dim=-1)
        outs.append(p @ v[0, h].float())
    return heads, rows, torch.stack(outs)


def exact_err(out, sample) -> float:
    heads, rows, ref = sample
    return rel_err(out[0, heads][:, rows], ref)


def timed_row(row, call, base, ref, cudnn_ms, flops, rep, sample=None):
    """Run, check against ``base`` (and ``ref``, and the exact ``sample``), time; failures are
    recorded, not raised."""
    try:
        out = call()
        row["err_vs_single"] = rel_err(out, base) if base is not None else 0.0
        if ref is not None:
            row["err_vs_cudnn"] = rel_err(out, ref)
        if sample is not None:
            row["err_vs_exact"] = exact_err(out, sample)
        ms = bench(call, rep)
        row.update(ms=ms, ratio_cudnn=ms / cudnn_ms,
                   tflops_kept=flops * row.get("density", 1.0) / ms / 1e9)
        print(f"    {row['variant']:24s} pad={row.get('key_padding', False)!s:5s} {ms:9.3f} ms  "
              f"{ms / cudnn_ms:6.3f}x cuDNN  err {row['err_vs_single']:.1e}, exact "
              f"{row.get('err_vs_exact', float('nan')):.1e}", flush=True)
        return out
    except Exception as exc:  # keep the table going
        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        print(f"    {row['variant']:22s} FAILED {row['error'][:200]}", flush=True)
        return None


def run_shape(name, args, rows):
    H, D, grid, text, where = SHAPES[name]
    if args.quick:
        grid = (max(1, grid[0] // 4),) + grid[1:]
    coords, is_text = token_layout(grid, text, where)
    L = coords.shape[0]
    nb = -(-L // BLOCK)
    centroid, text_blk = block_stats(coords, is_text, L, BLOCK)
    dev = "cuda"
    q, k, v = random_qkv(H, L, D, dev)
    contiguous = {}

    def tensors(layout):
        """The BSHD views, or (made once) the same values in contiguous BHSD memory."""
        if layout == "bshd":
            return q, k, v
        if not contiguous:
            contiguous["bhsd"] = tuple(t.contiguous() for t in (q, k, v))
        return contiguous["bhsd"]
    scale = D ** -0.5
    flops = 4.0 * H * L * L * D
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
        cudnn_ms = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, scale=scale), args.rep)
    print(f"{name}: L={L} H={H} D={D} cuDNN dense {cudnn_ms:.2f} ms "
          f"({flops / cudnn_ms / 1e9:.0f} TFLOP/s)", flush=True)
    rows.append({"shape": name, "mask": "dense", "variant": "cuDNN", "ms": cudnn_ms,
                 "ratio_cudnn": 1.0, "L": L, "H": H, "D": D})
    fa4 = fa4_forward() if args.fa4 else None
    if fa4 is not None:
        row = {"shape": name, "mask": "dense", "variant": "FlashAttention-4 dense"}
        timed_row(row, lambda: fa4(q, k, v, scale), ref, ref, cudnn_ms, flops, args.rep)
        rows.append(row)
    paddings = [None]
    if args.key_padding and text:
        kv = torch.ones(1, L, dtype=torch.bool, device=dev)
        start, stop = (L - text // 2, L) if where == "last" else (text // 2, text)
        kv[:, start:stop] = False  # half of the text padded
        paddings.append(kv)
    for mname in args.masks.split(","):
        local = mname.endswith("-local")
        bm = make_mask(H, L, BLOCK, head_densities(mname, H), centroid, text_blk, local, dev)
        counts, indices = mask_indices.mask_indices(bm.bits, nb, bm.max_kept)
        shared_lists = shared_pairs.shared_pair_lists(bm.bits, nb, bm.max_kept)
        shared_frac = float(shared_lists[0][..., 0].sum()) * 2 / float(counts.sum())
        kept = float(counts.sum())
        density = kept / (H * nb * nb)
        pair_build_ms = bench(lambda: shared_pairs.shared_pair_lists(bm.bits, nb, bm.max_kept),
                              args.rep)
        single_build_ms = bench(lambda: mask_indices.mask_indices(bm.bits, nb, bm.max_kept),
                                args.rep)
        print(f"  mask {mname}: density {density:.3f}, shared "
              f"{shared_frac:.3f} of kept blocks, lists "
              f"{single_build_ms:.3f} ms (pairs {pair_build_ms:.3f} ms)", flush=True)
        unpadded = None
        for kv in paddings:
            base = None
            sample = exact_sample(q, k, v, bm.bits, nb, scale, L, kv)
            if mname == "1.0" and kv is None:
                print(f"    cuDNN dense vs exact: {exact_err(ref, sample):.1e}")
            for qb, tma, w, s, layout, rotate, bias_range in variant_rows():
                label = variant_label(qb, tma, w, s, layout, rotate) + (" range" if bias_range
                                                                         else "")
                if args.variants != "all" and label not in args.variants.split(","):
                    continue
                qkv = tensors(layout)
                period = None if rotate == "auto" else rotate

                def call():
                    if qb == "hopper":
                        return hopper.block_sparse_attention_hopper(
                            *qkv, counts, indices, scale, kv, rotate_period=period, k_stages=s,
                            v_stages=s, max_registers=None)
                    if qb == "hopper3":
                        return hopper.block_sparse_attention_hopper(
                            *qkv, counts, indices, scale, kv, rotate_period=period, k_stages=2,
                            v_stages=1, max_registers=168)
                    if qb in ("shared", "split"):
                        return shared_pairs.shared_pair_attention(
                            *qkv, *shared_lists, scale, kv, tma=tma, num_warps=w, num_stages=s,
                            rotate_period=period, split=qb == "split")
                    return block_sparse._launch(*qkv, counts, indices, scale, BLOCK, kv, None,
                                                use_tma=tma, num_warps=w, num_stages=s,
                                                rotate_period=period, bias_range=bias_range)
                row = {"shape": name, "mask": mname, "key_padding": kv is not None,
                       "variant": label, "density": density,
                       "shared_fraction": shared_frac,
                       "lists_ms": single_build_ms if qb == 1 else pair_build_ms}
                out = timed_row(row, call, base, ref if mname == "1.0" and kv is None else None,
                                cudnn_ms, flops, args.rep, sample)
                base = out if base is None else base
                rows.append(row)
            unpadded = base if kv is None else unpadded
        if args.split_estimate:
            rows.extend(split_estimate(name, mname, (q, k, v), shared_lists, nb, scale, cudnn_ms,
                                       args.rep))
        if fa4 is not None:
            row = {"shape": name, "mask": mname, "variant": "FlashAttention-4 block-sparse",
                   "density": density}
            timed_row(row, lambda: fa4(q, k, v, scale, counts, indices, nb), unpadded,
                      ref if mname == "1.0" else None, cudnn_ms, flops, args.rep)
            rows.append(row)
    print_kernel_stats()


def split_estimate(name, mname, qkv, shared_lists, nb, scale, cudnn_ms, rep):
    """Times of the two launches a split pair scheme would make (no state passes between them
    here, so no output is checked): pair programs over the blocks both rows of a pair keep (one
    walk per program, so the rotated walk can keep resident programs in step), then 64-row
    programs over each row's own blocks. Their sum, plus writing and reading the fp32 softmax
    state between them, bounds what the scheme could reach."""
    counts, indices = shared_lists
    both_only = counts.clone()
    both_only[..., 1:] = 0
    own_counts, own_indices = shared_pairs.own_lists(counts, indices, nb)
    period = block_sparse.default_rotate_period(qkv[0])
    parts = {
        "both-only pairs": lambda: shared_pairs.shared_pair_attention(*qkv, both_only, indices,
                                                                      scale, None),
        f"both-only pairs rot{period}": lambda: shared_pairs.shared_pair_attention(
            *qkv, both_only, indices, scale, None, rotate_period=period),
        "own-only 64-row rotauto": lambda: block_sparse._launch(*qkv, own_counts, own_indices,
                                                                scale, BLOCK, None, None),
    }
    rows = []
    for label, call in parts.items():
        call()
        ms = bench(call, rep)
        rows.append({"shape": name, "mask": mname, "variant": f"split part: {label}", "ms": ms,
                     "ratio_cudnn": ms / cudnn_ms})
        print(f"    split part: {label:30s} {ms:9.3f} ms  {ms / cudnn_ms:6.3f}x cuDNN", flush=True)
    return rows


def print_kernel_stats():
    """Registers, spills and shared memory of every block-sparse kernel compiled so far."""
    for fn in (block_sparse._block_sparse_kernel, shared_pairs._shared_pair_kernel,
               hopper._hopper_kernel):
        for cache in fn.device_caches.values():
            for kern in cache[0].values():
                print(f"  {fn.fn.__name__}: {kern.n_regs} registers ({kern.n_spills} spilled), "
                      f"{kern.metadata.shared} B shared, {kern.metadata.num_warps} warps, "
                      f"{kern.metadata.num_stages} stages")


def main():
    args = parse_args()
    rows = []
    for name in args.shapes.split(","):
        run_shape(name, args, rows)
        torch.cuda.empty_cache()
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "triton": triton.__version__, "command": " ".join(sys.argv)}
    write_results("block_sparse_variants.json", {"meta": meta, "rows": rows})
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
