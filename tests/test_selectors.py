"""Peer selectors: pooled estimate, static window, and equal budgets across selectors."""

import gc

import pytest
import torch
from hypothesis import given, strategies as st

import adaspa_compile
from adaspa_compile import AdaSpaConfig, BlockLayout, attention_with_lse, block_mass
from adaspa_compile.selectors import block_recall, pooled_mass, window_scores
from tests.backend.test_dit import OPTIONS, model, run_steps
from tests.dit import tiny_dit_inputs


@given(st.integers(1, 2), st.integers(1, 3), st.integers(2, 6), st.integers(0, 999))
def test_pooled_mass_is_exact_when_blocks_are_constant(B, H, nb, seed):
    bs = 16
    g = torch.Generator().manual_seed(seed)
    qb, kb = (torch.randn(B, H, nb, 1, 8, generator=g) for _ in range(2))
    q, k = (x.expand(B, H, nb, bs, 8).reshape(B, H, nb * bs, 8) for x in (qb, kb))
    _, lse = attention_with_lse(q, k, k)
    exact = block_mass(q, k, lse, block_size=bs)
    layout = BlockLayout(seq_len=nb * bs, block_size=bs)
    torch.testing.assert_close(pooled_mass(q, k, 8 ** -0.5, layout), exact / bs,
                               atol=1e-5, rtol=1e-4)


def test_pooled_mass_ignores_padded_blocks():
    q = torch.randn(1, 2, 64, 8)
    valid = torch.ones(1, 64, dtype=torch.bool)
    valid[:, 48:] = False
    est = pooled_mass(q, q, 0.3, BlockLayout(seq_len=64, block_size=16, key_valid=valid))
    assert (est[..., 3] == 0).all()
    torch.testing.assert_close(est.sum(-1), torch.ones(1, 2, 4))


def test_window_prefers_the_same_frame_region():
    # 4 frames of 8 x 8 tokens, blocks of 16 tokens = 2 rows of a frame
    layout = BlockLayout(seq_len=256, block_size=16)
    scores = window_scores(layout, (4, 8, 8), torch.device("cpu"))
    assert scores.shape == (16, 16)
    assert torch.equal(scores.diagonal(), torch.zeros(16))
    # block 1 (frame 0, rows 2-3): block 0 (same frame, adjacent) beats block 12 (frame 3)
    assert scores[1, 0] > scores[1, 12]
    # without a grid the window is 1D along the sequence
    flat = window_scores(layout, None, torch.device("cpu"))
    assert flat[5, 4] == flat[5, 6] == -16


def test_block_recall_of_full_mask_is_one():
    mass = torch.rand(1, 2, 4, 4)
    assert torch.allclose(block_recall(torch.ones(1, 2, 4, 4, dtype=torch.bool), mass),
                          torch.ones(1, 2))


@pytest.mark.usefixtures("fresh_compile")
@pytest.mark.parametrize("selector", ["pooled", "window"])
def test_peer_selectors_share_schedule_and_budget(selector):
    m = model()
    inputs = tiny_dit_inputs()
    options = dict(OPTIONS, head_budget="uniform", inner_backend="aot_eager")
    ours = torch.compile(m, backend="adaspa", fullgraph=True, options=options)
    run_steps(ours, inputs)
    adaspa_rows = adaspa_compile.report().rewritten
    torch._dynamo.reset()
    gc.collect()
    peer = torch.compile(m, backend="adaspa", fullgraph=True,
                         options=dict(options, selector=selector, video_grid=(2, 16, 16)))
    outs = run_steps(peer, inputs)
    assert all(torch.isfinite(o).all() for o in outs)
    for a, p in zip(adaspa_rows, adaspa_compile.report().rewritten):
        assert p.phases == a.phases == {0: "DDFSCSS"}
        assert p.mean_density() == pytest.approx(a.mean_density())
        assert 0 < p.mean_recall() <= a.mean_recall() + 1e-6  # exact mass ranks best


@pytest.mark.usefixtures("fresh_compile")
def test_without_lse_cache_every_search_is_fused():
    compiled = torch.compile(model(), backend="adaspa", fullgraph=True,
                             options=dict(OPTIONS, lse_cache=False))
    run_steps(compiled, tiny_dit_inputs())
    assert adaspa_compile.report().rewritten[0].phases == {0: "DDFSFSS"}


def test_selector_options_are_validated():
    with pytest.raises(ValueError, match="selector"):
        AdaSpaConfig(selector="random")
    with pytest.raises(ValueError, match="video_grid"):
        AdaSpaConfig(video_grid=(4, 8))
    assert AdaSpaConfig(video_grid=[4, 8, 8]).video_grid == (4, 8, 8)


def test_every_configured_selector_is_an_object():
    from adaspa_compile.config import SELECTORS
    from adaspa_compile.selectors import SELECTOR_CLASSES, make_selector

    assert set(SELECTOR_CLASSES) == set(SELECTORS)
    for name in SELECTORS:
        selector = make_selector(AdaSpaConfig(selector=name))
        assert selector.cfg.selector == name
    assert make_selector(AdaSpaConfig(selector="window")).cfg.head_budget == "uniform"
