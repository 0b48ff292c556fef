"""Extra work of a "pair" block-sparse kernel on real AdaSpa masks.

    python research/pair_inflation.py                          # 2 CPU cores: about 15 minutes
    python research/pair_inflation.py --resolutions 16x64x64   # the 4k shape only, 1.5 minutes

A pair kernel runs query blocks ``2p`` and ``2p + 1`` together (128 rows at block size 64) over
the union of their kept key-block lists. For a bool mask ``[B, H, nq, nk]``:

- ``kept`` = sum over rows of ``|row|``;
- ``pair_work`` = sum over pairs of ``2 * |row(2p) | row(2p+1)|`` (a last lone row, odd ``nq``,
  counts ``2 * |row|``: the kernel still computes 128 rows);
- ``inflation = pair_work / kept`` (1 = free, 2 = worst).

The masks are the ones the backend really selects: the shipped fidelity model
(``adaspa_compile/fidelity``) samples one held-out (prompt, seed) pair per resolution with CFG
under ``torch.compile(backend="adaspa")`` at each sparsity, with the search steps scaled from the
paper's 9 and 29 of 50 (``--steps 5``: steps 1 and 3, sigma 0.8 and 0.4, as 0.82 and 0.42 in the
paper); after each model call at a search step the mask of every site and CFG branch is read back
from the runtime, and sampling stops after the last search step. The control is, per mask, a
random mask with the same number of kept blocks in every row (expected inflation ``2 - density``).

Inflation is pooled over layers, heads, CFG branches and search steps (``pair_work`` and ``kept``
summed, then divided), overall, per head tier (the target density the head-adaptive selection
gave the head) and for the video part alone (rows and columns of the text block dropped: the text
sink keeps the whole text row and column). Writes ``benchmarks/results/pair_inflation.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # kernel_speed, e2e, fidelity

import adaspa_compile  # noqa: E402
from adaspa_compile.blockmask import pair_union  # noqa: E402
from adaspa_compile.fidelity import load_model, random_captions, sample  # noqa: E402
from adaspa_compile.runtime import get_runtime  # noqa: E402
from adaspa_compile.schedule import scaled_search_steps  # noqa: E402
from adaspa_compile.selection import BlockLayout  # noqa: E402
from fidelity import PROMPT_SEED, parse_shape, shape_name  # noqa: E402
from train_fidelity_model import adaspa_backend_for_compile  # noqa: E402


# ----------------------------------------------------------------------------- the metric
def pair_counts(mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(kept, pair_work)``, int64 ``[B, H]``, of a bool ``[B, H, nq, nk]`` mask."""
    return mask.sum(dim=(-2, -1)), 2 * pair_union(mask).sum(dim=(-2, -1))


def random_like(mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random bool mask keeping as many blocks as ``mask`` in every row, uniformly placed."""
    counts = mask.sum(-1, keepdim=True)
    rank = torch.rand(mask.shape, generator=gen).argsort(-1).argsort(-1)
    return rank < counts


# ----------------------------------------------------------------------------- mask capture
class StopSampling(Exception):
    pass


class MaskProbe:
    """Calls the compiled transformer; after each call at a search step, copies the mask of every
    rewritten site for the current CFG branch; stops sampling after the last search call."""

    def __init__(self, compiled: torch.nn.Module, search_steps: Sequence[int], branches: int):
        self.compiled, self.config = compiled, compiled.config
        self.search_steps, self.branches = tuple(search_steps), branches
        self.masks: List[Dict] = []  # {"step", "branch", "site", "mask": bool [B,H,nq,nk], "text"}

    def parameters(self):
        return self.compiled.parameters()

    def __call__(self, **kwargs):
        out = self.compiled(**kwargs)
        rt = get_runtime()
        step, branch = rt.clock.step, rt.clock.branch
        if step in self.search_steps:
            for row in adaspa_compile.report().rewritten:
                site = rt.site(row.site_id)
                cache = site.caches.get(branch)
                if cache is None or cache.mask is None:
                    continue
                seq_len = cache.mask.seq_len
                layout = BlockLayout(seq_len=seq_len, block_size=cache.mask.block_size,
                                     text_span=site.info.text.tokens(seq_len))
                self.masks.append({"step": step, "branch": branch, "site": row.name,
                                   "mask": cache.mask.to_dense().cpu(),
                                   "text": layout.text_blocks(torch.device("cpu"))})
            if step == self.search_steps[-1] and branch == self.branches - 1:
                raise StopSampling
        return out


def capture(model, shape, sparsity: float, args) -> Tuple[List[Dict], Dict]:
    """Masks of one sampling run under the adaspa backend at ``sparsity``."""
    search = scaled_search_steps(args.steps)
    opts = {"sparsity": sparsity, "search_steps": search, "block_size": args.block_size,
            "min_seq_len": args.min_seq_len, "inner_backend": "eager"}
    torch._dynamo.reset()
    adaspa_compile.reset(forget_sites=True)
    compiled = torch.compile(model.transformer, backend=adaspa_backend_for_compile(),
                             options=opts, dynamic=False, fullgraph=True)
    probe = MaskProbe(compiled, search, branches=2 if args.guidance_scale > 1 else 1)
    prompts = random_captions(args.pairs, seed=PROMPT_SEED)
    t0 = time.perf_counter()
    try:
        sample(probe, model.conditioning(prompts), steps=args.steps, shape=shape,
               seed=list(range(args.pairs)), guidance_scale=args.guidance_scale,
               negative=model.conditioning([""] * args.pairs))
    except StopSampling:
        pass
    info = {"search_steps": list(search), "seconds": round(time.perf_counter() - t0, 1),
            "masks": len(probe.masks)}
    return probe.masks, info


# ----------------------------------------------------------------------------- analysis
def analyse(records: List[Dict], sparsity: float, gen: torch.Generator) -> Dict:
    """Pooled inflation of the captured masks and of their random controls."""
    delta = min((1 - sparsity) / 2, sparsity)
    tiers = sorted({round(1 - s, 4) for s in (sparsity - delta, sparsity, sparsity + delta)})
    sums = defaultdict(lambda: [0, 0])  # (mask kind, group) -> [kept, pair_work]
    heads: Dict[str, int] = defaultdict(int)
    for rec in records:
        mask, video = rec["mask"], ~rec["text"]
        # A head's tier: its video key blocks per row (the budget) over the candidate blocks.
        budget = mask[:, :, video][:, :, :, video].sum(-1).amax(-1) / int(video.sum())
        tier = [[f"tier {min(tiers, key=lambda t: abs(t - d)):g}" for d in row]
                for row in budget.tolist()]
        for name in (t for row in tier for t in row):
            heads[name] += 1
        for kind, m in (("adaspa", mask), ("random", random_like(mask, gen))):
            kept, work = pair_counts(m)
            vkept, vwork = pair_counts(m[:, :, video][:, :, :, video])
            groups = [("all", kept, work), ("video", vkept, vwork),
                      (f"step {rec['step']}", kept, work)]
            groups += [(tier[b][h], kept[b, h], work[b, h])
                       for b in range(len(tier)) for h in range(len(tier[b]))]
            for group, k, w in groups:
                sums[(kind, group)][0] += int(k.sum())
                sums[(kind, group)][1] += int(w.sum())
    out: Dict[str, Dict] = {"adaspa": {}, "random": {}}
    for (kind, group), (kept, work) in sorted(sums.items()):
        out[kind][group] = {"inflation": round(work / max(kept, 1), 4), "kept": kept,
                            "pair_work": work}
    out["heads_per_tier"] = dict(sorted(heads.items()))
    out["mask_shape"] = list(records[0]["mask"].shape)
    out["density"] = round(sum(float(r["mask"].float().mean()) for r in records) / len(records), 4)
    return out


# ----------------------------------------------------------------------------- main
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--resolutions", default="16x64x64,16x128x128",
                   help="comma-separated FRAMESxHEIGHTxWIDTH (4,096 and 16,384 video tokens)")
    p.add_argument("--sparsities", default="0.8,0.9", help="comma-separated target sparsities")
    p.add_argument("--steps", type=int, default=5,
                   help="sampling steps; the search steps scale as 9 and 29 of 50")
    p.add_argument("--pairs", type=int, default=1, help="(prompt, seed) pairs, one batch")
    p.add_argument("--guidance-scale", type=float, default=4.0)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--min-seq-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0, help="seed of the random control masks")
    p.add_argument("--out-json", default=str(ROOT / "benchmarks" / "results" /
                                             "pair_inflation.json"))
    args = p.parse_args(argv)
    args.resolutions = [parse_shape(s) for s in args.resolutions.split(",")]
    args.sparsities = [float(s) for s in args.sparsities.split(",")]
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    model = load_model(dtype=torch.float32)
    gen = torch.Generator().manual_seed(args.seed)
    report: Dict = {"settings": {**{k: v for k, v in vars(args).items() if k != "resolutions"},
                                 "resolutions": [shape_name(s) for s in args.resolutions],
                                 "device": "cpu", "torch": torch.__version__},
                    "results": []}
    for shape in args.resolutions:
        for sparsity in args.sparsities:
            records, info = capture(model, shape, sparsity, args)
            if not records:
                raise SystemExit(f"{shape_name(shape)}: no mask captured (every site dense?)")
            entry = {"resolution": shape_name(shape), "sparsity": sparsity, **info,
                     **analyse(records, sparsity, gen)}
            report["results"].append(entry)
            print(f"{entry['resolution']} sparsity {sparsity:g}: {info['masks']} masks "
                  f"{entry['mask_shape']} in {info['seconds']} s, adaspa "
                  f"{entry['adaspa']['all']['inflation']:.3f}, random "
                  f"{entry['random']['all']['inflation']:.3f}", flush=True)
    torch._dynamo.reset()
    adaspa_compile.reset(forget_sites=True)
    report["seconds_total"] = round(time.perf_counter() - t_start, 1)
    print_table(report)
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out_json, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {args.out_json} in {report['seconds_total']:.0f} s")
    return report


def print_table(report: Dict) -> None:
    print("\n| resolution | density | mask | inflation | video only | per tier (density: "
          "inflation, heads) | per search step |")
    print("|---|---|---|---|---|---|---|")
    for e in report["results"]:
        for kind in ("adaspa", "random"):
            r = e[kind]
            tiers = ", ".join(f"{k[5:]}: {v['inflation']:.3f} ({e['heads_per_tier'][k]})"
                              for k, v in r.items() if k.startswith("tier"))
            steps = ", ".join(f"{k[5:]}: {v['inflation']:.3f}" for k, v in r.items()
                              if k.startswith("step"))
            print(f"| {e['resolution']} | {1 - e['sparsity']:.1f} (achieved {e['density']}) | "
                  f"{kind} | {r['all']['inflation']:.3f} | {r['video']['inflation']:.3f} | "
                  f"{tiers} | {steps} |")


if __name__ == "__main__":
    main()
