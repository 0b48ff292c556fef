"""diffusers hooks around a compiled transformer: step caches (First-Block Cache, TaylorSeer) and
group offloading split the forward into several graphs. Every attention layer stays one site
under its module name, and the schedule follows the denoising steps."""

import contextlib

import pytest
import torch

import adaspa_compile
from tests.tiny_models import tiny_wan

pytestmark = pytest.mark.usefixtures("fresh_compile")

OPTIONS = {"min_seq_len": 128, "search_steps": (1, 3), "sparsity": 0.5}
STEPS = 6
LAYERS = ["blocks.0.attn1", "blocks.1.attn1"]


def run(model, kwargs, compiled, cached: bool):
    outs = []
    with torch.no_grad():
        for i in range(STEPS):
            timestep = torch.full_like(kwargs["timestep"], 900 - 100 * i)
            context = model.cache_context("cond") if cached else contextlib.nullcontext()
            with context:
                outs.append(compiled(**dict(kwargs, timestep=timestep))[0])
    return outs


def plain_adaspa_outputs():
    model, kwargs = tiny_wan()
    return run(model, kwargs, torch.compile(model, backend="adaspa", options=OPTIONS), False)


def phases_by_layer(model):
    report = adaspa_compile.report(model)
    assert [s.name for s in report.rewritten] == LAYERS, str(report)
    return {s.name: s.phases for s in report.rewritten}


def test_first_block_cache_that_never_skips_changes_nothing():
    from diffusers.hooks import FirstBlockCacheConfig

    expected = plain_adaspa_outputs()
    model, kwargs = tiny_wan()
    model.enable_cache(FirstBlockCacheConfig(threshold=0.0))
    outs = run(model, kwargs, torch.compile(model, backend="adaspa", options=OPTIONS), True)
    for got, want in zip(outs, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert phases_by_layer(model) == {name: {0: "DFSCSS"} for name in LAYERS}
    assert adaspa_compile.report(model).step == STEPS - 1


def test_a_layer_the_cache_skips_records_only_the_steps_it_ran():
    """A First-Block Cache that skips every step after the first: the later blocks run only at
    step 0, so their sites show one dense step, while the first block follows the schedule."""
    from diffusers.hooks import FirstBlockCacheConfig

    model, kwargs = tiny_wan()
    model.enable_cache(FirstBlockCacheConfig(threshold=1e9))
    run(model, kwargs, torch.compile(model, backend="adaspa", options=OPTIONS), True)
    assert phases_by_layer(model) == {"blocks.0.attn1": {0: "DFSCSS"}, "blocks.1.attn1": {0: "D"}}


def test_taylorseer_cache_keeps_one_site_per_layer():
    from diffusers.hooks import TaylorSeerCacheConfig

    model, kwargs = tiny_wan()
    model.enable_cache(TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1))
    outs = run(model, kwargs, torch.compile(model, backend="adaspa", options=OPTIONS), True)
    assert all(torch.isfinite(o).all() for o in outs)
    phases = phases_by_layer(model)
    assert all(set(p) == {0} and p[0][:2] == "DF" for p in phases.values()), phases


def test_magcache_runs_outside_the_compiled_graph_and_the_report_says_so():
    """diffusers wraps MagCache's hooks in ``torch.compiler.disable``: the blocks run eagerly,
    no graph holds an SDPA call, and the report says that nothing is accelerated."""
    from diffusers.hooks import MagCacheConfig

    model, kwargs = tiny_wan()
    model.enable_cache(MagCacheConfig(threshold=10.0, max_skip_steps=2, retention_ratio=0.34,
                                      num_inference_steps=STEPS, mag_ratios=[1.0] * STEPS))
    outs = run(model, kwargs, torch.compile(model, backend="adaspa", options=OPTIONS), True)
    assert all(torch.isfinite(o).all() for o in outs)
    report = adaspa_compile.report(model)
    assert not report.sites and any("nothing in it is accelerated" in n for n in report.notes)


def test_group_offloading_changes_nothing():
    pytest.importorskip("accelerate")
    expected = plain_adaspa_outputs()
    model, kwargs = tiny_wan()
    model.enable_group_offload(onload_device=torch.device("cpu"),
                               offload_device=torch.device("cpu"), offload_type="block_level",
                               num_blocks_per_group=1)
    outs = run(model, kwargs, torch.compile(model, backend="adaspa", options=OPTIONS), False)
    for got, want in zip(outs, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert phases_by_layer(model) == {name: {0: "DFSCSS"} for name in LAYERS}
