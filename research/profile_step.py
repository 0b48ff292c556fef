"""Profile one sparse-step forward of HunyuanVideo under ``backend="adaspa"`` (issues 3 and 5).

Builds the layer-truncated HunyuanVideo 720p transformer exactly as ``benchmarks/e2e.py`` does
(its own builders: diffusers' model class at full width, random bf16 weights, 2 dual + 4 single
blocks by default, padded text mask), compiles it with ``backend="adaspa"`` and runs the schedule
``search_steps=(1,)``: step 0 dense (compiles), step 1 fused search, then sparse steps:

- step 2: sparse, warmup (kernel JIT);
- step 3: sparse under ``torch.cuda.set_sync_debug_mode("warn")``: every synchronizing CUDA call,
  with the Python lines that made it;
- step 4: sparse under ``torch.profiler``: the top CUDA kernels by total time (count, total ms,
  % of the step's GPU time), the host syncs (``cudaStreamSynchronize`` / ``cudaDeviceSynchronize``
  / ``cudaEventSynchronize`` / ``cudaMemcpy`` calls, and DtoH memcpys) with the ops that made
  them, and copy kernels (``copy_`` / ``clone`` / ``contiguous`` / ``cat`` / memcpy), marked when
  launched inside ``adaspa::attention`` or next to our kernels on the stream;
- step 5: sparse, timed without the profiler.

The timestep tensor of each call is made (and synced) before the measured region, as in a
diffusers pipeline where it is already on the device, so the syncs reported are the model's and
the backend's own.

    python research/profile_step.py                  # one H100, about 1-2 minutes
    python research/profile_step.py --quick          # tiny widths, CPU (profiles CPU ops only)
    python research/profile_step.py --layers 1,1 --sparsity 0.9

Writes ``profile_step.txt``, ``profile_step.json`` and the chrome trace
``profile_step.trace.json.gz`` (skipped when over ``--max-trace-mb``, 16 by default) to ``$OUT``
when set, else to ``benchmarks/results/profile/``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # kernel_speed, e2e, fidelity

import adaspa_compile  # noqa: E402
import e2e  # noqa: E402  (benchmarks/e2e.py: the model builders and the call pattern)

from torch._C._autograd import DeviceType  # noqa: E402

SEARCH_STEPS = (1,)
STEPS = ("warmup", "sync_debug", "profile", "timed")  # the sparse steps after D, F
# Host calls that wait for the device.
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
              "cudaMemcpy", "cudaMemcpy2D", "cudaMemcpyFromSymbol")
COPY_RE = re.compile(r"copy|clone|contiguous|Memcpy|CatArrayBatchedCopy|cat_|_to_copy", re.I)
OURS_RE = re.compile(r"^_(block_sparse|mask_indices|fused_search|cached_search)_kernel")
OUR_OP = "adaspa::attention"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- model
def register_backend() -> str:
    """As ``e2e.main``: the entry point when installed, else register the same function."""
    if "adaspa" in torch._dynamo.list_backends(exclude_tags=()):
        return "entry point"
    from torch._dynamo.backends.registry import register_backend as register

    from adaspa_compile.backend import adaspa_backend

    register(adaspa_backend, name="adaspa")
    return "research/profile_step.py (package not installed)"


def timestep_tensor(t: float, spec, device: torch.device) -> torch.Tensor:
    """``t.expand(batch)`` on the device, made (and synced) before the measured call."""
    step = torch.tensor(t, dtype=spec.timestep_dtype, device=device).expand(spec.batch)
    e2e.sync(device)
    return step


def call(model, kwargs: Dict[str, Any], step: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(**kwargs, timestep=step, return_dict=False)[0]


# ----------------------------------------------------------------------------- sync debug
def sync_debug_call(model, kwargs, step, device) -> List[Dict[str, Any]]:
    """Run one call with CUDA sync debug mode on; one entry per synchronizing call site."""
    seen: Counter = Counter()
    where: Dict[str, List[str]] = {}
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if "synchroniz" not in text.lower():
            return original(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1]
                  if "warnings.py" not in f.filename][-6:]
        key = f"{_short(filename)}:{lineno}"
        seen[key] += 1
        where.setdefault(key, [f"{_short(f.filename)}:{f.lineno} {f.name}" for f in frames]
                         + [text.splitlines()[0][:120]])

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = call(model, kwargs, step)
            del out
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = original
    e2e.sync(device)
    return [{"site": k, "count": n, "stack": where[k]} for k, n in seen.most_common()]


def _short(path: str) -> str:
    p = Path(path)
    parts = p.parts
    for anchor in ("adaspa_compile", "benchmarks", "diffusers", "torch", "triton"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor):])
    return p.name


# ----------------------------------------------------------------------------- profile
def profile_call(model, kwargs, step, device, with_stack: bool):
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts, record_shapes=True, with_stack=with_stack) as prof:
        out = call(model, kwargs, step)
        e2e.sync(device)
    del out
    return prof


def _chain(evt, depth: int = 5) -> str:
    """``op < parent < grandparent``: the CPU ops around an event."""
    names = []
    while evt is not None and len(names) < depth:
        names.append(evt.name)
        evt = getattr(evt, "cpu_parent", None)
    return " < ".join(names)


def _inside(evt, name: str) -> bool:
    while evt is not None:
        if evt.name == name:
            return True
        evt = getattr(evt, "cpu_parent", None)
    return False


def _duration_us(evt) -> float:
    return float(evt.time_range.end - evt.time_range.start)


def analyse(prof, device: torch.device, top: int) -> Dict[str, Any]:
    events = list(prof.events())
    cpu = [e for e in events if e.device_type == DeviceType.CPU and not e.is_async]
    frontend = {e.id: e for e in cpu if getattr(e, "linked_correlation_id", 0) == 0}

    def launcher(dev_evt):
        corr = getattr(dev_evt, "linked_correlation_id", None)
        return frontend.get(corr) if corr else None

    result: Dict[str, Any] = {}
    gpu = sorted((e for e in events if e.device_type == DeviceType.CUDA),
                 key=lambda e: e.time_range.start)
    if gpu:
        wall = max(e.time_range.end for e in gpu) - min(e.time_range.start for e in gpu)
        busy = sum(_duration_us(e) for e in gpu)
        groups: Dict[str, List[Any]] = defaultdict(list)
        for e in gpu:
            groups[e.name].append(e)
        rows = []
        for name, evs in groups.items():
            total = sum(_duration_us(e) for e in evs)
            ops = Counter(_chain(launcher(e), 3) if launcher(e) else "?" for e in evs)
            rows.append({"name": name, "count": len(evs), "total_ms": total / 1e3,
                         "pct_step": 100 * total / wall if wall else 0.0,
                         "launched_by": ops.most_common(1)[0][0]})
        rows.sort(key=lambda r: -r["total_ms"])
        result.update(step_gpu_ms=wall / 1e3, busy_ms=busy / 1e3, kernels=rows[:top],
                      kernel_groups=len(rows), kernel_launches=len(gpu))
        if cpu:  # the GPU is idle when the call starts: host time until its first kernel
            result["host_to_first_kernel_ms"] = \
                (gpu[0].time_range.start - min(e.time_range.start for e in cpu)) / 1e3
        # Copy kernels, and which of them sit inside our op or next to our kernels.
        ours = [i for i, e in enumerate(gpu) if OURS_RE.match(e.name)]
        near = {j for i in ours for j in range(i - 2, i + 3)}
        copies: Dict[str, Dict[str, Any]] = {}
        for i, e in enumerate(gpu):
            if not COPY_RE.search(e.name) or OURS_RE.match(e.name):
                continue
            op = launcher(e)
            c = copies.setdefault(e.name, {"name": e.name, "count": 0, "total_ms": 0.0,
                                           "inside_adaspa_op": 0, "next_to_our_kernels": 0,
                                           "launched_by": Counter()})
            c["count"] += 1
            c["total_ms"] += _duration_us(e) / 1e3
            c["inside_adaspa_op"] += int(op is not None and _inside(op, OUR_OP))
            c["next_to_our_kernels"] += int(i in near)
            c["launched_by"][_chain(op, 4) if op else "?"] += 1
        result["copies"] = sorted(
            ({**c, "launched_by": c["launched_by"].most_common(3)} for c in copies.values()),
            key=lambda c: -c["total_ms"])
        dtoh = [e for e in gpu if "DtoH" in e.name]
        result["dtoh_memcpy"] = [{"launched_by": k, "count": n} for k, n in Counter(
            _chain(launcher(e), 5) if launcher(e) else "?" for e in dtoh).most_common()]
    else:  # CPU run: the ops themselves, by self time
        groups = defaultdict(lambda: [0, 0.0])
        for e in cpu:
            g = groups[e.name]
            g[0] += 1
            g[1] += getattr(e, "self_cpu_time_total", 0.0)
        wall = (max(e.time_range.end for e in cpu) - min(e.time_range.start for e in cpu)) \
            if cpu else 0.0
        rows = [{"name": n, "count": c, "total_ms": t / 1e3,
                 "pct_step": 100 * t / wall if wall else 0.0, "launched_by": "(CPU op, self time)"}
                for n, (c, t) in groups.items()]
        rows.sort(key=lambda r: -r["total_ms"])
        result.update(step_cpu_ms=wall / 1e3, kernels=rows[:top], kernel_groups=len(rows))
        copies = Counter((e.name, _chain(e.cpu_parent, 3) if getattr(e, "cpu_parent", None)
                          else "-") for e in cpu if e.name in ("aten::copy_", "aten::clone",
                                                               "aten::contiguous")
                         and _inside(e, OUR_OP))
        result["copies"] = [{"name": n, "count": k, "inside_adaspa_op": k, "launched_by": [(p, k)]}
                            for (n, p), k in copies.most_common()]
        result["dtoh_memcpy"] = []
    syncs = Counter((e.name, _chain(getattr(e, "cpu_parent", None), 5)) for e in cpu
                    if e.name in SYNC_CALLS)
    result["sync_calls"] = [{"call": c, "inside": p, "count": n} for (c, p), n in
                            syncs.most_common()]
    ours = [e for e in cpu if e.name == OUR_OP]
    result["adaspa_op_host"] = {
        "calls": len(ours),
        "mean_cpu_us": (sum(_duration_us(e) for e in ours) / len(ours)) if ours else None}
    return result


def format_report(meta: Dict[str, Any], res: Dict[str, Any], sync_sites, timings) -> str:
    lines = [f"# sparse-step profile: {meta['model']} ({meta['layers']} layers, {meta['tokens']:,} "
             f"tokens), sparsity {meta['sparsity']}, {meta['device']}, torch {meta['torch']}",
             f"phases seen (branch 0): {meta['phases']}",
             "step times without profiler (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                              timings.items())]
    if "step_gpu_ms" in res:
        lines.append(f"profiled step: GPU span {res['step_gpu_ms']:.1f} ms, kernels busy "
                     f"{res['busy_ms']:.1f} ms, {res['kernel_launches']} launches of "
                     f"{res['kernel_groups']} kernels; host time from the call to its first "
                     f"kernel {res.get('host_to_first_kernel_ms', float('nan')):.2f} ms")
    else:
        lines.append(f"profiled step (CPU): {res.get('step_cpu_ms', 0):.1f} ms of CPU ops")
    host = res["adaspa_op_host"]
    if host["calls"]:
        lines.append(f"{OUR_OP}: {host['calls']} calls, {host['mean_cpu_us']:.0f} us host time "
                     "each (launches included)")
    lines += ["", f"## top {len(res['kernels'])} kernels by total time",
              "| kernel | count | total ms | % of step | launched by |", "|---|---:|---:|---:|---|"]
    for r in res["kernels"]:
        lines.append(f"| {r['name'][:90]} | {r['count']} | {r['total_ms']:.3f} | "
                     f"{r['pct_step']:.2f} | {r['launched_by'][:80]} |")
    lines += ["", "## host syncs",
              f"sync calls in the profiled step: {sum(s['count'] for s in res['sync_calls'])}"]
    for s in res["sync_calls"]:
        lines.append(f"  {s['count']:4d} x {s['call']}  inside: {s['inside'] or '(top level)'}")
    lines.append(f"DtoH memcpys: {sum(d['count'] for d in res['dtoh_memcpy'])}")
    for d in res["dtoh_memcpy"]:
        lines.append(f"  {d['count']:4d} x launched by {d['launched_by']}")
    if sync_sites is None:
        lines.append("sync debug mode: not run (CPU)")
    else:
        lines.append(f"sync debug mode (step before the profiled one): {len(sync_sites)} sites")
        for s in sync_sites:
            lines.append(f"  {s['count']:4d} x {s['site']}")
            lines += [f"         {frame}" for frame in s["stack"]]
    lines += ["", "## copy kernels (flag: inside adaspa::attention, or within 2 launches of our "
              "kernels)"]
    if not res["copies"]:
        lines.append("  none")
    for c in res["copies"]:
        flag = "FLAG " if c.get("inside_adaspa_op") or c.get("next_to_our_kernels") else "     "
        ms = f"{c['total_ms']:.3f} ms" if "total_ms" in c else ""
        lines.append(f"{flag}{c['count']:4d} x {c['name'][:80]} {ms} inside-op "
                     f"{c.get('inside_adaspa_op', 0)}, next-to-ours "
                     f"{c.get('next_to_our_kernels', '-')}")
        for who, n in c["launched_by"]:
            lines.append(f"         {n:4d} from {who}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- driver
def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny widths (CPU smoke test)")
    ap.add_argument("--layers", default=None, help="DUAL,SINGLE blocks (default 2,4; 1,1 quick)")
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--inner-backend", default="inductor", choices=("inductor", "aot_eager",
                                                                     "eager"))
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--with-stack", action="store_true", help="Python stacks in the trace")
    ap.add_argument("--max-trace-mb", type=float, default=16.0)
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default $OUT, else benchmarks/results/profile)")
    args = ap.parse_args(argv)
    layers = args.layers or ("1,1" if args.quick else "2,4")
    dual, single = (int(x) for x in layers.split(","))
    out_dir = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT")
                           else HERE / "results" / "profile")
    out_dir.mkdir(parents=True, exist_ok=True)
    device, dtype = torch.device(args.device), torch.bfloat16
    start = time.perf_counter()

    registered_by = register_backend()
    spec = e2e.hunyuan_spec(args.quick, dual, single)
    log(f"building {spec.name} ({spec.layers_label}, {spec.tokens:,} tokens) on {device}")
    model = e2e.build_model(spec, device, dtype)
    kwargs = spec.inputs(model, device, dtype)[0]
    options = {"sparsity": args.sparsity, "search_steps": SEARCH_STEPS,
               "inner_backend": args.inner_backend}
    if args.quick:
        options["min_seq_len"] = 256
    torch._dynamo.reset()
    adaspa_compile.reset(forget_sites=True)
    compiled = torch.compile(model, backend="adaspa", fullgraph=True, options=options)
    timesteps = e2e.timestep_values(SEARCH_STEPS[-1] + 1 + len(STEPS), spec.timestep_dtype)
    timings: Dict[str, float] = {}
    phases = []
    sync_sites = None
    prof = None
    for i, t in enumerate(timesteps):
        what = "dense+compile" if i == 0 else "fused_search" if i in SEARCH_STEPS else \
            STEPS[i - SEARCH_STEPS[-1] - 1]
        step = timestep_tensor(t, spec, device)
        t0 = time.perf_counter()
        if what == "sync_debug" and device.type == "cuda":
            sync_sites = sync_debug_call(compiled, kwargs, step, device)
        elif what == "profile":
            prof = profile_call(compiled, kwargs, step, device, args.with_stack)
        else:
            ms, out = e2e.timed(device, call, compiled, kwargs, step)
            del out
            timings[what] = ms
        e2e.sync(device)
        phases.append(e2e.site_phase(0))
        log(f"step {i}: {what}, phase {phases[-1]}, {(time.perf_counter() - t0) * 1e3:.0f} ms")
    expected = "D" + "F" + "S" * len(STEPS)
    if "".join(phases) != expected:
        log(f"WARNING: phases {''.join(phases)} != {expected}: the profiled step is not sparse")

    res = analyse(prof, device, args.top)
    report = adaspa_compile.report()
    meta = {"model": spec.name, "layers": spec.layers_label, "tokens": spec.tokens,
            "sparsity": args.sparsity, "quick": args.quick, "options": {k: v for k, v in
                                                                        options.items()},
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "backend_registered_by": registered_by, "phases": "".join(phases),
            "command": "python " + " ".join(sys.argv),
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    text = format_report(meta, res, sync_sites, timings)
    text += "\n\n## adaspa report\n" + str(report)
    print("\n" + text, flush=True)

    (out_dir / "profile_step.txt").write_text(text + "\n")
    payload = {"meta": meta, "timings_ms": timings, "sync_debug": sync_sites, **res}
    (out_dir / "profile_step.json").write_text(json.dumps(payload, indent=1, default=str))
    trace = out_dir / "profile_step.trace.json.gz"
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(trace, "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst)
    mb = trace.stat().st_size / 2**20
    if mb > args.max_trace_mb:
        trace.unlink()
        log(f"chrome trace is {mb:.1f} MB gzipped (> {args.max_trace_mb:g}): not kept")
    else:
        log(f"chrome trace: {trace} ({mb:.2f} MB)")
    log(f"wrote {out_dir}/profile_step.{{txt,json}}; total {time.perf_counter() - start:.0f} s")
    return 0 if "".join(phases) == expected else 1


if __name__ == "__main__":
    sys.exit(main())
