"""Block selection against a brute-force oracle written from the method's definition, loop by loop,
sharing no code with ``selection.py``: text sink, valid keys, the diagonal first, row-wise top-k
with ties by column, and the head tiers realised as per-head budgets."""

from typing import List, Tuple

import torch
from hypothesis import given, strategies as st

from adaspa_compile import AdaSpaConfig, select_blocks
from tests.test_selection import cases

EASY = 0.8  # a head whose recall at the layer's sparsity exceeds this is easy


def blocks_of(layout, B: int) -> Tuple[List[bool], List[List[bool]]]:
    """``text[j]``: block ``j`` holds a text token; ``valid[b][j]``: it holds a valid key."""
    nb, bs, L = layout.num_blocks, layout.block_size, layout.seq_len
    text = [False] * nb
    if layout.text_span is not None:
        start, end = layout.text_span
        text = [any(start <= t < end for t in range(j * bs, min((j + 1) * bs, L)))
                for j in range(nb)]
    valid = [[layout.key_valid is None or bool(layout.key_valid[b, j * bs:(j + 1) * bs].any())
              for j in range(nb)] for b in range(B)]
    return text, valid


def row_order(row: List[float], i: int, cand: List[bool]) -> List[int]:
    """Candidate columns of row ``i`` in order of preference: the diagonal, then by mass
    (largest first), equal masses by column."""
    cols = [j for j, c in enumerate(cand) if c]
    return sorted(cols, key=lambda j: (j != i, -row[j], j))


def oracle(mass: torch.Tensor, layout, cfg: AdaSpaConfig):
    """``(kept[b][h][i] as sets of columns, budget[b][h], recall_at_s[b][h])``."""
    B, H, nb, _ = mass.shape
    text, valid = blocks_of(layout, B)
    kept, budgets, recalls = [], [], []
    for b in range(B):
        cand_cols = [valid[b][j] and not text[j] for j in range(nb)]
        n_cand = max(1, sum(cand_cols))

        def budget(s: float) -> int:
            return max(1, round((1 - s) * n_cand))

        def head_keep(h: int, k: int):
            rows, kept_mass = [], 0.0
            for i in range(nb):
                row = mass[b, h, i].tolist()
                forced = {j for j in range(nb) if valid[b][j] and (text[i] or text[j])}
                cand = [valid[b][j] and not text[i] and not text[j] for j in range(nb)]
                chosen = set(row_order(row, i, cand)[:k]) | forced
                rows.append(chosen)
                kept_mass += sum(row[j] for j in chosen)
            total = float(mass[b, h].sum())
            return rows, (kept_mass / total if total > 0 else 1.0)

        recall_at_s = [head_keep(h, budget(cfg.sparsity))[1] for h in range(H)]
        sparsity = [cfg.sparsity] * H
        if cfg.head_budget == "tiers" and H > 1:
            n = min(sum(r > EASY for r in recall_at_s), H // 2)
            d = min((1 - cfg.sparsity) / 2, cfg.sparsity)
            by_recall = sorted(range(H), key=lambda h: -recall_at_s[h])
            for h in by_recall[:n]:
                sparsity[h] = cfg.sparsity + d
            for h in by_recall[H - n:] if n else []:
                sparsity[h] = cfg.sparsity - d
        ks = [budget(s) for s in sparsity]
        kept.append([head_keep(h, ks[h])[0] for h in range(H)])
        budgets.append(ks)
        recalls.append(recall_at_s)
    return kept, budgets, recalls


@given(cases(), st.sampled_from([0.0, 0.3, 0.5, 0.8, 0.9]), st.sampled_from(["tiers", "uniform"]))
def test_selection_equals_the_brute_force_oracle(case, sparsity, head_budget):
    mass, layout = case
    B, H, nb, _ = mass.shape
    cfg = AdaSpaConfig(sparsity=sparsity, head_budget=head_budget)
    dense = select_blocks(mass, layout, cfg).mask.to_dense()
    kept, budgets, recalls = oracle(mass, layout, cfg)
    text, valid = blocks_of(layout, B)
    video_rows = [i for i in range(nb) if not text[i]]
    for b in range(B):
        n_cand = sum(valid[b][j] and not text[j] for j in range(nb))
        got = [[{j for j in range(nb) if dense[b, h, i, j]} for i in range(nb)]
               for h in range(H)]
        # candidates kept per video row: each head's budget (capped by the candidates there are)
        got_budget = [{len(got[h][i]) - sum(text[j] and valid[b][j] for j in range(nb))
                       for i in video_rows} for h in range(H)]
        assert all(len(k) <= 1 for k in got_budget), got_budget  # rows of a head are uniform
        got_budget = [next(iter(k), None) for k in got_budget]
        if video_rows:
            assert sorted(got_budget) == sorted(min(k, n_cand) for k in budgets[b]), \
                (got_budget, budgets[b], recalls[b])
        if len(set(recalls[b])) == H:  # no two heads tie: each head's tier is determined
            for h in range(H):
                assert got[h] == kept[b][h], (b, h, got[h], kept[b][h])
            for h in range(H):  # a head of higher recall is never denser
                for g in range(H):
                    if video_rows and recalls[b][h] > recalls[b][g]:
                        assert got_budget[h] <= got_budget[g], (recalls[b], got_budget)
