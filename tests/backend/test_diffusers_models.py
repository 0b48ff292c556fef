"""The backend on tiny random diffusers video transformers (real model classes, CPU)."""

import pytest
import torch

import adaspa_compile
from tests.tiny_models import ALL_TINY_MODELS, tiny_hunyuan_video

pytestmark = pytest.mark.usefixtures("fresh_compile")

OPTIONS = {"min_seq_len": 128, "search_steps": (1, 3), "sparsity": 0.5}
# Text position each joint-attention model must be found to use (None: no text in self-attention).
EXPECTED_TEXT = {"hunyuan_video": "last", "wan": None, "cogvideox": "first",
                 "cogvideox15": "first", "ltx": None, "mochi": "last"}


def steps(model, kwargs, compiled, n, t0=900.0):
    """Run ``n`` denoising calls with falling timesteps; return eager and compiled outputs."""
    pairs = []
    with torch.no_grad():
        for i in range(n):
            t = kwargs["timestep"]
            args = dict(kwargs, timestep=torch.full_like(t, t0 - 100 * i) if t.dtype.is_floating_point
                        else torch.full_like(t, int(t0) - 100 * i))
            pairs.append((model(**args)[0], compiled(**args)[0]))
    return pairs


@pytest.mark.parametrize("name", sorted(ALL_TINY_MODELS))
def test_dense_steps_equal_eager_and_sites_are_found(name):
    model, kwargs = ALL_TINY_MODELS[name]()
    compiled = torch.compile(model, backend="adaspa", fullgraph=True,
                             options=dict(OPTIONS, inner_backend="eager", search_steps=(5,)))
    for eager, ours in steps(model, kwargs, compiled, 2):
        assert torch.equal(eager, ours), name
    report = adaspa_compile.report()
    assert report.rewritten, f"{name}: no self-attention was rewritten\n{report}"
    assert report.clock == "timestep"
    positions = {s.text.split(" ")[0] for s in report.rewritten}
    expected = EXPECTED_TEXT[name]
    assert positions == {expected if expected else "none"}, str(report)
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
