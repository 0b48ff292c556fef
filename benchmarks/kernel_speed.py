"""Kernel speed: one run, one table (the benchmark shapes of docs, B=1, bf16).

For each shape, in one process on one GPU: cuDNN and flash dense SDPA, our block-sparse kernels
and FlexAttention on the identical block masks (densities 1.0, 0.5, 0.2, head-adaptive 0.2 =
heads at 0.1 / 0.2 / 0.3, and 0.1), the exact search (dense attention+LSE, then the mass) and the
LSE-cached search (the mass alone), plus the mask-to-index conversion (the PyTorch reference
``BlockMask.to_indices`` and the Triton ``mask_to_indices`` kernel that the sparse path runs at
every call, checked equal), a top-k over the mass map and the whole
block selection (``select_blocks``, once per search step and layer). At densities 1.0 and 0.2
also ``precision="fp8"`` as the backend runs it (Q, K, V rounded, then the FP8 kernel), the
rounding alone, and the FP8 output's error against the bf16 kernel's. Median times from
``triton.testing.do_bench``; every kernel's output is checked against a reference in the same
run. Inputs are random, in the diffusers layout (BSHD memory viewed as BHSD).

Peers (``--peers``, default all), each imported once a run; one that does not import, or fails
at a call, is a row with its ``error`` (type and message), never the end of the run:

- ``vsa`` (FastVideo's Video Sparse Attention, ``vsa.block_sparse_attn``): on our block masks at
  densities 0.2 and 0.1 (64-token blocks, head dim 128), checked against our output on them.
- ``st-attn`` (Sliding Tile Attention, ``st_attn.sliding_tile_attention``): only on the fixed
  canvases it supports (HunyuanVideo 30 x 48 x 80 + 256 text, Wan 18 x 48 x 80), so at its own
  shape (``hunyuan@sta``, ``wan@sta``, with cuDNN dense there), with the 3D windows of tiles
  nearest 0.2 and 0.1 of the grid, beside our kernel on the same window as a block mask, whose
  output is the reference. Not applicable to CogVideoX.
- ``sageattention`` (``sageattn``, INT8 QK^T, dense, no mask): against cuDNN dense.
- ``cache-dit``: a step cache, not a kernel: a ``not applicable`` row (see benchmarks/e2e.py).

Peers' relative errors are printed and stored (``rel_err``), not failures of the run.

    python benchmarks/kernel_speed.py                 # full lengths, all shapes, all peers
    python benchmarks/kernel_speed.py --quick         # a quarter of the tokens (STA: its canvas)
    python benchmarks/kernel_speed.py --shapes hunyuan --tune
    python benchmarks/kernel_speed.py --peers none    # our kernels, cuDNN and Flex only
    python benchmarks/kernel_speed.py --peers vsa,sageattention
    python benchmarks/kernel_speed.py --shapes hunyuan,wan --densities 1.0,0.2

Writes JSON to ``benchmarks/results/kernels.json`` and, when set, ``$OUT/kernels.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import itertools
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from adaspa_compile import kernels, ops
from adaspa_compile.blockmask import BlockMask
from adaspa_compile.config import AdaSpaConfig
from adaspa_compile.kernels import dispatch
from adaspa_compile.kernels.cudnn_attention import cudnn_attention_with_lse
from adaspa_compile.selection import BlockLayout, select_blocks

from _common import SHAPES, bench, random_qkv, rel_err, run_meta, write_results

DENSITIES = ("1.0", "0.5", "0.2", "0.2-tiers", "0.1")
# Densities with ``precision="fp8"`` rows (where the FP8 kernel runs: head dims 64 and 128).
FP8_DENSITIES = ("1.0", "0.2")
# The FP8 output's relative error against bf16 allowed by the checks: it measured 0.054 on these
# random inputs (near-uniform attention), where rounding V and the probabilities shows most.
FP8_TOLERANCE = 0.08


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


# ----------------------------------------------------------------------------- peers
# Other projects' attention for video DiTs, timed in the same run on the same inputs: the name
# given to --peers (and in the rows) -> the module it imports.
PEERS = {"vsa": "vsa", "st-attn": "st_attn", "sageattention": "sageattention",
         "cache-dit": "cache_dit"}
# Native extensions a peer's package imports inside ``try`` (a failure leaves a None that fails
# later, without the reason): imported here too, so that the probe's row gives the reason.
PEER_EXTENSIONS = {"st-attn": "st_attn_cuda"}
# Peers that are no attention kernel: a row with the reason, never imported here.
NOT_KERNELS = {
    "cache-dit": "a step cache (it reuses transformer blocks' outputs across denoising steps), "
                 "not an attention kernel; its effect is end to end: benchmarks/e2e.py"}
# Masks the block-sparse peers take (VSA: the same block mask as ours, so the same rows).
PEER_DENSITIES = ("0.2", "0.1")
# Sliding Tile Attention runs on fixed latent canvases only (st_attn 0.0.7 asserts the sequence
# length): HunyuanVideo 117 frames 768 x 1280 (30 x 48 x 80, 256 text tokens last) and Wan 69
# frames 768 x 1280 (18 x 48 x 80, no text). Tiles of 6 x 8 x 8 = 384 tokens, tile-major order.
STA_TILE = (6, 8, 8)
STA_CANVAS = {"hunyuan": ((30, 48, 80), 256), "wan": ((18, 48, 80), 0)}


def error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:400]


def show(row: Dict[str, Any]) -> None:
    """One line of the running log for a row: its time, error or why it does not apply."""
    if "ms" in row:
        cell = f"{row['ms']:9.3f} ms"
        if row.get("rel_err") is not None:
            cell += f"  rel err {row['rel_err']:.2e}"
    elif "error" in row:
        cell = f"error: {row['error']}"
    else:
        cell = f"n/a: {row.get('not_applicable', '')}"
    print(f"  {row['shape']:10s} {row['what']:38s} {cell}"[:500], flush=True)


def probe_peers(names: Sequence[str],
                import_module: Callable[[str], Any] = importlib.import_module
                ) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """Import each peer once: ``({name: module}, rows)``, a row for each peer that does not
    import (``error``: the exception's type and message) or is no kernel (``not_applicable``)."""
    modules, rows = {}, []
    for name in names:
        if name in NOT_KERNELS:
            rows.append({"shape": "-", "what": name, "not_applicable": NOT_KERNELS[name]})
            continue
        try:
            module = import_module(PEERS[name])
            if name in PEER_EXTENSIONS:
                import_module(PEER_EXTENSIONS[name])
            modules[name] = module
        except Exception as exc:  # ImportError, a missing CUDA library, a check at import
            rows.append({"shape": "-", "what": f"{name} import ({PEERS[name]})",
                         "error": error_text(exc)})
    return modules, rows


def timed_row(shape: str, what: str, call: Callable[[], torch.Tensor],
              reference: Optional[torch.Tensor], rep: int, flops: Optional[float] = None,
              extra: Optional[Dict[str, Any]] = None,
              timer: Callable[[Callable[[], Any], int], float] = bench) -> Dict[str, Any]:
    """A row for one call: the first call's output against ``reference`` (``rel_err``), then
    its median time (``ms``). Any exception, in the call or the timing, becomes the row's
    ``error``: a peer that fails never ends the run."""
    row = {"shape": shape, "what": what, **(extra or {})}
    try:
        out = call()
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # an asynchronous fault shows here, in this row
        row["rel_err"] = rel_err(out, reference) if reference is not None else None
        del out
        row["ms"] = timer(call, rep)
        row["tflops"] = flops / row["ms"] / 1e9 if flops else None
    except Exception as exc:
        for key in ("ms", "tflops", "rel_err"):
            row.pop(key, None)
        row["error"] = error_text(exc)
    return row


def sage_call(sage, q, k, v, scale) -> Callable[[], torch.Tensor]:
    """SageAttention (``sageattn``, INT8 QK^T, dense, no mask) on BSHD memory (``"NHD"``). It
    subtracts k's mean from k in place (``smooth_k``; softmax does not change), so it gets
    copies."""
    qs, ks, vs = (t.transpose(1, 2).contiguous().clone() for t in (q, k, v))
    return lambda: sage.sageattn(qs, ks, vs, tensor_layout="NHD", is_causal=False,
                                 sm_scale=scale).transpose(1, 2)


def vsa_call(vsa, q, k, v, dense_mask: torch.Tensor, L: int) -> Callable[[], torch.Tensor]:
    """VSA's block-sparse attention (``vsa.block_sparse_attn(q, k, v, block_map,
    variable_block_sizes) -> (out, lse)``): 64-token blocks, q/k/v ``[B, H, S, D]`` with S a
    multiple of 64 (zero padded; ``variable_block_sizes`` holds the valid tokens of each block,
    so the padded keys get no weight), ``block_map`` bool ``[B, H, q blocks, kv blocks]``. Its
    scale is 1/sqrt(D), as ours."""
    nb = dense_mask.shape[-1]
    pad = nb * 64 - L
    qp, kp, vp = (torch.nn.functional.pad(t, (0, 0, 0, pad)).contiguous() for t in (q, k, v))
    sizes = torch.full((nb,), 64, dtype=torch.int32, device=q.device)
    sizes[-1] = L - (nb - 1) * 64
    block_map = dense_mask.contiguous()
    return lambda: vsa.block_sparse_attn(qp, kp, vp, block_map, sizes)[0][:, :, :L]


def sta_window(grid: Sequence[int], density: float) -> Tuple[int, int, int]:
    """The STA window (tiles in t, h, w; odd, as the kernel centres it, and within the tile
    grid) whose share of the grid is nearest ``density``; ties go to the most cubic."""
    sizes = [range(1, g + 1, 2) for g in grid]
    total = grid[0] * grid[1] * grid[2]
    return min(itertools.product(*sizes),
               key=lambda w: (round(abs(w[0] * w[1] * w[2] / total - density), 9), max(w) - min(w),
                              w))


def sta_block_mask(canvas: Sequence[int], window: Sequence[int], text: int, bs: int = 64,
                   tile: Sequence[int] = STA_TILE) -> torch.Tensor:
    """STA's attention pattern as a bool block mask ``[nb, nb]`` of ``bs``-token blocks (tokens
    tile-major, as STA lays them out; the text after the video). A query tile attends to the
    ``window`` of tiles around it, the window's centre held inside the grid; video attends to
    all text, text to everything. Exact at block level when ``bs`` divides the tile and the
    text."""
    per_tile = tile[0] * tile[1] * tile[2]
    grid = [c // t for c, t in zip(canvas, tile)]
    if per_tile % bs or text % bs:
        raise ValueError(f"block size {bs} does not divide the tile ({per_tile}) and text ({text})")
    n_tiles = grid[0] * grid[1] * grid[2]
    ids = torch.arange(n_tiles)
    coords = torch.stack([ids // (grid[1] * grid[2]), ids // grid[2] % grid[1], ids % grid[2]], -1)
    centre = torch.stack([coords[:, d].clamp(window[d] // 2, grid[d] - 1 - window[d] // 2)
                          for d in range(3)], -1)
    tiles = ((centre[:, None, :] - coords[None, :, :]).abs()
             <= torch.tensor([w // 2 for w in window])).all(-1)
    per = per_tile // bs
    video = tiles.repeat_interleave(per, 0).repeat_interleave(per, 1)
    nv, nt = video.shape[0], text // bs
    mask = torch.ones(nv + nt, nv + nt, dtype=torch.bool)
    mask[:nv, :nv] = video
    return mask


def sta_call(sta, q, k, v, window, text: int, canvas: Sequence[int]) -> Callable[[], torch.Tensor]:
    """``st_attn.sliding_tile_attention(q, k, v, window_size, text_length, has_text,
    dit_seq_shape)``: q/k/v ``[B, H, S, D]`` contiguous, one (t, h, w) window in tiles per head,
    the canvas named ``"TxHxW"``."""
    qc, kc, vc = (t.contiguous() for t in (q, k, v))
    name = "x".join(str(c) for c in canvas)
    windows = [tuple(window)] * q.shape[1]
    return lambda: sta.sliding_tile_attention(qc, kc, vc, windows, text, text > 0, name)


def sta_rows(name: str, sta, args, rows: List[Dict[str, Any]]) -> None:
    """STA at its own canvas nearest ``name``'s model (its own shape in the table, with cuDNN
    dense there), beside our kernel on the identical block mask, whose output is the
    reference."""
    shape = SHAPES[name]
    canvas, text = STA_CANVAS[name]
    label = f"{name}@sta"
    L = canvas[0] * canvas[1] * canvas[2] + text
    H, D = shape.heads, shape.head_dim
    q, k, v = random_qkv(H, L, D)
    scale = D ** -0.5
    dense_flops = 4.0 * H * L * L * D
    extra = {"L": L, "canvas": list(canvas), "text_tokens": text}
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        row = timed_row(label, "dense cuDNN", lambda: torch.nn.functional.
                        scaled_dot_product_attention(q, k, v, scale=scale), None, args.rep,
                        dense_flops, extra)
    rows.append(row)
    show(row)
    grid = [c // t for c, t in zip(canvas, STA_TILE)]
    for density in PEER_DENSITIES:
        window = sta_window(grid, float(density))
        dense = sta_block_mask(canvas, window, text, 64).to(q.device)
        bm = BlockMask.from_dense(dense.expand(1, H, *dense.shape).contiguous(), block_size=64,
                                  seq_len=L)
        counts, indices = bm.to_indices()
        kept = float(counts.sum()) / (H * dense.shape[0] ** 2)
        plan = dispatch.block_sparse_plan(dispatch.Call.of(q, 64, tensors=(q, k, v)), False)
        ours = kernels.block_sparse_triton(q, k, v, counts, indices, scale, 64, None, plan.options)
        info = {**extra, "window_tiles": list(window), "density": kept}
        for what, call, ref in (
                (f"ours block-sparse (ops) STA window {window}", lambda: ops.sparse_forward(
                    q, k, v, bm, scale, None), ours),
                (f"st-attn STA window {window}", sta_call(sta, q, k, v, window, text, canvas),
                 ours)):
            row = timed_row(label, what, call, ref, args.rep, dense_flops * kept, info)
            rows.append(row)
            show(row)


def peer_rows(name: str, peers: Dict[str, Any], q, k, v, ref, scale, args,
              rows: List[Dict[str, Any]], dense_flops: float) -> None:
    """The dense peers on this shape's inputs, and STA at its own canvas (where it has one)."""
    shape = SHAPES[name]
    if "sageattention" in peers:
        row = timed_row(name, "sageattention sageattn (INT8 QK, dense)",
                        sage_call(peers["sageattention"], q, k, v, scale), ref, args.rep,
                        dense_flops)
        rows.append(row)
        show(row)
    if "st-attn" in peers:
        why = None
        if name not in STA_CANVAS:
            why = f"st_attn 0.0.7 runs only the canvases {sorted(STA_CANVAS)} of its models"
        elif shape.head_dim != 128 or args.block_size != 64:
            why = "head dim 128 and 64-token blocks only"
        if why:
            row = {"shape": name, "what": "st-attn", "not_applicable": why}
            rows.append(row)
            show(row)
        else:
            sta_rows(name, peers["st-attn"], args, rows)


def parse_peers(text: str, error: Callable[[str], Any]) -> List[str]:
    """``--peers``: ``all``, ``none`` or a comma list of ``PEERS``' names."""
    text = text.strip()
    if text == "all":
        return list(PEERS)
    if text in ("none", ""):
        return []
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        if n not in PEERS:
            error(f"unknown peer {n!r}; choose from {sorted(PEERS)}, 'all' or 'none'")
    return names


def vsa_row(name: str, vsa, q, k, v, bm: BlockMask, L: int, reference, args, flops,
            dname: str, head_dim: int) -> Dict[str, Any]:
    """VSA on our block mask ``bm``, checked against our output on it."""
    what = f"vsa block_sparse_attn d={dname}"
    if args.block_size != 64 or head_dim != 128:
        # VSA's blocks are 64 tokens; its H100 kernel (ThunderKittens) is built for FastVideo's
        # head dim 128 (not called at 64, so that a fault cannot end the run).
        return {"shape": name, "what": what,
                "not_applicable": "64-token blocks and head dim 128 only"}
    return timed_row(name, what, vsa_call(vsa, q, k, v, bm.to_dense(), L), reference,
                     args.rep, flops)


def fp8_rows(name, q, k, v, bm: BlockMask, bf16_out, scale, args, rows, checks, sp_flops,
             kept, add) -> None:
    """``precision="fp8"`` as the backend runs it (rounding Q, K, V, then the FP8 kernel), the
    rounding alone, and the FP8 output's error against the bf16 kernel's on the same mask; a
    failure is a row with its error."""
    dname = f"d={kept:.3f}"
    try:
        out = ops.sparse_forward(q, k, v, bm, scale, None, "fp8")
        checks.append((name, f"sparse FP8 {dname} vs bf16", rel_err(out, bf16_out)))
        add(f"ours block-sparse FP8 (ops, with rounding) {dname}", bench(
            lambda: ops.sparse_forward(q, k, v, bm, scale, None, "fp8"), args.rep), sp_flops,
            {"density": kept, "precision": "fp8"})
        if bm.is_full:
            add("FP8 rounding of q, k, v (quantize_fp8)", bench(
                lambda: kernels.quantize_fp8(q, k, v, args.block_size), args.rep))
    except Exception as exc:  # report, keep the table going
        print(f"  FP8 failed for {name} {dname}: {error_text(exc)}"[:400])
        rows.append({"shape": name, "what": f"ours block-sparse FP8 {dname}",
                     "error": error_text(exc)})


def run_shape(name, args, flex_fn, rows, checks, peers):
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
    for dname in args.densities:
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
        if dname in FP8_DENSITIES:
            fp8_rows(name, q, k, v, bm, o, scale, args, rows, checks, sp_flops, kept, add)
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
        if "vsa" in peers and dname in PEER_DENSITIES:
            row = vsa_row(name, peers["vsa"], q, k, v, bm, L, o, args, sp_flops, dname, D)
            rows.append(row)
            show(row)
        del o, counts, indices, bm
    peer_rows(name, peers, q, k, v, ref, scale, args, rows, dense_flops)
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
        sparse_fp8 = dispatch.block_sparse_plan(dataclasses.replace(call, fp8=True)).options
        mass, attn = dispatch.block_mass_options(call), dispatch.attention_lse_options(call)
        for w, s in [(4, 2), (4, 3), (8, 2), (8, 3)]:
            for kern, fn in [
                ("sparse", lambda: kernels.block_sparse_triton(
                    q, k, v, counts, indices, scale, bs, None,
                    sparse.replace(num_warps=w, num_stages=s))),
                ("sparse-fp8", lambda: kernels.block_sparse_fp8(
                    q, k, v, counts, indices, scale, bs, None,
                    sparse_fp8.replace(num_warps=w, num_stages=s))),
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
    ap.add_argument("--densities", default=",".join(DENSITIES),
                    help=f"comma list of the block-mask densities, of {list(DENSITIES)}")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--peers", default="all",
                    help=f"comma list of {sorted(PEERS)}, 'all' (default) or 'none'")
    args = ap.parse_args()
    args.peers = parse_peers(args.peers, ap.error)
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    args.densities = [d.strip() for d in args.densities.split(",") if d.strip()]
    if not args.densities or set(args.densities) - set(DENSITIES):
        ap.error(f"--densities: choose from {list(DENSITIES)}, got {args.densities}")
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
    peers, rows = probe_peers(args.peers)  # once a run: a row for each that does not import
    for row in rows:
        show(row)
    checks = []
    for name in args.shapes:
        run_shape(name, args, flex_fn, rows, checks, peers)

    # Ratios to cuDNN dense of the same shape (STA's canvases have their own cuDNN row).
    for name in dict.fromkeys(r["shape"] for r in rows):
        base = next((r["ms"] for r in rows if r["shape"] == name and r["what"] == "dense cuDNN"
                     and r.get("ms")), None)
        for r in rows:
            if base and r["shape"] == name and r.get("ms"):
                r["x_cudnn"] = r["ms"] / base
    print("\n| shape | what | ms | x cuDNN | TFLOP/s |\n|---|---|---:|---:|---:|")
    for r in rows:
        if "ms" not in r:
            why = (f"error: {r['error']}" if "error" in r
                   else f"not applicable: {r.get('not_applicable')}")
            print(f"| {r['shape']} | {r['what']} | {why} | | |".replace("\n", " "))
            continue
        if "x_cudnn" not in r:
            r["x_cudnn"] = float("nan")
        tf = f"{r['tflops']:.0f}" if r.get("tflops") else ""
        print(f"| {r['shape']} | {r['what']} | {r['ms']:.2f} | {r['x_cudnn']:.3f} | {tf} |")
    print("\nchecks (relative error):")
    for name, what, err in checks:
        print(f"  {name:10s} {what:32s} {err:.2e}")
    print("\npeers against the reference (relative error; reported, not a failure: "
          "sageattention quantises):")
    for r in rows:
        if r.get("rel_err") is not None:
            print(f"  {r['shape']:10s} {r['what']:40s} {r['rel_err']:.2e}")
    payload = {"meta": meta, "rows": rows,
               "checks": [{"shape": s, "what": w, "rel_err": e} for s, w, e in checks],
               "tuning": tuning, "peers": args.peers}
    write_results("kernels.json", payload)
    bad = [c for c in checks if not (c[2] < (FP8_TOLERANCE if "FP8" in c[1] else 2e-2))]
    if bad:
        print(f"CHECK FAILURES: {bad}")
        sys.exit(1)


if __name__ == "__main__":
    main()
