"""Hardware counters of one launch of our kernels under Nsight Compute, for what timing alone has
not explained (benchmarks/RESULTS.md, fifth run): why the head-dim-64 mass pass runs at ~1.3x
the exponential unit's floor when moving exponentials off that unit does not help (issue 5's
CogVideoX search overhead), and what the HunyuanVideo random-mask block-sparse case pays for
that local masks do not (issue 3: 0.34x vs 0.26x cuDNN).

    python research/ncu_kernels.py                        # every target, on a GPU machine
    python research/ncu_kernels.py --targets cached-cogvideox --quick
    python research/ncu_kernels.py --launch sparse-hunyuan-random   # what ncu runs

Each target is profiled in a child process under ``ncu --clock-control none`` (clocks left
alone), one launch after a warm-up launch, with the sections SpeedOfLight, ComputeWorkloadAnalysis,
MemoryWorkloadAnalysis, SchedulerStats, WarpStateStats and Occupancy, then once more for a few
pipe and cache metrics (a metric this ncu does not know is reported, not fatal). The script
prints the lines that say what binds (duration, pipe and issue-slot use, warp stalls, hit rates,
DRAM throughput) and writes every report as CSV to ``$OUT`` (or ``benchmarks/results/ncu/``).

Targets (bf16, B=1, BSHD memory viewed as BHSD, block size 64, the launch configs the backend
uses): ``cached-<shape>`` the LSE-cached search (LSE from cuDNN, or the reference on the CPU),
``sparse-<shape>-random`` / ``sparse-<shape>-local`` the 64-row block-sparse kernel on the
head-adaptive d=0.2 masks of ``kernel_speed.py`` / ``block_sparse_variants.py``.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # kernel_speed, e2e, fidelity

from adaspa_compile import kernels as adaspa_kernels  # noqa: E402
from adaspa_compile import reference  # noqa: E402

SHAPE_NAMES = ("hunyuan", "wan", "cogvideox")
DEFAULT_TARGETS = ("cached-cogvideox", "cached-hunyuan", "sparse-hunyuan-random",
                   "sparse-hunyuan-local", "sparse-cogvideox-random")
KERNEL_NAMES = {"cached": "_cached_search_kernel", "sparse": "_block_sparse_kernel"}
SECTIONS = ("SpeedOfLight", "ComputeWorkloadAnalysis", "MemoryWorkloadAnalysis", "SchedulerStats",
            "WarpStateStats", "Occupancy")
EXTRA_METRICS = ("sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active",
                 "sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active",
                 "sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active",
                 "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active",
                 "lts__t_sector_hit_rate.pct", "dram__bytes_read.sum")
# Report lines whose metric name contains one of these (case-insensitive).
KEYS = ("duration", "throughput", "issue", "ipc", "pipe", "stall", "warp cycles", "hit rate",
        "occupancy", "registers", "eligible", "active warps", "xu", "gmma", "dram", "sector")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS))
    p.add_argument("--launch", default=None, help="build one target and launch it twice")
    p.add_argument("--quick", action="store_true", help="a quarter of each shape's tokens")
    p.add_argument("--tokens", type=int, default=None, help="override the token count")
    p.add_argument("--ncu", default=os.environ.get("NCU", "ncu"), help="the ncu executable")
    p.add_argument("--rotate-period", type=int, default=None,
                   help="sparse targets: the period of the rotated list walk "
                        "(block_sparse._launch(rotate_period=...)); default: the launcher's; "
                        "0: none")
    return p.parse_args()


def parse_target(target: str):
    """``(kernel, shape, mask)`` of ``cached-<shape>`` or ``sparse-<shape>-<random|local>``."""
    parts = target.split("-")
    ok = (len(parts) == 2 and parts[0] == "cached" and parts[1] in SHAPE_NAMES) or (
        len(parts) == 3 and parts[0] == "sparse" and parts[1] in SHAPE_NAMES
        and parts[2] in ("random", "local"))
    if not ok:
        raise SystemExit(f"unknown target {target!r}: use cached-<shape> or "
                         f"sparse-<shape>-<random|local>, shape in {SHAPE_NAMES}")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def _tokens(shape: str, args) -> int:
    from kernel_speed import SHAPES

    if args.tokens:
        return args.tokens
    return SHAPES[shape][2] // (4 if args.quick else 1)


def cached_launch(shape: str, L: int, device: str):
    """The cached search's launch with an LSE of the same inputs."""
    from kernel_speed import SHAPES, random_qkv

    H, D = SHAPES[shape][:2]
    q, k, v = random_qkv(H, L, D, device)
    scale = D ** -0.5
    if device == "cuda":
        from adaspa_compile.kernels.cudnn_attention import cudnn_attention_with_lse

        _, lse = cudnn_attention_with_lse(q, k, v, scale, None)
    else:
        q, k = q.float(), k.float()
        _, lse = reference.attention_with_lse_ref(q, k, k, scale, None)
    return lambda: adaspa_kernels.cached_search(q, k, lse, scale, 64, None)


def sparse_launch(shape: str, mask: str, L: int, device: str, rotate_period=None):
    """The 64-row block-sparse launch on the shape's head-adaptive d=0.2 mask."""
    import block_sparse_variants as variants
    from kernel_speed import SHAPES, head_densities, make_mask, random_qkv, text_blocks

    H, D, _, text, where = SHAPES[shape]
    text = min(text, L // 4)
    q, k, v = random_qkv(H, L, D, device)
    if device != "cuda":
        q, k, v = q.float(), k.float(), v.float()
    densities = head_densities("0.2-tiers", H)
    if mask == "random":
        bm = make_mask(H, L, 64, densities, text_blocks(L, 64, text, where, device), seed=1)
    else:
        grid = variants.SHAPES[shape][2]
        coords, is_text = variants.token_layout(grid, variants.SHAPES[shape][3], where)
        coords, is_text = coords[:L], is_text[:L]
        centroid, text_blk = variants.block_stats(coords, is_text, L, 64)
        bm = variants.make_mask(H, L, 64, densities, centroid, text_blk, True, device)
    counts, indices = adaspa_kernels.mask_indices(bm.bits, bm.num_kv_blocks, bm.max_kept)
    from adaspa_compile.kernels import block_sparse

    return lambda: block_sparse._launch(q, k, v, counts, indices, D ** -0.5, 64, None, None,
                                        rotate_period=rotate_period)


def launch(target: str, args) -> None:
    kernel, shape, mask = parse_target(target)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    L = _tokens(shape, args)
    run = cached_launch(shape, L, device) if kernel == "cached" else \
        sparse_launch(shape, mask, L, device, args.rotate_period)
    for _ in range(2):  # ncu skips the first (compile, warm caches) and profiles the second
        out = run()
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"launched {target}: L={L}, output {tuple(out.shape)}, finite "
          f"{bool(torch.isfinite(out.float()).all())}")


def ncu_csv(args, target: str, extra: list) -> str:
    kernel = parse_target(target)[0]
    cmd = [args.ncu, "--clock-control", "none", "--kernel-name", f"regex:{KERNEL_NAMES[kernel]}",
           "--launch-skip", "1", "--launch-count", "1", "--csv", "--page", "details", *extra,
           sys.executable, str(Path(__file__).resolve()), "--launch", target]
    if args.quick:
        cmd.append("--quick")
    if args.rotate_period is not None:
        cmd += ["--rotate-period", str(args.rotate_period)]
    if args.tokens:
        cmd += ["--tokens", str(args.tokens)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ncu exited {done.returncode}: {(done.stderr or done.stdout)[-800:]}")
    return done.stdout


def metric_rows(text: str):
    """``(section, name, unit, value)`` of ncu's ``--csv --page details`` output."""
    start = text.find('"ID"')
    if start < 0:
        return []
    return [(r.get("Section Name", ""), r.get("Metric Name", ""), r.get("Metric Unit", ""),
             r.get("Metric Value", "")) for r in csv.DictReader(io.StringIO(text[start:]))]


def profile(args) -> None:
    if shutil.which(args.ncu) is None:
        raise SystemExit(f"{args.ncu} not found (Nsight Compute); set --ncu or $NCU")
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else \
        Path(__file__).resolve().parent / "results" / "ncu"
    out_dir.mkdir(parents=True, exist_ok=True)
    for target in [t.strip() for t in args.targets.split(",") if t.strip()]:
        print(f"\n== {target}", flush=True)
        runs = (("sections", [a for s in SECTIONS for a in ("--section", s)]),
                ("metrics", ["--metrics", ",".join(EXTRA_METRICS)]))
        for what, extra in runs:
            try:
                text = ncu_csv(args, target, extra)
            except RuntimeError as exc:  # report, keep the others going
                print(f"  {what}: {exc}", flush=True)
                continue
            (out_dir / f"ncu_{target}_{what}.csv").write_text(text)
            for section, name, unit, value in metric_rows(text):
                if what == "metrics" or any(key in name.lower() for key in KEYS):
                    print(f"  {section[:24]:24s} {name[:52]:52s} {value:>14s} {unit}", flush=True)


def main():
    args = parse_args()
    if args.launch:
        launch(args.launch, args)
    else:
        profile(args)


if __name__ == "__main__":
    main()
