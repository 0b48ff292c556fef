"""A real diffusers pipeline loop: WanPipeline, tiny random transformer and VAE, CFG on."""

import pytest
import torch

import adaspa_compile
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
    runtime = adaspa_compile.runtime.get_runtime()
    used = {}  # (step, branch) -> ids of the masks the sparse calls ran with, in call order
    sparse_forward = adaspa_compile.ops.sparse_forward

    def recording(q, k, v, mask, *args):
        used.setdefault((runtime.clock.step, runtime.clock.branch), []).append(id(mask))
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
        caches = runtime.site(row.site_id).caches
        assert caches[0].mask is not None and caches[1].mask is None and caches[1].lse is None
    torch._dynamo.reset()
    adaspa_compile.reset(forget_sites=True)
    pipe.transformer = torch.compile(pipe.transformer._orig_mod, backend="adaspa",
                                     fullgraph=True, options=OPTIONS)
    assert not torch.equal(generate(pipe, embeds), shared)  # per-branch masks differ
