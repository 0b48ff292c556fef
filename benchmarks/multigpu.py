"""Issue 6: AdaSpa under diffusers Ulysses context parallelism, 1 GPU against 2.

Wan2.1-14B at 720p, 81 frames (latent 21 x 90 x 160: 75,600 video tokens, 40 heads x 128), full
width with random bf16 weights, truncated to ``--layers`` blocks, as in ``benchmarks/e2e.py``;
CFG as two calls per step (cond, uncond). Wan, not HunyuanVideo: diffusers 0.42.1 ships a
context-parallel plan (``_cp_plan``) for Wan, whose self-attention is video only (text enters
through cross-attention, which stays local and dense). HunyuanVideo has no plan, and its joint
attention concatenates the text inside the attention processor: see docs/multigpu.md.

Methods, each timed on the same model and inputs:

- ``dense-1``: ``torch.compile(model, fullgraph=True)`` on one GPU (every rank runs it on its own
  GPU at the same time; rank 0's numbers are reported);
- ``adaspa-1``: ``torch.compile(model, backend="adaspa", fullgraph=True)`` on one GPU;
- ``dense-2`` and ``adaspa-2``: the same after ``model.enable_parallelism(config=
  ContextParallelConfig(ulysses_degree=2))`` and ``prepare_context_parallel(model)``, each call
  timed on every rank and the slower rank kept (``fullgraph=False``: on CUDA the output
  all-gather breaks the graph once, after the last block).

adaspa runs one generation with ``search_steps=(2, 3)``: steps D D F C S S S, two calls each; the
first call of each phase (compile, kernel JIT) is left out of its median. The 50-step time is
projected with the default schedule (9 dense, 1 fused, 1 cached, 39 sparse steps; 100 calls).
Quality: PSNR and relative L2 of the 2-GPU output against the 1-GPU output at the same step, same
seed (dense step: only the order of float sums differs; sparse step: plus any mask change).

    torchrun --nproc-per-node 2 benchmarks/multigpu.py               # 2 H100s, about 3-5 min
    torchrun --nproc-per-node 2 benchmarks/multigpu.py --quick       # CPU, gloo, tiny, ~1 min

Prints a table; writes ``$OUT/multigpu.json`` when ``$OUT`` is set (``--json PATH`` as well).
NVLink multicast (NVLS) is turned off (``NCCL_NVLS_ENABLE=0``) unless already set.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist


import adaspa_compile
from adaspa_compile.distributed import prepare_context_parallel

from _common import (PHASE_NAMES, SHAPES, fmt, mean, projected_seconds, rel_err, run_meta, sync,
                     write_json)
from _common import log as _log
from e2e import cast_as_loaded, timestep_values, wan_config, wan_inputs

SEARCH_STEPS = (2, 3)
STEPS = 7  # D D F C S S S
CALLS_PER_STEP = 2  # Wan: CFG as two calls
DENSE_CALLS = 4  # timed calls of a dense method, after the compiling one
KEEP = {"dense": 0, "fused_search": 2, "sparse": 4}  # step whose branch-0 output is compared


def log(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        _log(msg)


# ----------------------------------------------------------------------------- model
def build(cfg: Dict[str, Any], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Random weights (seed 0, so every rank builds the same model); parameters cast to
    ``dtype`` except the modules diffusers keeps in fp32, as ``from_pretrained`` does."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer3DModel(**cfg)
    return cast_as_loaded(model, dtype)


# ----------------------------------------------------------------------------- timing
def call(model, kwargs, t: int, device: torch.device):
    """(ms, output) of one model call, timestep passed as the pipeline does (``t.expand(1)``)."""
    step = torch.tensor(t, dtype=torch.int64, device=device).expand(1)
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(**kwargs, timestep=step, return_dict=False)[0]
    sync(device)
    return (time.perf_counter() - t0) * 1e3, out


def slowest_rank(values: List[float], device: torch.device, parallel: bool) -> List[float]:
    """Per-call times of the slowest rank (parallel methods), else this rank's."""
    if not parallel:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def site_phase(branch: int) -> str:
    letters = {s.phases.get(branch, "")[-1:] for s in adaspa_compile.report().rewritten} - {""}
    return letters.pop() if len(letters) == 1 else "?"


def memory(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def fullgraph(args, parallel: bool) -> bool:
    """One graph on one GPU. Under context parallelism on CUDA, the output all-gather along the
    sequence (funcol ``all_gather_tensor``, dim 1) calls ``torch._utils._maybe_view_chunk_cat``,
    which Dynamo skips (torch 2.11): one graph break after the last block, so no fullgraph."""
    return not parallel


def run_dense(model, ins, ts, args, device, parallel: bool) -> Dict[str, Any]:
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=fullgraph(args, parallel),
                             **({"backend": args.inner} if args.inner != "inductor" else {}))
    first_ms, out0 = call(compiled, ins[0], ts[0], device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = [call(compiled, ins[i % 2], ts[0], device)[0] for i in range(DENSE_CALLS)]
    times = slowest_rank(times, device, parallel)
    ms = statistics.median(times)
    return {"forward_ms": {"dense": ms}, "samples_ms": {"dense": times},
            "projected_50_s": 50 * CALLS_PER_STEP * ms / 1e3, "compile_s": (first_ms - ms) / 1e3,
            "peak_gib": memory(device), "outputs": {"dense": out0.float().cpu()}}


def run_adaspa(model, ins, ts, args, device, parallel: bool) -> Dict[str, Any]:
    torch._dynamo.reset()
    options = {"sparsity": args.sparsity, "search_steps": SEARCH_STEPS}
    if args.quick:
        options.update(min_seq_len=64, inner_backend=args.inner)
    elif args.inner != "inductor":
        options["inner_backend"] = args.inner
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = torch.compile(model, backend="adaspa", fullgraph=fullgraph(args, parallel),
                             options=options)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    phases, times, outputs = [], [], {}
    graphs_after_first = None
    for i in range(STEPS):
        for b, kwargs in enumerate(ins):
            ms, out = call(compiled, kwargs, ts[i], device)
            if graphs_after_first is None:
                graphs_after_first = int(counters["stats"]["unique_graphs"])
            phases.append(site_phase(b))
            times.append(ms)
            for name, step in KEEP.items():
                if step == i and b == 0:
                    outputs[name] = out.float().cpu()
            del out
    times = slowest_rank(times, device, parallel)
    samples: Dict[str, List[float]] = {name: [] for name in PHASE_NAMES.values()}
    seen = set()
    for letter, ms in zip(phases, times):
        if letter not in PHASE_NAMES:
            continue
        if letter in seen:  # the first call of each phase compiles or JITs
            samples[PHASE_NAMES[letter]].append(ms)
        seen.add(letter)
    fwd = {name: statistics.median(xs) if xs else None for name, xs in samples.items()}
    projected = projected_seconds(fwd, CALLS_PER_STEP)
    report = adaspa_compile.report()
    sites = report.rewritten
    return {
        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
        "forward_ms": fwd, "samples_ms": samples, "projected_50_s": projected,
        "phases_seen": "".join(phases[::2]),
        "compile_s": (times[0] - (fwd["dense"] or 0.0)) / 1e3,
        "graphs": int(counters["stats"]["unique_graphs"]),
        "recompiles": int(counters["stats"]["unique_graphs"]) - (graphs_after_first or 0),
        "sites": len(sites), "site_shapes": sorted({s.shape for s in sites}),
        "density": mean(s.mean_density() for s in sites),
        "recall": mean(s.mean_recall() for s in sites),
        "peak_gib": memory(device), "outputs": outputs, "report": str(report),
    }


def psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR of ``out`` against ``ref`` over the reference's value range, in dB."""
    mse = float(((out - ref) ** 2).mean())
    span = float(ref.max() - ref.min())
    return math.inf if mse == 0 else 10 * math.log10(span ** 2 / mse)


# ----------------------------------------------------------------------------- driver
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny Wan on CPU with gloo")
    ap.add_argument("--layers", type=int, default=None, help="blocks built (4; 2 with --quick)")
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--methods", default="dense-1,adaspa-1,dense-2,adaspa-2")
    ap.add_argument("--inner", default=None,
                    help="inner compiler: inductor (default), aot_eager (default with --quick)")
    ap.add_argument("--time-limit", type=float, default=330.0,
                    help="skip methods that would start after this many seconds")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--no-prepare", action="store_true",
                    help="2-GPU methods without prepare_context_parallel (diffusers' hooks "
                         "then split the model into per-block graphs)")
    args = ap.parse_args(argv)
    args.layers = args.layers or (2 if args.quick else 4)
    args.inner = args.inner or ("aot_eager" if args.quick else "inductor")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    return args


def setup(args):
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", rank))
    if world != 2:
        raise SystemExit("run with torchrun --nproc-per-node 2")
    if torch.cuda.is_available() and not args.quick:
        device, dtype = torch.device("cuda", local), torch.bfloat16
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device, dtype = torch.device("cpu"), torch.float32
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
        dist.init_process_group("gloo")
        # diffusers picks `rank % torch.accelerator.device_count()` as the device: none on CPU
        torch.accelerator.device_count = lambda: 1
    return rank, world, device, dtype


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    rank, world, device, dtype = setup(args)
    cfg, latent, text = wan_config(args.quick, args.layers, quick_heads=4)
    tokens = latent[0] * (latent[1] // 2) * (latent[2] // 2)
    log(f"Wan {cfg['num_attention_heads']}x{cfg['attention_head_dim']} heads, {args.layers} "
        f"layers, {tokens:,} video tokens, {device.type} {dtype}, world {world}")
    model = build(cfg, device, dtype)
    ins = wan_inputs(cfg, latent, text, device, dtype)
    ts = timestep_values(STEPS, torch.int64)
    results: Dict[str, Dict[str, Any]] = {}
    parallel_on = False
    for method in args.methods:
        kind, gpus = method.rsplit("-", 1)
        parallel = gpus == "2"
        if time.perf_counter() - start > args.time_limit:
            log(f"{method}: skipped (past --time-limit {args.time_limit:.0f} s)")
            results[method] = {"skipped": "time limit"}
            continue
        if parallel and not parallel_on:
            from diffusers import ContextParallelConfig

            dist.barrier()
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
            if not args.no_prepare:
                prepare_context_parallel(model)  # removes the graph breaks in the blocks
            parallel_on = True
        elif not parallel and parallel_on:
            raise SystemExit("list the 1-GPU methods before the 2-GPU ones")
        log(f"{method}: running")
        run = run_adaspa if kind == "adaspa" else run_dense
        results[method] = run(model, ins, ts, args, device, parallel)
        r = results[method]
        log(f"{method}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in r["forward_ms"].items()
                                      if v is not None)
            + (f", 50 steps {r['projected_50_s']:.1f} s" if r["projected_50_s"] else ""))
    if rank == 0:
        payload = summarise(args, results, cfg, tokens, device, dtype, world)
        print(table(payload))
        write(payload, args)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def summarise(args, results, cfg, tokens, device, dtype, world) -> Dict[str, Any]:
    out: Dict[str, Any] = {
        "config": {"model": "Wan2.1-14B 720p" if not args.quick else "tiny Wan (--quick)",
                   "heads": cfg["num_attention_heads"], "head_dim": cfg["attention_head_dim"],
                   "layers": args.layers, "full_layers": SHAPES["wan"].layers,
                   "video_tokens": tokens,
                   "calls_per_step": CALLS_PER_STEP, "sparsity": args.sparsity,
                   "search_steps_timed": list(SEARCH_STEPS), "ulysses_degree": world,
                   "inner": args.inner, "prepare_context_parallel": not args.no_prepare},
        "run": {**run_meta(device, command=" ".join(sys.argv)), "dtype": str(dtype)},
        "methods": {}, "comparisons": {}}
    for name, r in results.items():
        out["methods"][name] = {k: v for k, v in r.items() if k != "outputs"}
    ok = {n: r for n, r in results.items() if "outputs" in r}

    def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
        return a / b if a and b else None

    comp = out["comparisons"]
    for kind, phase in (("dense", "dense"), ("adaspa", "sparse")):
        one, two = ok.get(f"{kind}-1"), ok.get(f"{kind}-2")
        if one and two:
            speed = ratio(one["forward_ms"][phase], two["forward_ms"][phase])
            comp[f"{kind}: 2-GPU speedup ({phase} forward)"] = speed
            comp[f"{kind}: scaling efficiency ({phase} forward)"] = speed / world if speed else None
            comp[f"{kind}: 2-GPU speedup (50 steps)"] = ratio(one["projected_50_s"],
                                                             two["projected_50_s"])
            for what, ref in one["outputs"].items():
                if what in two["outputs"]:
                    comp[f"{kind}: PSNR dB 2-GPU vs 1-GPU ({what} step)"] = psnr(
                        two["outputs"][what], ref)
                    comp[f"{kind}: rel. L2 2-GPU vs 1-GPU ({what} step)"] = rel_err(
                        two["outputs"][what], ref)
    base = ok.get("dense-1")
    for name in ("adaspa-1", "dense-2", "adaspa-2"):
        if base and name in ok:
            comp[f"{name} vs dense-1 (50 steps)"] = ratio(base["projected_50_s"],
                                                          ok[name]["projected_50_s"])
            comp[f"{name} vs dense-1 (sparse-step forward)"] = ratio(
                base["forward_ms"]["dense"], ok[name]["forward_ms"].get("sparse")
                or ok[name]["forward_ms"]["dense"])
    return out


def table(payload: Dict[str, Any]) -> str:
    c = payload["config"]
    lines = [f"\n{c['model']}: {c['heads']}x{c['head_dim']} heads, {c['layers']} layers, "
             f"{c['video_tokens']:,} tokens, sparsity {c['sparsity']}, {payload['run']['device']}",
             "| method | GPUs | compile s | dense ms | fused ms | cached ms | sparse ms | "
             "50 steps s | density | peak GiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in payload["methods"].items():
        if "skipped" in r:
            lines.append(f"| {name} | - | skipped: {r['skipped']} | | | | | | | |")
            continue
        f = r["forward_ms"]
        lines.append(f"| {name.rsplit('-', 1)[0]} | {name.rsplit('-', 1)[1]} | "
                     f"{fmt(r['compile_s'])} | {fmt(f.get('dense'))} | "
                     f"{fmt(f.get('fused_search'))} | {fmt(f.get('cached_search'))} | "
                     f"{fmt(f.get('sparse'))} | {fmt(r['projected_50_s'])} | "
                     f"{fmt(r.get('density'), '.3f')} | {fmt(r['peak_gib'], '.1f')} |")
    lines.append("")
    for what, v in payload["comparisons"].items():
        lines.append(f"{what}: {fmt(v, '.3f') if v is not None and not math.isinf(v) else v}")
    for name, r in payload["methods"].items():
        if name.startswith("adaspa") and "phases_seen" in r:
            lines.append(f"{name}: phases {r['phases_seen']} (branch 0), graphs {r['graphs']}, "
                         f"recompiles {r['recompiles']}, sites {r['sites']} {r['site_shapes']}")
    return "\n".join(lines)


def write(payload: Dict[str, Any], args) -> None:
    """To ``--json`` when given and ``$OUT/multigpu.json`` when ``$OUT`` is set."""
    for path in write_json(payload, args.json, name="multigpu.json"):
        log(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
