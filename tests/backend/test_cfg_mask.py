"""``cfg_mask``: where the masks of a step's CFG branches come from, checked through the backend
on a model that runs classifier-free guidance as two calls per step. With ``"cond"`` and
``"sum"`` both branches run every sparse step on one mask; with ``"sum"`` that mask is the
selection on the summed block mass of both branches (an oracle from the reference kernels)."""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import pytest
import torch

from adaspa_compile import ops
from adaspa_compile.reference import attention_with_lse_ref, block_mass_ref
from adaspa_compile.runtime import Site, _as_4d
from adaspa_compile.selection import BlockLayout, select_blocks
from tests.backend.test_step_oracle import (OPTIONS, assert_same_up_to_ties, run,
                                            tiny_dit_case)

pytestmark = pytest.mark.usefixtures("fresh_compile")

SEARCH_STEPS = OPTIONS["search_steps"]


@dataclass
class Call:
    site: Site
    step: int
    branch: int
    phase: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_valid: Optional[torch.Tensor]
    scale: float
    sparse_mask: Optional[torch.Tensor]  # the mask its block-sparse attention ran on


def record(monkeypatch) -> List[Call]:
    """Every ``Site.forward`` call with its inputs and the mask its sparse attention used."""
    calls: List[Call] = []
    used: List[torch.Tensor] = []
    sparse_forward, forward = ops.sparse_forward, Site.forward

    def sparse(q, k, v, mask, *rest):
        used.append(mask.to_dense())
        return sparse_forward(q, k, v, mask, *rest)

    def recording(self, q, k, v, attn_mask, scale, step, branch):
        before = len(used)
        out = forward(self, q, k, v, attn_mask, scale, step, branch)
        key_valid = ops.key_valid_from_mask(_as_4d(attn_mask), q.shape[0], q.shape[2])
        s = float(scale) if scale is not None else q.shape[-1] ** -0.5
        calls.append(Call(self, step, branch, self.phases[branch][-1].letter, q.clone(),
                          k.clone(), v.clone(), key_valid, s,
                          used[before] if len(used) > before else None))
        return out

    monkeypatch.setattr(ops, "sparse_forward", sparse)
    monkeypatch.setattr(Site, "forward", recording)
    return calls


def run_model(cfg_mask: str, monkeypatch) -> Dict[Tuple[str, int, int], Call]:
    """Seven steps of two CFG calls each; the calls by (site, step, branch)."""
    model, branches = tiny_dit_case()
    calls = record(monkeypatch)
    run(torch.compile(model, backend="adaspa", options=dict(OPTIONS, cfg_mask=cfg_mask)),
        branches)
    assert calls, "no attention call was rewritten"
    return {(c.site.name, c.step, c.branch): c for c in calls}


def both_sparse(calls: Dict[Tuple[str, int, int], Call]):
    """``(branch 0, branch 1)`` call pairs of every site and step where both ran sparse."""
    for (site, step, branch), call in calls.items():
        other = calls.get((site, step, 1))
        if branch == 0 and other is not None and call.phase == other.phase == "S":
            yield call, other


@pytest.mark.parametrize("cfg_mask", ["cond", "sum"])
def test_both_branches_run_every_sparse_step_on_one_mask(cfg_mask, monkeypatch):
    calls = run_model(cfg_mask, monkeypatch)
    pairs = list(both_sparse(calls))
    assert len({c.step for c, _ in pairs}) == 3  # steps 3, 5 and 6
    for cond, uncond in pairs:
        assert torch.equal(cond.sparse_mask, uncond.sparse_mask), (cond.site.name, cond.step)


def test_per_branch_masks_differ(monkeypatch):
    """The control: each branch's own search finds other blocks somewhere."""
    calls = run_model("per_branch", monkeypatch)
    assert any(not torch.equal(c.sparse_mask, u.sparse_mask) for c, u in both_sparse(calls))


def reference_mass(call: Call, fused: Call) -> torch.Tensor:
    """The exact block mass of ``call`` under the LSE of its branch's fused search."""
    block = call.site.cfg.block_size
    _, lse = attention_with_lse_ref(fused.q, fused.k, fused.v, fused.scale, fused.key_valid,
                                    block_size=block)
    return block_mass_ref(call.q, call.k, lse, call.scale, block, call.key_valid)


def test_sum_selects_on_the_summed_mass_of_both_branches(monkeypatch):
    calls = run_model("sum", monkeypatch)
    sites = {site for site, _, _ in calls}
    for name in sites:
        fused = [calls[(name, SEARCH_STEPS[0], b)] for b in (0, 1)]
        assert [c.phase for c in fused] == ["F", "F"]
        for search, until in zip(SEARCH_STEPS, SEARCH_STEPS[1:] + (7,)):
            searched = [calls[(name, search, b)] for b in (0, 1)]
            mass = sum(reference_mass(c, f) for c, f in zip(searched, fused))
            call = searched[1]
            layout = BlockLayout(seq_len=call.q.shape[2], block_size=call.site.cfg.block_size,
                                 text_span=call.site.info.text.tokens(call.q.shape[2]),
                                 key_valid=call.key_valid)
            expected = select_blocks(mass, layout, call.site.cfg).mask.to_dense()
            later = [calls[(name, s, b)] for s in range(search + 1, until) for b in (0, 1)]
            if call.phase == "C":  # a cached search runs sparse on the new mask at once
                later.append(call)
            for c in later:
                assert_same_up_to_ties(c.sparse_mask, expected, mass,
                                       f"{name} step {c.step} branch {c.branch}")
        assert calls[(name, 6, 0)].site.caches[0].scored is None  # the kept mass is freed
