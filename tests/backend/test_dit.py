"""The backend end to end on a hand-written DiT (plain nn.Module, F.scaled_dot_product_attention)."""

import logging

import pytest
import torch

import adaspa_compile
from adaspa_compile.state import state_of
from tests.dit import Block, TinyDiT, tiny_dit_inputs

OPTIONS = {"min_seq_len": 128, "search_steps": (2, 4), "sparsity": 0.5}
TIMESTEPS = [1000.0 - 100 * i for i in range(7)]

pytestmark = pytest.mark.usefixtures("fresh_compile")


def model():
    torch.manual_seed(0)
    return TinyDiT().eval()


def run_steps(fn, inputs, timesteps=TIMESTEPS, branches=1):
    outs = []
    with torch.no_grad():
        for t in timesteps:
            for _ in range(branches):
                outs.append(fn(**dict(inputs, timestep=torch.tensor([t]))))
    return outs


def test_phases_follow_the_schedule_and_sites_are_reported():
    m = model()
    compiled = torch.compile(m, backend="adaspa", fullgraph=True, options=OPTIONS)
    run_steps(compiled, tiny_dit_inputs())
    report = adaspa_compile.report()
    assert report.clock == "timestep"
    assert len(report.rewritten) == 2 and len(report.skipped) == 2
    for site in report.rewritten:
        assert site.phases == {0: "DDFSCSS"}
        assert site.text.startswith("last 40")
        assert len(site.search_ms) == 2
        assert 0 < site.mean_density() < 1
    assert all("cross-attention" in s.reason for s in report.skipped)
    text = str(report)
    assert "b0:D2 F S C S2" in text and "cross-attention" in text


def test_dense_steps_equal_eager_exactly():
    m = model()
    inputs = tiny_dit_inputs()
    compiled = torch.compile(m, backend="adaspa", fullgraph=True,
                             options=dict(OPTIONS, inner_backend="eager"))
    eager = run_steps(m, inputs, TIMESTEPS[:2])
    ours = run_steps(compiled, inputs, TIMESTEPS[:2])
    for a, b in zip(eager, ours):
        assert torch.equal(a, b)


def test_inductor_dense_and_fused_search_steps_match_eager():
    m = model()
    inputs = tiny_dit_inputs()
    compiled = torch.compile(m, backend="adaspa", fullgraph=True, options=OPTIONS)
    eager = run_steps(m, inputs, TIMESTEPS[:3])
    ours = run_steps(compiled, inputs, TIMESTEPS[:3])
    for a, b in zip(eager, ours):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_sparsity_zero_equals_dense_at_every_step():
    m = model()
    inputs = tiny_dit_inputs()
    compiled = torch.compile(m, backend="adaspa", fullgraph=True,
                             options=dict(OPTIONS, sparsity=0.0, inner_backend="aot_eager"))
    eager = run_steps(m, inputs)
    ours = run_steps(compiled, inputs)
    for a, b in zip(eager, ours):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    assert adaspa_compile.report().rewritten[0].phases == {0: "DDFSCSS"}


def test_cfg_branches_keep_their_own_caches():
    m = model()
    compiled = torch.compile(m, backend="adaspa", fullgraph=True, options=OPTIONS)
    run_steps(compiled, tiny_dit_inputs(), branches=2)
    row = adaspa_compile.report().rewritten[0]
    site = state_of(m).sites[row.name]
    assert row.phases == {0: "DDFSCSS", 1: "DDFSCSS"}
    assert set(site.caches) == {0, 1}
    assert site.caches[0].mask is not site.caches[1].mask


def test_no_recompiles_across_steps_and_generations():
    m = model()
    inputs = tiny_dit_inputs()
    compiled = torch.compile(m, backend="adaspa", fullgraph=True, options=OPTIONS)
    run_steps(compiled, inputs, [50.0])  # compiles; the next call jumps up: a new generation
    with torch._dynamo.config.patch(error_on_recompile=True):
        run_steps(compiled, inputs)
        run_steps(compiled, inputs)
    report = adaspa_compile.report()
    assert report.generation == 2
    assert report.rewritten[0].phases == {0: "DDFSCSS"}


def test_new_shape_starts_a_new_generation():
    m = model()
    compiled = torch.compile(m, backend="adaspa", options=OPTIONS, dynamic=False)
    run_steps(compiled, tiny_dit_inputs(), TIMESTEPS[:4])
    run_steps(compiled, tiny_dit_inputs(tokens=640), TIMESTEPS[4:6])
    assert state_of(m).clock.generation == 1
    assert state_of(m).clock.step == 1


def test_reset_starts_over():
    m = model()
    compiled = torch.compile(m, backend="adaspa", fullgraph=True, options=OPTIONS)
    run_steps(compiled, tiny_dit_inputs(), TIMESTEPS[:4])
    adaspa_compile.reset()
    run_steps(compiled, tiny_dit_inputs(), TIMESTEPS[4:6])
    assert adaspa_compile.report().rewritten[0].phases == {0: "DD"}


def test_text_override_and_no_text():
    m = model()
    compiled = torch.compile(m, backend="adaspa", fullgraph=True,
                             options=dict(OPTIONS, text_tokens=0))
    run_steps(compiled, tiny_dit_inputs(), TIMESTEPS[:3])
    assert adaspa_compile.report().rewritten[0].text == "none (override)"


def test_bad_options_raise_a_clear_error():
    compiled = torch.compile(model(), backend="adaspa", options={"sparsity": 2.0})
    with pytest.raises(Exception, match="sparsity"):
        run_steps(compiled, tiny_dit_inputs(), TIMESTEPS[:1])


def test_reduce_overhead_is_refused():
    compiled = torch.compile(model(), backend="adaspa", mode="reduce-overhead")
    with pytest.raises(Exception, match="reduce-overhead"):
        run_steps(compiled, tiny_dit_inputs(), TIMESTEPS[:1])


def test_a_lone_block_counts_its_calls():
    """A block compiled on its own (no model around it that takes a timestep) counts steps as
    calls, and its report says so."""
    block = Block(32, 4).eval()
    compiled = torch.compile(block, backend="adaspa", options=OPTIONS)
    x, text = torch.randn(1, 256, 32), torch.randn(1, 40, 32)
    with torch.no_grad():
        for _ in range(4):
            compiled(x, text, torch.randn(1, 32), None)
    report = adaspa_compile.report(block)
    assert report.clock == "forward count" and report.rewritten[0].phases == {0: "DDFS"}
    assert any("takes no timestep" in n for n in report.notes)


def test_grad_mode_leaves_sdpa_dense_with_reason():
    m = model()
    compiled = torch.compile(m, backend="adaspa", options=dict(OPTIONS, inner_backend="aot_eager"))
    out = compiled(**tiny_dit_inputs())
    torch.testing.assert_close(out, m(**tiny_dit_inputs()), atol=1e-5, rtol=1e-5)
    report = adaspa_compile.report()
    assert not report.rewritten and all("autograd" in s.reason for s in report.skipped[:2])


def test_no_timestep_counts_calls_and_says_so():
    class NoTimestep(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model()

        def forward(self, hidden_states, encoder_hidden_states):
            return self.inner(hidden_states, torch.tensor([500.0]), encoder_hidden_states)

    compiled = torch.compile(NoTimestep().eval(), backend="adaspa", fullgraph=True, options=OPTIONS)
    inputs = tiny_dit_inputs()
    with torch.no_grad():
        for _ in range(4):
            compiled(inputs["hidden_states"], inputs["encoder_hidden_states"])
    report = adaspa_compile.report()
    assert report.clock == "forward count"
    assert report.rewritten[0].phases == {0: "DDFS"}
    assert any("takes no timestep" in n for n in report.notes)


def test_graph_without_sdpa_warns_that_nothing_is_accelerated(caplog):
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())
    with caplog.at_level(logging.WARNING), torch.no_grad():
        torch.compile(mlp, backend="adaspa")(torch.randn(2, 8))
    assert any("nothing in it is accelerated" in n for n in adaspa_compile.report().notes)


def test_additive_mask_with_bias_values_stays_dense():
    class Biased(torch.nn.Module):
        def forward(self, hidden_states, timestep):
            q = hidden_states.view(1, -1, 2, 8).transpose(1, 2)
            bias = torch.linspace(-1, 0, q.shape[2])[None, None, None, :]
            return torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=bias)

    m = Biased()
    compiled = torch.compile(m, backend="adaspa", fullgraph=True,
                             options=dict(OPTIONS, search_steps=(0,)))
    x = torch.randn(1, 256, 16)
    with torch.no_grad():
        outs = [compiled(x, torch.tensor([t])) for t in (900.0, 800.0)]
    torch.testing.assert_close(outs[-1], m(x, None))
    site = adaspa_compile.report().rewritten[0]
    assert "not a key-padding mask" in site.reason and site.phases == {0: "DD"}


def test_graph_break_after_temb_is_not_taken_for_a_single_block():
    class Broken(TinyDiT):
        def forward(self, hidden_states, timestep, encoder_hidden_states,
                    encoder_attention_mask=None):
            temb = self.time(timestep.float().view(-1, 1) / 1000)
            x = self.blocks[0](hidden_states, encoder_hidden_states, temb, None)
            torch._dynamo.graph_break()  # the resume graph takes `temb` but no timestep
            return self.out(self.blocks[1](x, encoder_hidden_states, temb, None))

    torch.manual_seed(0)
    m = Broken().eval()
    compiled = torch.compile(m, backend="adaspa", options=OPTIONS)
    inputs = dict(tiny_dit_inputs(), encoder_attention_mask=None)
    eager = run_steps(m, inputs, TIMESTEPS[:2])
    ours = run_steps(compiled, inputs, TIMESTEPS[:2])
    torch.testing.assert_close(ours[-1], eager[-1], atol=1e-5, rtol=1e-5)
    report = adaspa_compile.report()
    assert report.clock == "timestep" and len(report.rewritten) == 2
    assert all(s.phases == {0: "DD"} for s in report.rewritten)
    # The resume graph is a piece of a timestep-driven model: no "no timestep" note for it.
    assert not any("takes no timestep" in n for n in report.notes), report.notes


def test_text_tokens_longer_than_the_sequence_is_an_error():
    m = model()
    compiled = torch.compile(m, backend="adaspa", fullgraph=True,
                             options=dict(OPTIONS, text_tokens=("last", 100000)))
    with pytest.raises(Exception, match=r"text_tokens=\('last', 100000\).*attends over 552"):
        run_steps(compiled, tiny_dit_inputs(), TIMESTEPS[:1])


def test_nan_at_a_search_step_keeps_the_site_dense_and_says_so():
    """A NaN in the inputs at a search step: the site runs the model's own SDPA from then on
    (the NaN shows as it would without adaspa), logged once and reported."""
    m = model()
    inputs = tiny_dit_inputs()
    compiled = torch.compile(m, backend="adaspa", fullgraph=True,
                             options=dict(OPTIONS, inner_backend="aot_eager"))
    bad = dict(inputs, hidden_states=inputs["hidden_states"].clone())
    bad["hidden_states"][0, 3, 0] = float("nan")
    with torch.no_grad():
        for i, t in enumerate(TIMESTEPS[:4]):
            args = dict(bad if i == 2 else inputs, timestep=torch.tensor([t]))
            out, want = compiled(**args), m(**args)
            assert torch.equal(out.isnan(), want.isnan())
    report = adaspa_compile.report(m)
    for site in report.rewritten:
        assert site.phases == {0: "DDDD"} and "NaN or Inf at step 2" in site.reason, str(report)


def test_fp8_precision_changes_only_the_sparse_steps():
    """On the CPU ``precision="fp8"`` runs the FP8 reference: the dense and search steps are
    those of the default precision, the sparse steps near them."""
    inputs = tiny_dit_inputs()
    options = dict(OPTIONS, inner_backend="aot_eager")
    default_model = torch.compile(model(), backend="adaspa", fullgraph=True, options=options)
    fp8_model = torch.compile(model(), backend="adaspa", fullgraph=True,
                              options=dict(options, precision="fp8"))
    default, fp8 = run_steps(default_model, inputs), run_steps(fp8_model, inputs)
    report = adaspa_compile.report()
    assert len(report.rewritten) == 4
    assert all(s.phases == {0: "DDFSCSS"} for s in report.rewritten)
    assert sorted(m.precision for m in report.models) == ["bf16", "fp8"]
    assert "sparse steps in FP8" in str(report)
    for step, (a, b) in enumerate(zip(default, fp8)):
        if step < 3:  # dense, dense, fused search
            assert torch.equal(a, b)
        else:
            err = float((a - b).norm() / a.norm())
            assert 0 < err < 0.05, f"step {step}: relative difference {err:.3f}"
