"""A real diffusers pipeline loop: WanPipeline, tiny random transformer and VAE, CFG on."""

import gc

import pytest
import torch

import adaspa_compile
from adaspa_compile.state import state_of
from tests.tiny_models import tiny_wan_pipeline, wan_prompt_embeds

pytestmark = pytest.mark.usefixtures("fresh_compile")

STEPS = 12
OPTIONS = {"min_seq_len": 128, "search_steps": (3, 8), "sparsity": 0.6}


def generate(pipe, embeds):
    prompt_embeds, negative = embeds
    return pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative, guidance_scale=5.0,
                num_inference_steps=STEPS, height=128, width=128, num_frames=13,
                output_type="latent", generator=torch.Generator().manual_seed(0)).frames


def test_wan_pipeline_phases_per_step_and_branch_without_recompiles():
    pipe = tiny_wan_pipeline()
    embeds = wan_prompt_embeds(pipe)
    dense = generate(pipe, embeds)
    pipe.transformer = torch.compile(pipe.transformer, backend="adaspa", fullgraph=True,
                                     options=OPTIONS)
    first = generate(pipe, embeds)
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = generate(pipe, embeds)
    torch.testing.assert_close(second, first)  # the second generation repeats the first
    assert torch.isfinite(first).all() and not torch.equal(first, dense)
    report = adaspa_compile.report()
    assert report.clock == "timestep" and report.generation == 1 and report.step == STEPS - 1
    expected = "DDDFSSSSCSSS"
    assert len(report.rewritten) == 2  # attn1 of the two blocks; attn2 is cross-attention
    for site in report.rewritten:
        assert site.phases == {0: expected, 1: expected}
    assert all("cross-attention" in s.reason for s in report.skipped)


def test_wan_pipeline_sparsity_zero_matches_dense():
    pipe = tiny_wan_pipeline()
    embeds = wan_prompt_embeds(pipe)
    dense = generate(pipe, embeds)
    pipe.transformer = torch.compile(pipe.transformer, backend="adaspa", fullgraph=True,
                                     options=dict(OPTIONS, sparsity=0.0))
    torch.testing.assert_close(generate(pipe, embeds), dense, atol=1e-4, rtol=1e-4)


def test_wan_pipeline_share_cfg_mask_reuses_the_cond_mask():
    """With ``share_cfg_mask`` the unconditional branch never searches: it runs block-sparse with
    the conditional branch's fresh mask from the first search step on."""
    pipe = tiny_wan_pipeline()
    embeds = wan_prompt_embeds(pipe)
    pipe.transformer = torch.compile(pipe.transformer, backend="adaspa", fullgraph=True,
                                     options=dict(OPTIONS, share_cfg_mask=True))
    model = pipe.transformer._orig_mod
    used = {}  # (step, branch) -> ids of the masks the sparse calls ran with, in call order
    sparse_forward = adaspa_compile.ops.sparse_forward

    def recording(q, k, v, mask, *args):
        clock = state_of(model).clock
        used.setdefault((clock.step, clock.branch), []).append(id(mask))
        return sparse_forward(q, k, v, mask, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(adaspa_compile.ops, "sparse_forward", recording)
        shared = generate(pipe, embeds)
    assert torch.isfinite(shared).all()
    # Search steps 3 (fused) and 8 (cached): only the cond call searches; the uncond call runs
    # with exactly the masks the cond call has at that point (the same objects).
    assert sorted(used) == sorted([(3, 1)] + [(s, b) for s in range(4, STEPS) for b in (0, 1)])
    assert used[(3, 1)] == used[(4, 0)]  # the masks the fused search just chose
    for step in range(4, STEPS):
        assert used[(step, 1)] == used[(step, 0)]
    report = adaspa_compile.report()
    for row in report.rewritten:
        assert row.phases == {0: "DDDFSSSSCSSS", 1: "DDDSSSSSSSSS"}
        caches = state_of(model).sites[row.name].caches
        assert caches[0].mask is not None and caches[1].mask is None and caches[1].lse is None
    torch._dynamo.reset()
    gc.collect()
    pipe.transformer = torch.compile(pipe.transformer._orig_mod, backend="adaspa",
                                     fullgraph=True, options=OPTIONS)
    assert not torch.equal(generate(pipe, embeds), shared)  # per-branch masks differ


def tiny_wan22_pipeline():
    """Wan 2.2 A14B's layout: a high-noise expert (``transformer``) and a low-noise expert
    (``transformer_2``) of one class and config, switched at ``boundary_ratio``."""
    from diffusers import WanPipeline

    from tests.tiny_models import _tiny_wan_transformer

    base = tiny_wan_pipeline()
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=base.vae, scheduler=base.scheduler,
                       transformer=base.transformer,
                       transformer_2=_tiny_wan_transformer(seed=7, in_channels=16),
                       boundary_ratio=0.5)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_wan22_experts_search_their_own_masks():
    """Each expert has its own clock, sites and masks. The low-noise expert first runs at a
    step past the search steps, so its first call is its own fused search, not a sparse step on
    the other expert's mask; the steps are the pipeline scheduler's."""
    pipe = tiny_wan22_pipeline()
    embeds = wan_prompt_embeds(pipe)
    high, low = pipe.transformer, pipe.transformer_2
    pipe.transformer = torch.compile(high, backend="adaspa", fullgraph=True, options=OPTIONS)
    pipe.transformer_2 = torch.compile(low, backend="adaspa", fullgraph=True, options=OPTIONS)
    first = generate(pipe, embeds)
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = generate(pipe, embeds)
    torch.testing.assert_close(second, first, atol=0, rtol=0)
    report = adaspa_compile.report()
    assert [m.label for m in report.models] == ["WanTransformer3DModel#0",
                                                "WanTransformer3DModel#1"]
    assert all(m.steps_from == "scheduler" and m.generation == 1 for m in report.models)
    high_rows = adaspa_compile.report(high).rewritten
    low_rows = adaspa_compile.report(low).rewritten
    assert [r.name for r in high_rows] == [r.name for r in low_rows] == ["blocks.0.attn1",
                                                                          "blocks.1.attn1"]
    switch = len(high_rows[0].phases[0])  # the first step the low-noise expert runs
    assert switch > OPTIONS["search_steps"][-1], str(report)  # it joins after the last search
    for row in high_rows:
        assert row.phases == {b: "DDDFSSSSC" + "S" * (switch - 9) for b in (0, 1)}, str(report)
    for row in low_rows:
        assert row.phases == {b: "F" + "S" * (STEPS - switch - 1) for b in (0, 1)}, str(report)
    high_masks = {id(c.mask) for s in state_of(high).sites.values() for c in s.caches.values()}
    low_masks = {id(c.mask) for s in state_of(low).sites.values() for c in s.caches.values()}
    assert len(low_masks) == 4 and not high_masks & low_masks


def test_model_cpu_offload_changes_nothing():
    """accelerate's offload hooks around the compiled transformer (they break the graph, so no
    ``fullgraph``): the same latents and phases as without them."""
    pytest.importorskip("accelerate")
    outputs, phases = [], []
    for offload in (False, True):
        torch._dynamo.reset()
        pipe = tiny_wan_pipeline()
        if offload:
            pipe.enable_model_cpu_offload(device="cpu")
        model = pipe.transformer
        pipe.transformer = torch.compile(model, backend="adaspa", options=OPTIONS)
        outputs.append(generate(pipe, wan_prompt_embeds(pipe)))
        phases.append({s.name: s.phases for s in adaspa_compile.report(model).rewritten})
        del pipe, model
        gc.collect()
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)
    assert phases[1] == phases[0] and len(phases[0]) == 2
    assert all(p == {0: "DDDFSSSSCSSS", 1: "DDDFSSSSCSSS"} for p in phases[0].values())
