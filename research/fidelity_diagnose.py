"""Why AdaSpa's higher recall does not give a higher PSNR: per-step diagnostics on CPU.

    python research/fidelity_diagnose.py --quick           # ~1.5 min on 2 CPU cores
    python research/fidelity_diagnose.py                   # 1 pair, 20 steps, ~8 min
    python research/fidelity_diagnose.py --first-pair 1    # the next (prompt, seed) pair
    python research/fidelity_diagnose.py --drivers adaspa,window --no-velocity   # on-policy
    python research/fidelity_diagnose.py --check-backend --out-json /tmp/c.json  # ~5 min

The trained fidelity model samples the dense trajectory of ``benchmarks/fidelity.py`` (same
prompts, seeds, scheduler, CFG 4, search steps scaled as 9 and 29 of 50). Every
``F.scaled_dot_product_attention`` call of the video self-attention is intercepted (the model's
own dense output is returned, so the trajectory stays dense: "teacher-forced") and, for each
selector configuration, the mask it would have *in use* at that step is chosen exactly as the
runtime chooses it (``selection.select_blocks`` / ``selectors.make_selector`` on the same
q, k, layout; at the later search step AdaSpa's mass uses the LSE cached at the first one), and
measured against the exact attention of that step:

- recall of the mask in use (share of exact attention mass kept), per layer / head / step;
- relative output error ``||O_sparse - O_dense|| / ||O_dense||`` of that attention call;
- ``gap``: error per unit of dropped mass (``mean_r ||e_r|| / mean_r (1 - R_r)``, relative to
  the rms dense output): a row's error is its dropped mass times the distance between the
  dropped values' mean and the kept mean, so a low gap means "what was dropped looked like what
  was kept";
- the CFG combination of the two branches' errors ``||g E_c - (g-1) E_u||`` relative to their
  rms (1 when both branches make the same error, ~sqrt(g^2 + (g-1)^2) = 5 when independent);
- at a few steps, the error of the whole model's CFG velocity when every layer runs sparse with
  the masks in use (one extra cond + uncond forward per configuration, on the dense input);
- at the search steps: per head text-sink and diagonal mass shares, the exact top-k recall
  curve, the head-adaptive tiers and each head's recall and error with and without tiers.

Rows: the per-step measures use a stratified subset of query blocks (``--row-stride``, one in
four by default, every frame and every in-frame position covered, plus the text rows); search
steps select masks from all rows. ``--drivers`` also runs on-policy generations (each
configuration's sparse output fed back, its own trajectory, PSNR vs dense) and
``--check-backend`` compares this emulation with the real ``backend="adaspa"`` at a small shape.

Writes ``benchmarks/results/fidelity_diagnose.json`` (and ``$OUT/fidelity_diagnose.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # kernel_speed, e2e, fidelity

import adaspa_compile  # noqa: E402
from adaspa_compile import ops  # noqa: E402
from adaspa_compile.config import AdaSpaConfig  # noqa: E402
from adaspa_compile.fidelity import (FIDELITY_CONFIG, MAX_TOKENS, WEIGHTS_DIR,  # noqa: E402
                                     load_model, random_captions, sample)
from adaspa_compile.selection import BlockLayout, select_blocks  # noqa: E402
from adaspa_compile.selectors import make_selector  # noqa: E402
from adaspa_compile.state import state_of  # noqa: E402
from fidelity import search_steps_for  # noqa: E402  (benchmarks/fidelity.py)

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

PROMPT_SEED = 10**12 + 4  # benchmarks/fidelity.py's held-out captions

# Each configuration: how the runtime would choose blocks.
#   share_cfg: the uncond branch reuses the cond branch's mask (a diagnostic, not the runtime)
#   fresh: re-selected at every step from that step's exact mass (a staleness-free oracle)
CONFIGS: Dict[str, Dict[str, Any]] = {
    "adaspa": dict(selector="adaspa", head_adaptive=True),
    "adaspa-no-ha": dict(selector="adaspa", head_adaptive=False),
    "window": dict(selector="window", head_adaptive=False),
    "pooled": dict(selector="pooled", head_adaptive=True),
    "pooled-no-ha": dict(selector="pooled", head_adaptive=False),
    "adaspa-no-lse-cache": dict(selector="adaspa", head_adaptive=True, lse_cache=False),
    "adaspa-shared-cfg": dict(selector="adaspa", head_adaptive=True, share_cfg=True),
    "adaspa-no-ha-shared-cfg": dict(selector="adaspa", head_adaptive=False, share_cfg=True),
    "oracle-fresh": dict(selector="adaspa", head_adaptive=False, fresh=True),
}
DEFAULT_CONFIGS = ("adaspa,adaspa-no-ha,window,pooled,adaspa-no-lse-cache,adaspa-shared-cfg,"
                   "oracle-fresh")
VELOCITY_CONFIGS = "adaspa,adaspa-no-ha,window,pooled,adaspa-shared-cfg"


# ----------------------------------------------------------------------------- setup
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--weights", default=str(WEIGHTS_DIR))
    p.add_argument("--quick", action="store_true",
                   help="10 steps, 3 velocity configs at 2 steps: a short but real run")
    p.add_argument("--pairs", type=int, default=1, help="(prompt, seed) pairs")
    p.add_argument("--first-pair", type=int, default=0,
                   help="index of the first pair (fidelity.py's prompts and seeds)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 20; quick 10)")
    p.add_argument("--shape", default="16x64x64", help="FRAMESxHEIGHTxWIDTH pixels")
    p.add_argument("--density", type=float, default=0.2, help="target density of every config")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--guidance-scale", type=float, default=4.0)
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help="teacher-forced configs: " + ", ".join(CONFIGS))
    p.add_argument("--velocity-configs", default=None,
                   help=f"configs of the whole-model velocity error (default {VELOCITY_CONFIGS})")
    p.add_argument("--velocity-steps", default=None,
                   help="comma-separated steps for the velocity error (default: after the first "
                        "search, before and after the second, the last)")
    p.add_argument("--no-velocity", action="store_true")
    p.add_argument("--no-teacher", action="store_true",
                   help="skip the teacher-forced diagnostics (dense reference only)")
    p.add_argument("--row-stride", type=int, default=4,
                   help="per-step measures use one query block in this many (1 = all rows)")
    p.add_argument("--drivers", default="",
                   help="configs to also run on-policy (their sparse output fed back): PSNR and "
                        "recall on their own trajectory")
    p.add_argument("--onpolicy-diag", action="store_true",
                   help="also measure recall / error of the driver's mask on its own trajectory "
                        "(cond branch; ~2 min more per driver)")
    p.add_argument("--cache-dir", default="/tmp/adaspa_fidelity_diagnose",
                   help="dense final clips are cached here for --no-teacher --drivers runs")
    p.add_argument("--merge", action="store_true",
                   help="merge into --out-json when it holds a run with the same settings "
                        "(other pairs): records are concatenated, tables recomputed")
    p.add_argument("--check-backend", action="store_true",
                   help="compare this emulation with backend='adaspa' at --check-shape and exit")
    p.add_argument("--check-shape", default="16x32x32")
    p.add_argument("--check-steps", type=int, default=10)
    p.add_argument("--validate", action="store_true",
                   help="check the emulation's mass and sparse output against adaspa_compile.ops "
                        "on the first search call (~15 s)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out-json", default=str(ROOT / "benchmarks" / "results"
                                             / "fidelity_diagnose.json"))
    args = p.parse_args(argv)
    args.steps = args.steps or (10 if args.quick else 20)
    args.shape = parse_shape(args.shape)
    args.check_shape = parse_shape(args.check_shape)
    args.configs = split(args.configs)
    vel = args.velocity_configs or ("adaspa,window,adaspa-shared-cfg" if args.quick
                                    else VELOCITY_CONFIGS)
    args.velocity_configs = [] if args.no_velocity else split(vel)
    args.drivers = split(args.drivers)
    for name in args.configs + args.velocity_configs + args.drivers:
        if name not in CONFIGS:
            raise SystemExit(f"unknown config {name!r}; valid: {', '.join(CONFIGS)}")
    args.search = search_steps_for(args.steps)
    if args.velocity_steps:
        args.velocity_steps = [int(s) for s in split(args.velocity_steps)]
    elif args.no_velocity:
        args.velocity_steps = []
    else:
        s0, s1, last = args.search[0], args.search[-1], args.steps - 1
        cand = [s0 + 1, s1 - 1, s1 + 1, last] if not args.quick else [s0 + 1, last]
        args.velocity_steps = sorted({s for s in cand if s0 < s < args.steps})
    return args


def split(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_shape(text: str) -> Tuple[int, int, int]:
    f, h, w = (int(v) for v in text.lower().split("x"))
    return f, h, w


def token_grid(shape: Tuple[int, int, int]) -> Tuple[int, int, int]:
    p, pt = FIDELITY_CONFIG["patch_size"], FIDELITY_CONFIG["patch_size_t"]
    return shape[0] // pt, shape[1] // p, shape[2] // p


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    a = (x.float().clamp(-1, 1) + 1) / 2
    b = (ref.float().clamp(-1, 1) + 1) / 2
    return float(10 * torch.log10(1.0 / (a - b).pow(2).mean().clamp(min=1e-10)))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


# ----------------------------------------------------------------------------- attention maths
@dataclass
class Call:
    """One intercepted attention call (batch 1): ``[H, L, D]`` tensors and its layout."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_valid: torch.Tensor  # bool [L]
    scale: float
    layout: BlockLayout
    bs: int

    @property
    def nb(self) -> int:
        return self.layout.num_blocks

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, 0, 0, self.nb * self.bs - x.shape[1]))

    def probs(self, rows: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Exact attention probabilities of ``rows`` (all when None) over the padded keys
        ``[H, R, nb*bs]`` and the rows' LSE ``[H, R]``."""
        q = self.q if rows is None else self.q[:, rows]
        valid = F.pad(self.key_valid, (0, self.nb * self.bs - self.key_valid.shape[0]))
        s = torch.matmul(q, self.padded(self.k).transpose(-1, -2)).mul_(self.scale)
        s.masked_fill_(~valid, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)
        return s.sub_(lse[..., None]).exp_(), lse

    def row_mass(self, p: torch.Tensor) -> torch.Tensor:
        """``[H, R, nb]``: each row's mass per key block."""
        return p.view(p.shape[0], p.shape[1], self.nb, self.bs).sum(-1)

    def block_mass(self, m: torch.Tensor) -> torch.Tensor:
        """``[1, H, nb, nb]`` from the row mass of *all* rows."""
        H, L, nb = m.shape
        m = F.pad(m, (0, 0, 0, nb * self.bs - L))
        return m.view(H, nb, self.bs, nb).sum(2)[None]

    def partial_outputs(self, p: torch.Tensor) -> torch.Tensor:
        """``[H, nb, R, D]``: each row's unnormalised output from each key block."""
        H, R, _ = p.shape
        vb = self.padded(self.v).view(H, self.nb, self.bs, -1)
        return torch.matmul(p.view(H, R, self.nb, self.bs).transpose(1, 2), vb)


def sparse_attention(call: Call, mask: torch.Tensor) -> torch.Tensor:
    """Block-sparse attention ``[H, L, D]`` of ``call`` with bool ``mask [H, nb, nb]``, batched
    over query blocks (same semantics as ``reference.block_sparse_attention_ref``)."""
    H, L, D = call.q.shape
    nb, bs = call.nb, call.bs
    qb = call.padded(call.q).view(H, nb, bs, D)
    kb = call.padded(call.k).view(H, nb, bs, D)
    vb = call.padded(call.v).view(H, nb, bs, D)
    tok_valid = F.pad(call.key_valid, (0, nb * bs - L)).view(nb, bs)
    out = torch.empty(H, nb, bs, D, dtype=call.q.dtype)
    counts = mask.sum(-1)  # [H, nb]
    full = counts == nb
    # Rows that keep every block (the text rows): dense.
    for h in range(H):
        rows = full[h].nonzero().flatten()
        if rows.numel():
            s = torch.matmul(qb[h, rows], kb[h].reshape(nb * bs, D).T) * call.scale
            s = s.masked_fill(~tok_valid.reshape(-1), float("-inf"))
            out[h, rows] = torch.matmul(torch.softmax(s, -1), vb[h].reshape(nb * bs, D))
    part = ~full
    if part.any():
        kmax = int(counts[part].max())
        order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[..., :kmax]
        slot_ok = torch.arange(kmax) < counts[..., None]  # [H, nb, kmax]
        h_idx = torch.arange(H)[:, None, None]
        kg = kb[h_idx, order].reshape(H, nb, kmax * bs, D)
        vg = vb[h_idx, order].reshape(H, nb, kmax * bs, D)
        ok = (tok_valid[order] & slot_ok[..., None]).reshape(H, nb, kmax * bs)
        s = torch.matmul(qb, kg.transpose(-1, -2)).mul_(call.scale)
        s.masked_fill_(~ok[:, :, None, :], float("-inf"))
        o = torch.matmul(torch.softmax(s, -1), vg)
        out = torch.where(part[..., None, None], o, out)
    return out.reshape(H, nb * bs, D)[:, :L]


def sample_rows(nb_video: int, bs: int, L: int, grid: Tuple[int, int, int], stride: int,
                text_span: Tuple[int, int]) -> torch.Tensor:
    """Query rows of one in ``stride`` video blocks, rotating the in-frame position with the
    frame so every position and every frame is covered, plus every text row."""
    frame_tokens = grid[1] * grid[2]
    per_frame = frame_tokens // bs if frame_tokens % bs == 0 else 1
    blocks = [b for b in range(nb_video) if ((b % per_frame) + b // per_frame) % stride == 0]
    rows = [torch.arange(b * bs, min((b + 1) * bs, L)) for b in blocks]
    rows.append(torch.arange(text_span[0] // bs * bs, L))  # blocks touching text
    return torch.unique(torch.cat(rows))


# ----------------------------------------------------------------------------- the hook
@dataclass
class Diag:
    """Rows of one call's exact attention used for the per-step measures."""

    rows: torch.Tensor
    rblock: torch.Tensor  # query block of each row
    m: torch.Tensor  # [H, R, nb] row mass
    u: torch.Tensor  # [H, nb, R, D] partial outputs
    o: torch.Tensor  # [H, R, D] dense output

    def measure(self, mask: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Recall, relative error, gap and the error ``[H, R, D]`` of ``mask [H, nb, nb]``."""
        keep = mask[:, self.rblock, :].float()  # [H, R, nb]
        kept = (keep * self.m).sum(-1)  # [H, R]
        o_s = (self.u * keep.transpose(1, 2)[..., None]).sum(1) / kept.clamp(min=1e-30)[..., None]
        err = o_s - self.o
        e_row = err.norm(dim=-1)
        o_rms = self.o.norm(dim=-1).pow(2).mean(-1).sqrt()
        dropped = (1 - kept).clamp(min=0)
        return {"recall": kept.mean(-1), "rel_err": err.norm(dim=(-2, -1)) / self.o.norm(dim=(-2, -1)),
                "gap": e_row.mean(-1) / dropped.mean(-1).clamp(min=1e-12) / o_rms,
                "err": err}


class Analyzer:
    """Intercepts SDPA; holds masks, cached LSEs and all measurements of one invocation."""

    def __init__(self, args: argparse.Namespace, shape: Tuple[int, int, int]) -> None:
        self.args = args
        self.shape = shape
        self.grid = token_grid(shape)
        self.video_len = self.grid[0] * self.grid[1] * self.grid[2]
        self.L = self.video_len + MAX_TOKENS
        self.bs = args.block_size
        self.text_span = (self.video_len, self.L)
        self.nb = -(-self.L // self.bs)
        self.rows = sample_rows(self.video_len // self.bs, self.bs, self.L, self.grid,
                                args.row_stride, self.text_span)
        self.orig = F.scaled_dot_product_attention
        self.mode = "off"  # off | teacher | sparse | onpolicy
        self.config: Optional[str] = None  # the sparse / onpolicy config
        self.configs: List[str] = list(args.configs)
        self.step = self.branch = self.layer = 0
        self.run = "teacher"
        self.masks: Dict[Tuple, torch.Tensor] = {}
        self.tiers: Dict[Tuple, torch.Tensor] = {}
        self.lse0: Dict[Tuple, torch.Tensor] = {}
        self.pending_err: Dict[Tuple, torch.Tensor] = {}
        self.records: Dict[str, Any] = {}
        self.validation: Dict[str, float] = {}
        self.timing = {"diag_s": 0.0, "select_s": 0.0, "sparse_s": 0.0}

    # ------------------------------------------------------------------ patch
    def __enter__(self) -> "Analyzer":
        torch.nn.functional.scaled_dot_product_attention = self.sdpa
        return self

    def __exit__(self, *exc) -> None:
        torch.nn.functional.scaled_dot_product_attention = self.orig

    def begin_forward(self, step: int, branch: int, mode: str, config: Optional[str] = None,
                      run: str = "teacher") -> None:
        self.step, self.branch, self.layer = step, branch, 0
        self.mode, self.config, self.run = mode, config, run

    def sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
             scale=None, enable_gqa=False):
        if self.mode == "off" or query.shape[2] != self.L or query.shape[0] != 1:
            return self.orig(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                             is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        layer = self.layer
        self.layer += 1
        s = float(scale) if scale is not None else query.shape[-1] ** -0.5
        mask4 = attn_mask
        if mask4 is not None and mask4.dim() != 4:
            mask4 = mask4.reshape((1,) * (4 - mask4.dim()) + tuple(mask4.shape))
        valid = ops.key_valid_from_mask(mask4, 1, self.L)
        valid = torch.ones(self.L, dtype=torch.bool) if valid is None else valid[0]
        layout = BlockLayout(seq_len=self.L, block_size=self.bs, text_span=self.text_span,
                             key_valid=valid[None])
        call = Call(query[0].float(), key[0].float(), value[0].float(), valid, s, layout, self.bs)
        out = self.on_call(layer, call, query, key, value, attn_mask, s)
        return out.to(query.dtype)

    def dense(self, query, key, value, attn_mask, s) -> torch.Tensor:
        return self.orig(query.contiguous(), key.contiguous(), value.contiguous(),
                         attn_mask=attn_mask, scale=s)

    # ------------------------------------------------------------------ per call
    def on_call(self, layer: int, call: Call, query, key, value, attn_mask, s) -> torch.Tensor:
        a = self.args
        s0 = a.search[0]
        step, branch = self.step, self.branch
        if self.mode == "sparse":  # velocity check: every layer sparse with the mask in use
            t = time.perf_counter()
            name = self.config
            if CONFIGS[name].get("fresh"):
                p, _ = call.probs(None)
                mask, _ = self.select(name, call, call.block_mass(call.row_mass(p)), None, p)
                del p
            else:
                mask = self.mask_in_use(self.run, name, layer, branch)
            out = sparse_attention(call, mask)[None]
            self.timing["sparse_s"] += time.perf_counter() - t
            return out
        if step < s0:
            return self.dense(query, key, value, attn_mask, s)
        names = self.configs if self.mode == "teacher" else [self.config]
        search = step in a.search
        diag_branches = (0, 1) if self.mode == "teacher" else (0,)
        need_diag = (self.mode == "teacher" and not a.no_teacher) or \
            (self.mode == "onpolicy" and branch == 0 and a.onpolicy_diag)
        need_full = search or (self.mode == "onpolicy" and CONFIGS[self.config].get("fresh"))
        t = time.perf_counter()
        diag = None
        if need_full:
            p, lse = call.probs(None)
            m = call.row_mass(p)
            exact = call.block_mass(m)
            if step == s0:
                self.lse0[(self.run, layer, branch)] = lse
            ts = time.perf_counter()
            for name in names:
                spec = CONFIGS[name]
                if spec.get("share_cfg") and branch == 1:
                    continue
                if search or spec.get("fresh"):
                    mass = exact
                    if spec["selector"] == "adaspa" and step != s0 and not spec.get("fresh") \
                            and spec.get("lse_cache", True):
                        mass = self.cached_mass(m, lse, self.lse0[(self.run, layer, branch)], call)
                    mask, tiers = self.select(name, call, mass, exact, p)
                    self.masks[(self.run, name, layer, branch)] = mask
                    self.tiers[(self.run, name, layer, branch, step)] = tiers
            self.timing["select_s"] += time.perf_counter() - ts
            if search and branch in diag_branches and need_diag:
                self.search_stats(layer, branch, call, exact, m, lse)
            if a.validate and not self.validation and self.mode == "teacher":
                self.validate(call, lse, exact)
            if need_diag:
                rows = self.rows
                diag = Diag(rows, rows // self.bs, m[:, rows], call.partial_outputs(p[:, rows]),
                            None)
            del p
        elif need_diag:
            p, _ = call.probs(self.rows)
            diag = Diag(self.rows, self.rows // self.bs, call.row_mass(p),
                        call.partial_outputs(p), None)
            del p
        if diag is not None:
            diag.o = diag.u.sum(1)
            self.measure_all(diag, layer, names, call)
        self.timing["diag_s"] += time.perf_counter() - t
        if self.mode == "teacher" or step == s0:
            return self.dense(query, key, value, attn_mask, s)
        t = time.perf_counter()
        out = sparse_attention(call, self.mask_in_use(self.run, self.config, layer, branch))[None]
        self.timing["sparse_s"] += time.perf_counter() - t
        return out

    def mask_in_use(self, run: str, name: str, layer: int, branch: int) -> torch.Tensor:
        b = 0 if CONFIGS[name].get("share_cfg") else branch
        return self.masks[(run, name, layer, b)]

    def cached_mass(self, m: torch.Tensor, lse: torch.Tensor, lse0: torch.Tensor,
                    call: Call) -> torch.Tensor:
        """The runtime's LSE-cached search: block sums of ``exp(s q.k - lse_first_search)``."""
        return call.block_mass(m * torch.exp(lse - lse0)[..., None])

    def select(self, name: str, call: Call, mass: torch.Tensor, exact: Optional[torch.Tensor],
               p: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        spec = CONFIGS[name]
        cfg = AdaSpaConfig(sparsity=round(1 - self.args.density, 6), block_size=self.bs,
                           head_budget="tiers" if spec["head_adaptive"] else "uniform",
                           selector=spec["selector"],
                           video_grid=self.grid if spec["selector"] == "window" else None,
                           min_seq_len=1)
        selector = make_selector(cfg)
        scores = selector.scores(mass, call.q[None], call.k[None], call.scale, call.layout)
        sel = select_blocks(scores, call.layout, selector.cfg)
        return sel.mask.to_dense()[0], sel.target_sparsity[0]

    # ------------------------------------------------------------------ measurements
    def rec(self, *keys) -> Dict:
        d = self.records
        for k in keys:
            d = d.setdefault(k, {})
        return d

    def measure_all(self, diag: Diag, layer: int, names: List[str], call: Call) -> None:
        step, branch = self.step, self.branch
        todo = list(names) + ([] if "oracle-fresh" in names else ["oracle-fresh"])
        for name in todo:
            if CONFIGS[name].get("fresh"):
                # exact row-wise top-k of this step's mass on the sampled rows (rows independent)
                full = torch.zeros(1, call.q.shape[0], self.nb, self.nb)
                bm = torch.zeros(call.q.shape[0], self.nb, self.nb)
                bm.index_add_(1, diag.rblock, diag.m)
                full[0] = bm
                mask, _ = self.select("oracle-fresh", call, full, None, None)
            else:
                mask = self.mask_in_use(self.run, name, layer, branch)
            r = diag.measure(mask)
            label = name
            slot = self.rec(self.run, "per_step", label, f"b{branch}", str(step))
            for key in ("recall", "rel_err", "gap"):
                slot.setdefault(key, [None] * 0)
                slot[key].append([round(float(x), 5) for x in r[key]])
            if self.mode == "teacher":
                if branch == 0:
                    self.pending_err[(label, layer)] = r["err"]
                elif (label, layer) in self.pending_err:
                    g = self.args.guidance_scale
                    e_c = self.pending_err.pop((label, layer))
                    e_u = r["err"]
                    comb = (g * e_c - (g - 1) * e_u).norm(dim=(-2, -1))
                    base = ((e_c.norm(dim=(-2, -1)) ** 2 + e_u.norm(dim=(-2, -1)) ** 2) / 2).sqrt()
                    corr = (e_c * e_u).sum(dim=(-2, -1)) / (
                        e_c.norm(dim=(-2, -1)) * e_u.norm(dim=(-2, -1))).clamp(min=1e-30)
                    slot = self.rec(self.run, "cfg", label, str(step))
                    slot.setdefault("amplification", []).append(
                        [round(float(x), 4) for x in comb / base.clamp(min=1e-30)])
                    slot.setdefault("corr", []).append([round(float(x), 4) for x in corr])

    def search_stats(self, layer: int, branch: int, call: Call, exact: torch.Tensor,
                     m: torch.Tensor, lse: torch.Tensor) -> None:
        """Per head at a search step: mass shares, top-k curve, tiers, HA recall and error."""
        W = exact[0]  # [H, nb, nb]
        total = W.sum(dim=(-2, -1))
        text_blocks = call.layout.text_blocks(W.device)
        forced = text_blocks[:, None] | text_blocks[None, :]
        eye = torch.eye(self.nb, dtype=torch.bool) & ~forced
        vid_rows = ~text_blocks
        out: Dict[str, Any] = {
            "text_share": (W * forced).sum(dim=(-2, -1)) / total,
            "video_to_text_share": W[:, vid_rows][:, :, text_blocks].sum(dim=(-2, -1))
            / W[:, vid_rows].sum(dim=(-2, -1)),
            "diag_share": (W * eye).sum(dim=(-2, -1)) / total,
            "lse_mean": lse.mean(-1),
        }
        curve = {}
        for d in sorted({0.05, 0.1, 0.2, 0.3, 0.5, self.args.density}):
            cfg = AdaSpaConfig(sparsity=1 - d, block_size=self.bs, head_budget="uniform")
            curve[str(d)] = select_blocks(exact, call.layout, cfg).recall[0]
        out["topk_recall"] = curve
        cfg = AdaSpaConfig(block_size=self.bs, mode="recall", recall=0.9)
        out["density_for_recall_0.9"] = select_blocks(exact, call.layout, cfg).density[0]
        # head-adaptive: tiers from the mass the runtime uses (cached at later search steps) and
        # from the exact mass of this step
        step = self.step
        for name in self.configs:
            spec = CONFIGS[name]
            if not spec["head_adaptive"] or (spec.get("share_cfg") and branch == 1):
                continue
            tiers = self.tiers.get((self.run, name, layer, branch, step))
            if tiers is not None:
                out[f"tiers[{name}]"] = tiers
        if "adaspa" in self.configs and step != self.args.search[0]:
            _, fresh = self.select("adaspa", call, exact, exact, None)
            out["tiers[adaspa, exact mass of this step]"] = fresh
        slot = self.rec(self.run, "search", str(step), f"b{branch}")
        for key, val in out.items():
            if isinstance(val, dict):
                for d, v in val.items():
                    slot.setdefault(key, {}).setdefault(d, []).append(
                        [round(float(x), 4) for x in v])
            else:
                slot.setdefault(key, []).append([round(float(x), 4) for x in val])

    def validate(self, call: Call, lse: torch.Tensor, exact: torch.Tensor) -> None:
        """The emulation's mass and sparse output vs adaspa_compile.ops (reference kernels)."""
        q, k, v = call.q[None], call.k[None], call.v[None]
        kv = call.key_valid[None]
        out, lse_ref = ops.attention_with_lse(q, k, v, scale=call.scale, key_padding_mask=kv)
        mass = ops.block_mass(q, k, lse_ref, block_size=self.bs, scale=call.scale,
                              key_padding_mask=kv)
        name = "adaspa" if any(k[1] == "adaspa" for k in self.masks) else None
        mask = next(v for kk, v in self.masks.items() if kk[1] == name) if name else \
            next(iter(self.masks.values()))
        ref = ops.block_sparse_attention(q, k, v, mask[None], block_size=self.bs,
                                         scale=call.scale, key_padding_mask=kv)[0]
        mine = sparse_attention(call, mask)
        self.validation = {"lse_max_abs_diff": float((lse - lse_ref[0]).abs().max()),
                           "mass_max_abs_diff": float((exact - mass).abs().max()),
                           "sparse_rel_diff": rel(mine, ref)}


# ----------------------------------------------------------------------------- driving
class Probe:
    """Stands in for the transformer inside ``sample``: tells the analyzer the step and branch of
    each call, and at velocity steps runs the extra sparse forwards."""

    def __init__(self, model: torch.nn.Module, an: Analyzer, mode: str, name: Optional[str],
                 run: str, velocity: Optional[Dict] = None, bar=None) -> None:
        self.model, self.an, self.mode, self.name, self.run = model, an, mode, name, run
        self.config = model.config  # sample() reads it
        self.calls = 0
        self.velocity = velocity
        self.bar = bar
        self.cond_out: Optional[torch.Tensor] = None
        self.cond_kwargs: Optional[Dict] = None

    def parameters(self):
        return self.model.parameters()

    def __call__(self, **kwargs):
        step, branch = divmod(self.calls, 2)
        self.calls += 1
        self.an.begin_forward(step, branch, self.mode, self.name, self.run)
        out = self.model(**kwargs)
        self.an.mode = "off"
        if self.bar is not None:
            self.bar.update(1)
        if self.velocity is not None and step in self.an.args.velocity_steps:
            if branch == 0:
                self.cond_out, self.cond_kwargs = out[0], kwargs
            else:
                self.velocity_errors(step, kwargs, out[0])
        return out

    def velocity_errors(self, step: int, uncond_kwargs: Dict, uncond: torch.Tensor) -> None:
        g = self.an.args.guidance_scale
        dense = uncond + g * (self.cond_out - uncond)
        for name in self.an.args.velocity_configs:
            outs = []
            for branch, kw in ((0, self.cond_kwargs), (1, uncond_kwargs)):
                self.an.begin_forward(step, branch, "sparse", name, self.run)
                outs.append(self.model(**kw)[0])
                self.an.mode = "off"
                if self.bar is not None:
                    self.bar.update(1)
            c, u = outs
            cfg = u + g * (c - u)
            self.velocity.setdefault(str(step), {})[name] = {
                "cond": round(rel(c, self.cond_out), 5), "uncond": round(rel(u, uncond), 5),
                "cfg": round(rel(cfg, dense), 5)}


def generate(model, an: Analyzer, cond, negative, seed: int, steps: int, mode: str,
             config: Optional[str], run: str, velocity=None, bar=None) -> torch.Tensor:
    probe = Probe(model.transformer, an, mode, config, run, velocity, bar)
    with an:
        return sample(probe, cond, steps=steps, shape=an.shape, seed=seed,
                      guidance_scale=an.args.guidance_scale, negative=negative)


# ----------------------------------------------------------------------------- summaries
def mean(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else None


def flat(nested) -> List[float]:
    if isinstance(nested, (list, tuple)):
        return [v for x in nested for v in flat(x)]
    return [nested]


def summarise(by_pair: Dict[str, Dict[str, Any]], args: argparse.Namespace) -> Dict[str, Any]:
    """Means over pairs, layers, heads and both branches per config and step."""
    out: Dict[str, Any] = {}
    acc: Dict[str, Dict[str, Dict[str, List[float]]]] = {}
    amp: Dict[str, List[float]] = {}
    corr: Dict[str, List[float]] = {}
    for records in by_pair.values():
        for name, branches in records.get("per_step", {}).items():
            for b, steps in branches.items():
                for step, slot in steps.items():
                    for key in ("recall", "rel_err", "gap"):
                        acc.setdefault(name, {}).setdefault(key, {}).setdefault(step, []).extend(
                            flat(slot[key]))
        for name, steps in records.get("cfg", {}).items():
            for slot in steps.values():
                amp.setdefault(name, []).extend(flat(slot["amplification"]))
                corr.setdefault(name, []).extend(flat(slot["corr"]))
    for name, keys in acc.items():
        out.setdefault("per_step", {})[name] = {
            key: {s: round(mean(v), 4) for s, v in sorted(steps.items(), key=lambda x: int(x[0]))}
            for key, steps in keys.items()}
    out["cfg_amplification"] = {n: round(mean(v), 3) for n, v in amp.items()}
    out["cfg_error_corr"] = {n: round(mean(v), 3) for n, v in corr.items()}
    return out


def _spans(args: argparse.Namespace) -> List[Tuple[int, List[str]]]:
    """Each search step and the steps its mask is in use."""
    ends = list(args.search[1:]) + [args.steps]
    return [(s, [str(t) for t in range(s, e)]) for s, e in zip(args.search, ends)]


def head_adaptive_table(by_pair: Dict[str, Dict[str, Any]],
                        args: argparse.Namespace) -> Dict[str, Any]:
    """Per tier (sparsity adaspa gives a head at a search step): how many heads, their text
    share, exact top-k recall, and recall / error with tiers vs without until the next search."""
    rows: Dict[str, Dict[str, List[float]]] = {}
    for records in by_pair.values():
        search, per_step = records.get("search", {}), records.get("per_step", {})
        if "adaspa" not in per_step or "adaspa-no-ha" not in per_step:
            continue
        for s, steps in _spans(args):
            for b in ("b0", "b1"):
                st = search.get(str(s), {}).get(b)
                if not st or "tiers[adaspa]" not in st:
                    continue
                for ci, layer_tiers in enumerate(st["tiers[adaspa]"]):
                    for h, tier in enumerate(layer_tiers):
                        r = rows.setdefault(f"{tier:.2f}", {k: [] for k in (
                            "text_share", "topk_recall_at_density", "topk0.9_density",
                            "recall_ha", "recall_no_ha", "err_ha", "err_no_ha")})
                        r["text_share"].append(st["text_share"][ci][h])
                        r["topk_recall_at_density"].append(
                            st["topk_recall"][str(args.density)][ci][h])
                        r["topk0.9_density"].append(st["density_for_recall_0.9"][ci][h])
                        for name, tag in (("adaspa", "ha"), ("adaspa-no-ha", "no_ha")):
                            br = per_step[name].get(b, {})
                            for t in steps:
                                if t in br:
                                    r[f"recall_{tag}"].append(br[t]["recall"][ci][h])
                                    r[f"err_{tag}"].append(br[t]["rel_err"][ci][h])
    return {k: {"heads": len(v["text_share"]),
                **{m: (round(mean(x), 4) if mean(x) is not None else None) for m, x in v.items()}}
            for k, v in sorted(rows.items())}


DIFFUSE_BUCKETS = ((0.0, 0.4, "diffuse (top-k recall < 0.4)"), (0.4, 0.7, "middle (0.4-0.7)"),
                   (0.7, 1.01, "peaked (>= 0.7)"))


def by_diffuseness(by_pair: Dict[str, Dict[str, Any]], args: argparse.Namespace) -> Dict[str, Any]:
    """Heads bucketed by their exact top-k recall at the target density at the first search step:
    mean recall, error and gap of each config over the steps after it."""
    out: Dict[str, Dict[str, Dict[str, List[float]]]] = {}
    s0 = str(args.search[0])
    for records in by_pair.values():
        search, per_step = records.get("search", {}), records.get("per_step", {})
        for b in ("b0", "b1"):
            st = search.get(s0, {}).get(b)
            if not st or str(args.density) not in st["topk_recall"]:
                continue
            for ci, heads in enumerate(st["topk_recall"][str(args.density)]):
                for h, rc in enumerate(heads):
                    label = next(n for lo, hi, n in DIFFUSE_BUCKETS if lo <= rc < hi)
                    bucket = out.setdefault(label, {})
                    bucket.setdefault("_heads", {}).setdefault("n", []).append(1)
                    for name, steps in per_step.items():
                        for t, slot in steps.get(b, {}).items():
                            if int(t) <= args.search[0]:
                                continue
                            d = bucket.setdefault(name, {})
                            for key in ("recall", "rel_err", "gap"):
                                d.setdefault(key, []).append(slot[key][ci][h])
    result: Dict[str, Any] = {}
    for label, bucket in out.items():
        heads = len(bucket.pop("_heads")["n"])
        result[label] = {"head_calls": heads, **{
            name: {k: round(mean(v), 4) for k, v in d.items()} for name, d in bucket.items()}}
    return result


def print_tables(report: Dict[str, Any], args: argparse.Namespace) -> None:
    teacher = report.get("summary", {}).get("per_step", {})
    s0, s1 = args.search[0], args.search[-1]
    show = sorted({s0, s0 + 1, (s0 + s1) // 2, s1 - 1, s1, s1 + 1, args.steps - 1}
                  & set(range(s0, args.steps)))
    if teacher:
        for key, title in (("recall", "recall of the mask in use vs this step's exact mass"),
                           ("rel_err", "relative attention-output error"),
                           ("gap", "error per unit dropped mass (rel. to rms output)")):
            print(f"\nteacher-forced {title} (mean over layers, heads, both CFG branches)")
            print("| config | " + " | ".join(f"step {s}" for s in show) + " | mean |")
            print("|---|" + "---:|" * (len(show) + 1))
            for name, rows in teacher.items():
                vals = rows[key]
                allv = [v for s, v in vals.items() if int(s) > s0]
                print(f"| {name} | " + " | ".join(f"{vals.get(str(s), float('nan')):.4f}"
                                                 for s in show)
                      + f" | {mean(allv) or float('nan'):.4f} |")
        amp = report["summary"].get("cfg_amplification", {})
        corr = report["summary"].get("cfg_error_corr", {})
        if amp:
            print("\nCFG: ||g E_c - (g-1) E_u|| / rms(E_c, E_u) (1 = same error in both branches, "
                  "5 = independent), and corr(E_c, E_u); steps after the first search")
            for name in amp:
                print(f"  {name:20s} amplification {amp[name]:.3f}  corr {corr[name]:.3f}")
    vel = report.get("velocity", {})
    if vel:
        print("\nwhole-model velocity error (every layer sparse with the mask in use, dense input)")
        steps = sorted({s for p in vel.values() for s in p}, key=int)
        names = sorted({n for p in vel.values() for s in p.values() for n in s})
        print("| config | " + " | ".join(f"step {s} cond / cfg" for s in steps) + " |")
        print("|---|" + "---:|" * len(steps))
        for n in names:
            cells = []
            for s in steps:
                c = mean([p[s][n]["cond"] for p in vel.values() if s in p and n in p[s]])
                g = mean([p[s][n]["cfg"] for p in vel.values() if s in p and n in p[s]])
                cells.append(f"{c:.4f} / {g:.4f}" if c is not None else "-")
            print(f"| {n} | " + " | ".join(cells) + " |")
    ha = report.get("head_adaptive", {})
    if ha:
        print("\nhead-adaptive tiers of adaspa (sparsity given at a search step), heads pooled "
              "over layers, branches, pairs; recall / error until the next search")
        print("| tier sparsity | heads | text share | density for recall 0.9 | recall tiers | "
              "recall no tiers | err tiers | err no tiers |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for tier, r in ha.items():
            print(f"| {tier} | {r['heads']} | {r['text_share']} | {r['topk0.9_density']} | "
                  f"{r['recall_ha']} | {r['recall_no_ha']} | {r['err_ha']} | {r['err_no_ha']} |")
    diff = report.get("by_diffuseness", {})
    if diff:
        names = [n for n in ("adaspa", "adaspa-no-ha", "window", "pooled", "oracle-fresh")
                 if any(n in v for v in diff.values())]
        print("\nheads bucketed by exact top-k recall at the first search (both branches); "
              "rel. error (recall) after it")
        print("| bucket | heads x branches x pairs | " + " | ".join(names) + " |")
        print("|---|---:|" + "---:|" * len(names))
        for label, _, _ in [(n, 0, 0) for _, _, n in DIFFUSE_BUCKETS]:
            if label not in diff:
                continue
            v = diff[label]
            print(f"| {label} | {v['head_calls']} | " + " | ".join(
                f"{v[n]['rel_err']:.3f} ({v[n]['recall']:.3f})" if n in v else "-"
                for n in names) + " |")
    onp = report.get("onpolicy_summary", {})
    if onp:
        print("\non-policy generations (each config's sparse output fed back): PSNR vs dense, "
              "mean over pairs, and the mean paired difference to adaspa (pairs where both ran)")
        print("| config | pairs | PSNR dB | vs adaspa dB | per pair |")
        print("|---|---:|---:|---:|---|")
        for name, r in onp.items():
            diff = "-" if r["vs_adaspa"] is None else f"{r['vs_adaspa']:+.2f}"
            print(f"| {name} | {r['pairs']} | {r['psnr_mean']:.2f} | {diff} | "
                  + " ".join(f"{v:.2f}" for v in r["psnr"]) + " |")
        for pair, runs in report.get("onpolicy", {}).items():
            for name, r in runs.items():
                if r.get("recall_by_step"):
                    print(f"  pair {pair} {name}: recall of its mask on its own trajectory "
                          + " ".join(f"{st}:{v:.3f}" for st, v in r["recall_by_step"].items()))


def onpolicy_summary(onpolicy: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    names = sorted({n for runs in onpolicy.values() for n in runs})
    out = {}
    for n in names:
        pairs = sorted(p for p, runs in onpolicy.items() if n in runs)
        both = [p for p in pairs if "adaspa" in onpolicy[p]]
        diffs = [onpolicy[p][n]["psnr"] - onpolicy[p]["adaspa"]["psnr"] for p in both]
        out[n] = {"pairs": len(pairs), "psnr": [onpolicy[p][n]["psnr"] for p in pairs],
                  "psnr_mean": round(mean([onpolicy[p][n]["psnr"] for p in pairs]), 3),
                  "vs_adaspa": round(mean(diffs), 3) if diffs and n != "adaspa" else None,
                  "vs_adaspa_wins": f"{sum(d > 0 for d in diffs)}/{len(diffs)}"}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["psnr_mean"]))


# ----------------------------------------------------------------------------- check-backend
def check_backend(args: argparse.Namespace, model) -> Dict[str, Any]:
    """Final clips of backend='adaspa' (CPU reference kernels) vs this emulation's on-policy run,
    at a small shape; equal up to float noise if the runtime applies masks as documented."""
    from train_fidelity_model import adaspa_backend_for_compile

    shape, steps = args.check_shape, args.check_steps
    search = search_steps_for(steps)
    sub = argparse.Namespace(**{**vars(args), "steps": steps, "search": search, "shape": shape,
                                "velocity_steps": [], "row_stride": 1})
    prompts = random_captions(1, seed=PROMPT_SEED)
    cond = model.conditioning(prompts)
    neg = model.conditioning([""])
    out: Dict[str, Any] = {"shape": list(shape), "steps": steps, "search_steps": list(search)}
    dense = sample(model.transformer, cond, steps=steps, shape=shape, seed=0, negative=neg,
                   guidance_scale=args.guidance_scale)
    for name in ("adaspa", "window", "pooled"):
        spec = CONFIGS[name]
        opts = dict(search_steps=search, block_size=args.block_size, min_seq_len=256,
                    inner_backend="eager", sparsity=round(1 - args.density, 6),
                    head_adaptive=spec["head_adaptive"], selector=spec["selector"])
        if name == "window":
            opts["video_grid"] = token_grid(shape)
        torch._dynamo.reset()
        compiled = torch.compile(model.transformer, backend=adaspa_backend_for_compile(),
                                 options=opts, dynamic=False, fullgraph=True)
        t0 = time.perf_counter()
        backend_clip = sample(compiled, cond, steps=steps, shape=shape, seed=0, negative=neg,
                              guidance_scale=args.guidance_scale)
        t_backend = time.perf_counter() - t0
        rep = adaspa_compile.report(model.transformer)
        sub.configs = [name]
        an = Analyzer(sub, shape)
        emu = generate(model, an, cond, neg, 0, steps, "onpolicy", name, "onpolicy")
        masks_equal = []
        # the backend's masks of the last search vs the emulation's, per site (branch 0 and 1)
        sites = [s for s in state_of(model.transformer).sites.values() if s.caches]
        for layer, site in enumerate(sites):
            for b, cache in site.caches.items():
                key = ("onpolicy", name, layer, b)
                if cache.mask is not None and key in an.masks:
                    masks_equal.append(float((cache.mask.to_dense()[0] == an.masks[key])
                                             .float().mean()))
        out[name] = {"psnr_backend_vs_emulation": round(psnr(emu, backend_clip), 2),
                     "max_abs_diff": float((emu - backend_clip).abs().max()),
                     "psnr_backend_vs_dense": round(psnr(backend_clip, dense), 3),
                     "psnr_emulation_vs_dense": round(psnr(emu, dense), 3),
                     "mask_agreement_last_search": round(mean(masks_equal) or float("nan"), 5),
                     "backend_phases": {s.name: s.phases for s in rep.rewritten if s.phases},
                     "backend_text": sorted({s.text for s in rep.rewritten}),
                     "backend_seconds": round(t_backend, 1)}
        print(f"check {name}: {json.dumps({k: v for k, v in out[name].items() if k != 'backend_phases'})}")
        del compiled
    torch._dynamo.reset()
    return out


# ----------------------------------------------------------------------------- main
MERGE_KEYS = ("shape", "steps", "search_steps", "density", "block_size", "guidance_scale",
              "row_stride")


def merge_previous(report: Dict[str, Any], path: Path) -> Dict[str, Any]:
    """Fold an earlier run with the same settings (other pairs, other drivers) into ``report``."""
    if not path.is_file():
        return report
    with open(path) as f:
        old = json.load(f)
    mismatch = [k for k in MERGE_KEYS if old.get("settings", {}).get(k) != report["settings"][k]]
    if mismatch:
        print(f"--merge: {path} has other settings ({mismatch}); overwriting it")
        return report
    merged = dict(report)
    for key in ("teacher_records", "velocity", "onpolicy", "prompts"):
        both = dict(old.get(key, {}))
        for pair, val in report.get(key, {}).items():
            if isinstance(val, dict) and isinstance(both.get(pair), dict) and key == "onpolicy":
                both[pair] = {**both[pair], **val}
            else:
                both[pair] = val
        merged[key] = both
    merged["runs"] = old.get("runs", [{"command": old.get("command"),
                                       "seconds": old.get("seconds_total"),
                                       "pairs": old["settings"].get("pairs")}])
    merged["runs"].append({"command": report["command"], "pairs": report["settings"]["pairs"]})
    merged["validation"] = report.get("validation") or old.get("validation", {})
    merged["settings"] = dict(report["settings"])
    merged["settings"]["pairs"] = sorted(set(old["settings"].get("pairs", []))
                                         | set(report["settings"]["pairs"]))
    return merged


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    import diffusers

    model = load_model(args.weights, device="cpu", dtype=torch.float32)
    report: Dict[str, Any] = {
        "command": "python research/fidelity_diagnose.py " + " ".join(argv if argv is not None
                                                                        else sys.argv[1:]),
        "environment": {"device": platform.processor() or "cpu", "threads": torch.get_num_threads(),
                        "torch": torch.__version__, "diffusers": diffusers.__version__},
        "settings": {"shape": list(args.shape), "tokens": None, "steps": args.steps,
                     "search_steps": list(args.search), "density": args.density,
                     "block_size": args.block_size, "guidance_scale": args.guidance_scale,
                     "configs": args.configs, "velocity_configs": args.velocity_configs,
                     "velocity_steps": args.velocity_steps, "row_stride": args.row_stride,
                     "pairs": list(range(args.first_pair, args.first_pair + args.pairs)),
                     "drivers": args.drivers},
        "notes": {
            "teacher_forced": "the dense trajectory; every config's mask is chosen from this "
                              "trajectory's q, k as the runtime would, and measured against the "
                              "exact attention of each step",
            "records": "teacher_records[pair].per_step[config][branch][step][metric] = "
                       "[layer][head] (2 dual + 4 single blocks); .search[step][branch] the "
                       "search-step statistics; .cfg[config][step] the CFG combination",
        },
    }
    out_path = Path(args.out_json)

    def write() -> None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with open(out_path, "w") as f:
            json.dump(report, f, indent=1)
        if os.environ.get("OUT"):
            with open(Path(os.environ["OUT"]) / "fidelity_diagnose.json", "w") as f:
                json.dump(report, f, indent=1)

    if args.check_backend:
        report["check_backend"] = check_backend(args, model)
        report["seconds_total"] = round(time.perf_counter() - t_start, 1)
        write()
        print(f"wrote {out_path} in {report['seconds_total']:.0f} s")
        return report

    an = Analyzer(args, args.shape)
    report["settings"]["tokens"] = an.L
    report["settings"]["rows_measured"] = int(an.rows.numel())
    prompts = random_captions(args.first_pair + args.pairs, seed=PROMPT_SEED)
    print(f"shape {args.shape} -> {an.L} tokens, {an.nb} blocks of {an.bs}; {args.steps} steps, "
          f"search {args.search}; density {args.density}; rows measured {an.rows.numel()} of "
          f"{an.L}; velocity at {args.velocity_steps} for {args.velocity_configs}", flush=True)
    velocity: Dict[str, Any] = {}
    onpolicy: Dict[str, Any] = {}
    per_gen = args.steps * 2
    total = args.pairs * (per_gen + len(args.velocity_steps) * len(args.velocity_configs) * 2
                          + len(args.drivers) * per_gen)
    bar = tqdm(total=total, desc="model calls", unit="call") if tqdm else None
    for i in range(args.first_pair, args.first_pair + args.pairs):
        cond = model.conditioning([prompts[i]])
        neg = model.conditioning([""])
        cache = Path(args.cache_dir) / (f"dense_{'x'.join(map(str, args.shape))}_{args.steps}"
                                        f"steps_g{args.guidance_scale:g}_pair{i}.pt")
        if args.no_teacher and not args.velocity_configs and cache.is_file():
            dense = torch.load(cache)
            if bar is not None:
                bar.update(per_gen)
        else:
            vel: Dict[str, Any] = {}
            dense = generate(model, an, cond, neg, i, args.steps, "teacher", None,
                             f"teacher:{i}", vel if args.velocity_configs else None, bar)
            if vel:
                velocity[str(i)] = vel
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(dense, cache)
        for name in args.drivers:
            an.configs = [name]
            run = f"onpolicy:{name}:{i}"
            clip = generate(model, an, cond, neg, i, args.steps, "onpolicy", name, run, None, bar)
            recs = an.records.get(run, {}).get("per_step", {})
            entry: Dict[str, Any] = {"psnr": round(psnr(clip, dense), 3)}
            for label in (name, "oracle-fresh"):
                b0 = recs.get(label, {}).get("b0", {})
                tag = "" if label == name else "_oracle"
                if b0:
                    entry[f"recall_by_step{tag}"] = {
                        s: round(mean(flat(v["recall"])), 4)
                        for s, v in sorted(b0.items(), key=lambda x: int(x[0]))}
                    entry[f"rel_err_by_step{tag}"] = {
                        s: round(mean(flat(v["rel_err"])), 4)
                        for s, v in sorted(b0.items(), key=lambda x: int(x[0]))}
            onpolicy.setdefault(str(i), {})[name] = entry
            an.configs = list(args.configs)
            if bar is not None:
                bar.write(f"pair {i} on-policy {name}: PSNR {entry['psnr']:.2f} dB vs dense")
    if bar is not None:
        bar.close()
    report["prompts"] = {str(i): prompts[i] for i in range(args.first_pair,
                                                           args.first_pair + args.pairs)}
    report["validation"] = an.validation
    report["velocity"] = velocity
    report["onpolicy"] = onpolicy
    report["teacher_records"] = {k.split(":")[1]: v for k, v in an.records.items()
                                 if k.startswith("teacher:") and v}
    report["timing"] = {k: round(v, 1) for k, v in an.timing.items()}
    if args.merge:
        report = merge_previous(report, out_path)
    teacher = report["teacher_records"]
    report["summary"] = summarise(teacher, args)
    report["head_adaptive"] = head_adaptive_table(teacher, args)
    report["by_diffuseness"] = by_diffuseness(teacher, args)
    report["onpolicy_summary"] = onpolicy_summary(report.get("onpolicy", {}))
    report["seconds_total"] = round(time.perf_counter() - t_start, 1)
    write()
    print_tables(report, args)
    print(f"\nwrote {out_path} in {report['seconds_total']:.0f} s")
    return report


if __name__ == "__main__":
    main()
