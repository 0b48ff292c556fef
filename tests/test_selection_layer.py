"""``head_budget="layer"``: the layer's density is that of the uniform split, and the summed
recall of its heads is the best any choice of blocks reaches, against a brute force over every
subset of each row's candidate blocks (written here, sharing no code with ``selection.py``)."""

from itertools import combinations
from typing import List

import torch
from hypothesis import given, strategies as st

from adaspa_compile import AdaSpaConfig, BlockLayout, select_blocks
from tests.test_selection_oracle import blocks_of

SPARSITIES = st.sampled_from([0.0, 0.3, 0.5, 0.7, 0.9])


@st.composite
def small_cases(draw, max_heads: int = 3, max_blocks: int = 5):
    """Mass ``[B, H, nb, nb]`` with a text span and padded text keys, small enough to brute
    force."""
    B, H, nb, bs = draw(st.integers(1, 2)), draw(st.integers(1, max_heads)), \
        draw(st.integers(2, max_blocks)), 16
    L = nb * bs - draw(st.integers(0, bs - 1))
    text_len = draw(st.integers(0, L // 3))
    span = None
    if text_len:
        span = (0, text_len) if draw(st.booleans()) else (L - text_len, L)
    key_valid = None
    if span is not None and draw(st.booleans()):
        key_valid = torch.ones(B, L, dtype=torch.bool)
        key_valid[:, span[1] - draw(st.integers(0, text_len)): span[1]] = False
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    layout = BlockLayout(seq_len=L, block_size=bs, text_span=span, key_valid=key_valid)
    mass = torch.rand(B, H, nb, nb, generator=g) ** 4
    return mass * layout.valid_key_blocks(B, mass.device)[:, None, None, :], layout


def candidates(layout, B: int, nb: int) -> torch.Tensor:
    """Bool ``[B, 1, nb, nb]``: the blocks that compete for the budget."""
    text, valid = blocks_of(layout, B)
    return torch.tensor([[[[valid[b][j] and not text[i] and not text[j] for j in range(nb)]
                           for i in range(nb)]] for b in range(B)])


def select(mass, layout, sparsity, head_budget):
    return select_blocks(mass, layout, AdaSpaConfig(sparsity=sparsity, head_budget=head_budget))


@given(small_cases(max_heads=6, max_blocks=12), SPARSITIES)
def test_the_layer_keeps_the_density_of_the_uniform_split(case, sparsity):
    mass, layout = case
    B, H, nb, _ = mass.shape
    layer, uniform = (select(mass, layout, sparsity, m) for m in ("layer", "uniform"))
    got, want = layer.mask.to_dense(), uniform.mask.to_dense()
    cand = candidates(layout, B, nb)
    assert torch.equal(got & ~cand, want & ~cand)  # text blocks kept, nothing else outside
    assert torch.equal((got & cand).sum((1, 3)), (want & cand).sum((1, 3)))  # per row
    torch.testing.assert_close(layer.density.mean(-1), uniform.density.mean(-1))
    diagonal = torch.diagonal(cand, dim1=-2, dim2=-1)
    assert (torch.diagonal(got, dim1=-2, dim2=-1) | ~diagonal).all()  # every head's diagonal
    kept = (mass * got).sum((-2, -1)) / mass.sum((-2, -1))
    torch.testing.assert_close(layer.recall, kept)


def best_row(scores: List[List[float]], cells: List[tuple], diagonal: List[tuple],
             budget: int) -> float:
    """The largest sum of ``scores[h][j]`` over ``budget`` of the ``cells`` that hold every
    ``diagonal`` cell, by trying every such subset."""
    rest = [c for c in cells if c not in diagonal]
    fixed = sum(scores[h][j] for h, j in diagonal)
    need = min(budget, len(cells)) - len(diagonal)
    return fixed + max(sum(scores[h][j] for h, j in chosen)
                       for chosen in combinations(rest, need))


@given(small_cases(), SPARSITIES)
def test_the_layer_split_maximises_the_summed_recall(case, sparsity):
    mass, layout = case
    B, H, nb, _ = mass.shape
    got = select(mass, layout, sparsity, "layer").mask.to_dense()
    cand = candidates(layout, B, nb)
    budget = (select(mass, layout, sparsity, "uniform").mask.to_dense() & cand).sum((1, 3))
    for b in range(B):
        total = [float(mass[b, h].sum()) or 1.0 for h in range(H)]
        for i in range(nb):
            scores = [[float(mass[b, h, i, j]) / total[h] for j in range(nb)] for h in range(H)]
            cells = [(h, j) for h in range(H) for j in range(nb) if cand[b, 0, i, j]]
            if not cells:
                continue
            diagonal = [(h, i) for h in range(H) if cand[b, 0, i, i]]
            best = best_row(scores, cells, diagonal, int(budget[b, i]))
            ours = sum(scores[h][j] for h, j in cells if got[b, h, i, j])
            assert abs(ours - best) <= 1e-5 * max(1.0, best), (b, i, ours, best)
