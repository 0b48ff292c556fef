"""Properties of block selection (docs/method.md, Selection and Head tiers)."""

import torch
from hypothesis import assume, given, strategies as st

from adaspa_compile import AdaSpaConfig, BlockLayout, select_blocks, selection
from adaspa_compile.blockmask import pack_bits
from adaspa_compile.selection import tier_sparsities


@st.composite
def cases(draw):
    B = draw(st.integers(1, 2))
    H = draw(st.integers(1, 6))
    bs = 16
    nb = draw(st.integers(2, 12))
    L = nb * bs - draw(st.integers(0, bs - 1))
    text_len = draw(st.integers(0, L // 3))
    position = draw(st.sampled_from(["first", "last"]))
    span = None if text_len == 0 else ((0, text_len) if position == "first" else (L - text_len, L))
    key_valid = None
    if span is not None and draw(st.booleans()):
        key_valid = torch.ones(B, L, dtype=torch.bool)
        pad = draw(st.integers(0, text_len))
        key_valid[:, span[1] - pad: span[1]] = False
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    mass = torch.rand(B, H, nb, nb, generator=g) ** 4
    layout = BlockLayout(seq_len=L, block_size=bs, text_span=span, key_valid=key_valid)
    mass = mass * layout.valid_key_blocks(B, mass.device)[:, None, None, :]  # padded keys: no mass
    return mass, layout


def masks(layout, B, device="cpu"):
    text = layout.text_blocks(torch.device(device))
    valid = layout.valid_key_blocks(B, torch.device(device))
    touches = text[:, None] | text[None, :]
    return text, valid, touches


@given(cases(), st.floats(0.0, 0.95))
def test_rows_uniform_diagonal_and_text_kept(case, sparsity):
    mass, layout = case
    B, H, nb, _ = mass.shape
    cfg = AdaSpaConfig(sparsity=sparsity, head_budget="uniform")
    sel = select_blocks(mass, layout, cfg)
    dense = sel.mask.to_dense()
    text, valid, touches = masks(layout, B)
    kept_forced = dense & touches
    assert torch.equal(kept_forced, (touches[None, None] & valid[:, None, None, :]).expand_as(dense))
    cand = ~touches[None, None] & valid[:, None, None, :]
    n_cand = cand[:, 0].any(-2).sum(-1)
    per_row = (dense & cand).sum(-1)
    video_rows = ~text
    for b in range(B):
        if n_cand[b] == 0:
            continue
        k = max(1, round((1 - sparsity) * int(n_cand[b])))
        assert (per_row[b][:, video_rows] == min(k, int(n_cand[b]))).all()
        diag = torch.arange(nb)
        ok_diag = video_rows & valid[b]
        assert dense[b][:, diag[ok_diag], diag[ok_diag]].all()
    assert not (dense & ~valid[:, None, None, :]).any(), "padding-only key blocks must be dropped"


@given(cases(), st.floats(0.0, 0.95))
def test_head_tiers_average_to_the_target(case, sparsity):
    mass, layout = case
    sel = select_blocks(mass, layout, AdaSpaConfig(sparsity=sparsity))
    assert torch.allclose(sel.target_sparsity.mean(-1), torch.full((mass.shape[0],), sparsity),
                          atol=1e-5)
    delta = min((1 - sparsity) / 2, sparsity)
    tiers = torch.tensor([sparsity, sparsity + delta, sparsity - delta])
    assert torch.isclose(sel.target_sparsity[..., None], tiers).any(-1).all()


def test_tiers_follow_the_paper_for_point_eight():
    recall = torch.tensor([[0.95, 0.5, 0.85, 0.3, 0.9, 0.6]])
    tiers = tier_sparsities(recall, 0.8)
    # 3 heads above 0.8, capped at H // 2 = 3: best three 0.9, worst three 0.7
    assert torch.allclose(tiers, torch.tensor([[0.9, 0.7, 0.9, 0.7, 0.9, 0.7]]))
    tiers = tier_sparsities(torch.tensor([[0.95, 0.5, 0.6, 0.3]]), 0.8)
    assert torch.allclose(tiers, torch.tensor([[0.9, 0.8, 0.8, 0.7]]))


@given(cases(), st.floats(0.0, 0.95))
def test_reported_recall_is_exact(case, sparsity):
    mass, layout = case
    sel = select_blocks(mass, layout, AdaSpaConfig(sparsity=sparsity))
    dense = sel.mask.to_dense()
    recall = (mass * dense).sum((-2, -1)) / mass.sum((-2, -1))
    assert torch.allclose(sel.recall, recall, atol=1e-5)
    assert torch.allclose(sel.density, dense.float().mean((-2, -1)))


@given(cases(), st.floats(0.3, 0.999))
def test_recall_mode_keeps_the_fewest_blocks_reaching_the_target(case, target):
    mass, layout = case
    sel = select_blocks(mass, layout, AdaSpaConfig(mode="recall", recall=target))
    assert (sel.recall >= target - 1e-5).all()
    dense = sel.mask.to_dense()
    B = mass.shape[0]
    text, valid, touches = masks(layout, B)
    cand = ~touches[None, None] & valid[:, None, None, :]
    per_row = (dense & cand).sum(-1)[..., ~text]
    assume(per_row.numel() > 0)
    k = per_row.amax(-1)
    full = select_blocks(mass, layout, AdaSpaConfig(sparsity=0.0, head_budget="uniform"))
    assert full.recall.min() > 0.999
    # one block fewer per row misses the target (unless k == 1)
    for b in range(B):
        for h in range(mass.shape[1]):
            if k[b, h] <= 1:
                continue
            n_cand = int(cand[b, 0].any(-2).sum())
            s = 1 - (int(k[b, h]) - 1) / n_cand
            fewer = select_blocks(mass[b:b + 1, h:h + 1], BlockLayout(
                layout.seq_len, layout.block_size, layout.text_span,
                None if layout.key_valid is None else layout.key_valid[b:b + 1]),
                AdaSpaConfig(sparsity=min(s, 0.999), head_budget="uniform"))
            assert fewer.recall.item() < target + 1e-6


def test_no_text_sink_lets_text_compete():
    mass = torch.rand(1, 2, 8, 8)
    layout = BlockLayout(seq_len=128, block_size=16, text_span=(112, 128))
    sel = select_blocks(mass, layout, AdaSpaConfig(sparsity=0.9, text_sink=False,
                                                    head_budget="uniform"))
    per_row = sel.mask.to_dense().sum(-1)
    assert (per_row == 1).all()


@given(nb=st.integers(1, 12), keep=st.integers(0, 12), levels=st.sampled_from([0, 2, 3]),
       text_start=st.integers(0, 12), padded=st.integers(0, 3), seed=st.integers(0, 2**31 - 1))
def test_keep_best_is_the_stable_sort_prefix(nb, keep, levels, text_start, padded, seed):
    """``keep_best`` (threshold + ties by column) keeps exactly the first ``keep`` candidates of
    a stable descending sort of the scores (diagonal first), plus the forced blocks."""
    gen = torch.Generator().manual_seed(seed)
    mass = torch.rand(2, 2, nb, nb, generator=gen)
    if levels:
        mass = torch.floor(mass * levels) / levels
    text = torch.arange(nb) >= max(text_start, 1)
    valid = torch.ones(2, nb, dtype=torch.bool)
    valid[1, nb - min(padded, nb):] = False
    keep_t = torch.tensor([[keep, max(keep - 1, 0)], [1, keep]])
    candidate, forced = selection._candidates(text, valid)
    order = torch.sort(selection._scores(mass, candidate), dim=-1, descending=True,
                       stable=True).indices
    in_budget = torch.arange(nb) < keep_t[..., None, None]
    want = torch.zeros(order.shape, dtype=torch.bool).scatter_(-1, order, in_budget.expand(
        order.shape))
    want = (want & candidate) | forced
    sorted_mass = selection.sorted_candidate_rows(mass, text, valid)[0]
    bits, counts = selection.keep_best(mass, text, valid, keep_t, sorted_mass)
    assert torch.equal(bits, pack_bits(want))
    assert torch.equal(counts, want.sum(-1, dtype=torch.int32))
