"""The backend on tiny random diffusers video transformers (real model classes, CPU)."""

import pytest
import torch

import adaspa_compile
from tests.tiny_models import ALL_TINY_MODELS, tiny_hunyuan_video, timestep_like

pytestmark = pytest.mark.usefixtures("fresh_compile")

OPTIONS = {"min_seq_len": 128, "search_steps": (1, 3), "sparsity": 0.5}
# The text span each model's self-attention must be found to have: all 24 text tokens (the
# tiny models' text length), first or last; Mochi gathers the unpadded tokens, so its span is
# what follows the 256 video tokens; Wan and LTX attend to text in cross-attention only.
NO_TEXT = "none (no video/text concat feeds q)"
EXPECTED_TEXT = {"hunyuan_video": "last 24 (graph)", "wan": NO_TEXT,
                 "cogvideox": "first 24 (graph)", "cogvideox15": "first 24 (graph)",
                 "ltx": NO_TEXT, "mochi": "last L-256 (graph, unpadded text)"}


def steps(model, kwargs, compiled, n, t0=900.0):
    """Run ``n`` denoising calls with falling timesteps; return eager and compiled outputs."""
    pairs = []
    with torch.no_grad():
        for i in range(n):
            t = kwargs["timestep"]
            args = dict(kwargs, timestep=timestep_like(t, t0 - 100 * i))
            pairs.append((model(**args)[0], compiled(**args)[0]))
    return pairs


@pytest.mark.parametrize("name", sorted(ALL_TINY_MODELS))
def test_dense_steps_equal_eager_and_sites_are_found(name):
    model, kwargs = ALL_TINY_MODELS[name]()
    compiled = torch.compile(model, backend="adaspa", fullgraph=True,
                             options=dict(OPTIONS, inner_backend="eager", search_steps=(5,)))
    for eager, ours in steps(model, kwargs, compiled, 2):
        assert torch.equal(eager, ours), name
    report = adaspa_compile.report(model)
    assert report.rewritten, f"{name}: no self-attention was rewritten\n{report}"
    assert report.clock == "timestep"
    assert {s.text for s in report.rewritten} == {EXPECTED_TEXT[name]}, str(report)
    for site in report.rewritten:
        assert site.phases == {0: "DD"}


@pytest.mark.parametrize("name", sorted(ALL_TINY_MODELS))
def test_sparsity_zero_equals_dense_through_every_phase(name):
    model, kwargs = ALL_TINY_MODELS[name]()
    compiled = torch.compile(model, backend="adaspa", fullgraph=True,
                             options=dict(OPTIONS, sparsity=0.0, inner_backend="aot_eager"))
    for eager, ours in steps(model, kwargs, compiled, 5):
        torch.testing.assert_close(ours, eager, atol=1e-4, rtol=1e-4)
    for site in adaspa_compile.report().rewritten:
        assert site.phases == {0: "DFSCS"}


@pytest.mark.parametrize("name", sorted(ALL_TINY_MODELS))
def test_inductor_runs_every_phase_without_recompiles(name):
    model, kwargs = ALL_TINY_MODELS[name]()
    compiled = torch.compile(model, backend="adaspa", fullgraph=True, options=OPTIONS)
    first = steps(model, kwargs, compiled, 1, t0=50.0)
    torch.testing.assert_close(first[0][1], first[0][0], atol=1e-4, rtol=1e-4)
    with torch._dynamo.config.patch(error_on_recompile=True):
        pairs = steps(model, kwargs, compiled, 5)
    assert all(torch.isfinite(ours).all() for _, ours in pairs)
    report = adaspa_compile.report()
    for site in report.rewritten:
        assert site.phases == {0: "DFSCS"}
        assert site.mean_density() is not None and site.mean_density() < 1.0


def test_hunyuan_token_refiner_and_padding():
    model, kwargs = tiny_hunyuan_video()
    compiled = torch.compile(model, backend="adaspa", fullgraph=True, options=OPTIONS)
    steps(model, kwargs, compiled, 3)
    report = adaspa_compile.report()
    refiner = [s for s in report.skipped if "refiner" in s.name]
    assert refiner and all("text tokens only" in s.reason or "min_seq_len" in s.reason
                           for s in refiner)
    assert all("refiner" not in s.name for s in report.rewritten)


def test_non_sdpa_attention_backend_warns_that_nothing_is_accelerated(caplog):
    model, kwargs = ALL_TINY_MODELS["wan"]()
    model.set_attention_backend("flex")  # also diffusers' process-wide active backend
    try:
        compiled = torch.compile(model, backend="adaspa", fullgraph=True,
                                 options=dict(OPTIONS, inner_backend="eager"))
        with torch.no_grad():
            compiled(**kwargs)
    finally:
        model.set_attention_backend("native")
    report = adaspa_compile.report()
    assert not report.sites
    assert any("nothing in it is accelerated" in n and "flex_attention" in n for n in report.notes)
    assert "set_attention_backend('native')" in str(report)


def test_mochi_text_span_follows_each_samples_length(monkeypatch):
    """Mochi attends to each sample's unpadded text: per call, the span is the tokens after the
    256 video tokens, as many as that sample's valid text."""
    from adaspa_compile.runtime import Site
    from tests.tiny_models import tiny_mochi

    spans = []
    forward = Site.forward

    def recording(self, q, *args):
        spans.append(self.info.text.tokens(q.shape[2]))
        return forward(self, q, *args)

    monkeypatch.setattr(Site, "forward", recording)
    model, kwargs = tiny_mochi(batch_size=2, valid_lens=(5, 17))
    compiled = torch.compile(model, backend="adaspa", fullgraph=True,
                             options=dict(OPTIONS, inner_backend="eager"))
    with torch.no_grad():
        compiled(**kwargs)
    assert set(spans) == {(256, 261), (256, 273)}, spans


def test_the_chosen_mask_keeps_the_text_rows_and_columns():
    """HunyuanVideo puts its 24 text tokens last: after a search, every block holding a text
    token is kept in its row and in its column."""
    from adaspa_compile.state import state_of

    model, kwargs = tiny_hunyuan_video(batch_size=1, valid_lens=(17,))
    options = dict(OPTIONS, sparsity=0.9, search_steps=(0,), block_size=16)
    compiled = torch.compile(model, backend="adaspa", options=options)
    steps(model, kwargs, compiled, 1)
    sites = state_of(model).sites.values()
    assert sites
    for site in sites:
        dense = site.caches[0].mask.to_dense()  # [B, H, nb, nb]
        L = dense.shape[-1] * 16
        start, end = site.info.text.tokens(site.caches[0].shape[2])
        assert end - start == 24
        text_blocks = list(range(start // 16, (end - 1) // 16 + 1))
        assert dense[..., text_blocks, :].all() and dense[..., :, text_blocks].all(), site.name
        assert not dense.all(), f"{site.name}: sparsity 0.9 kept every block ({L} tokens)"
