"""Each compiled model owns its clock, sites and caches: two instances of one class, two experts
of one pipeline, lifecycle, recompiles with other options, report and reset per model."""

import copy
import gc
import weakref

import pytest
import torch

import adaspa_compile
from adaspa_compile.state import state_of
from tests.dit import TinyDiT, tiny_dit_inputs

pytestmark = pytest.mark.usefixtures("fresh_compile")

OPTIONS = {"min_seq_len": 128, "search_steps": (2, 4), "sparsity": 0.5, "inner_backend": "eager"}
TIMESTEPS = [1000.0 - 100 * i for i in range(7)]
OFFSET = 50.0  # model B runs 50 timesteps behind model A


def tiny_dit(seed: int) -> TinyDiT:
    torch.manual_seed(seed)
    return TinyDiT().eval()


def call(compiled, inputs, t: float, branches: int = 1):
    with torch.no_grad():
        return [compiled(**dict(inputs, timestep=torch.tensor([t]))) for _ in range(branches)]


def alone(model, inputs, timesteps, options, branches=1):
    """Outputs of a copy of ``model`` compiled on its own, in a fresh Dynamo."""
    torch._dynamo.reset()
    solo = torch.compile(copy.deepcopy(model), backend="adaspa", fullgraph=True, options=options)
    outs = [o for t in timesteps for o in call(solo, inputs, t, branches)]
    del solo
    torch._dynamo.reset()
    gc.collect()
    return outs


@pytest.mark.parametrize("share_cfg_mask", [False, True])
def test_two_instances_of_one_class_keep_their_own_masks_and_clock(share_cfg_mask):
    options = dict(OPTIONS, share_cfg_mask=share_cfg_mask)
    a, b = tiny_dit(0), tiny_dit(1)
    inputs = tiny_dit_inputs()
    t_b = [t - OFFSET for t in TIMESTEPS]
    expected_a = alone(a, inputs, TIMESTEPS, options, branches=2)
    expected_b = alone(b, inputs, t_b, options, branches=2)
    ca = torch.compile(a, backend="adaspa", fullgraph=True, options=options)
    cb = torch.compile(b, backend="adaspa", fullgraph=True, options=options)
    got_a, got_b = [], []
    for ta, tb in zip(TIMESTEPS, t_b):  # alternately: A's step, then B's
        got_a += call(ca, inputs, ta, branches=2)
        got_b += call(cb, inputs, tb, branches=2)
    for i, (got, want) in enumerate(zip(got_a, expected_a)):
        assert torch.equal(got, want), f"model A, call {i}"
    for i, (got, want) in enumerate(zip(got_b, expected_b)):
        assert torch.equal(got, want), f"model B, call {i}"
    report = adaspa_compile.report()
    assert [m.label for m in report.models] == ["TinyDiT#0", "TinyDiT#1"]
    assert [s.name for s in report.rewritten] == ["blocks.0", "blocks.1"] * 2
    for model in (a, b):
        sites = state_of(model).sites.values()
        assert {s.name for s in sites} == {"blocks.0", "blocks.1"}
    masks_a, masks_b = ({id(c.mask) for s in state_of(m).sites.values()
                         for c in s.caches.values() if c.mask is not None} for m in (a, b))
    assert masks_a and masks_b and not masks_a & masks_b


def test_report_and_reset_take_the_model_or_its_compiled_wrapper():
    a, b = tiny_dit(0), tiny_dit(1)
    inputs = tiny_dit_inputs()
    ca = torch.compile(a, backend="adaspa", fullgraph=True, options=OPTIONS)
    cb = torch.compile(b, backend="adaspa", fullgraph=True, options=OPTIONS)
    for t in TIMESTEPS[:3]:
        call(ca, inputs, t)
        call(cb, inputs, t)
    for handle in (a, ca):
        report = adaspa_compile.report(handle)
        assert [m.label for m in report.models] == ["TinyDiT#0"]
        assert report.step == 2 and all(s.model == "TinyDiT#0" for s in report.sites)
    adaspa_compile.reset(cb)
    assert adaspa_compile.report(b).rewritten[0].phases == {}
    assert adaspa_compile.report(a).rewritten[0].phases == {0: "DDF"}
    call(cb, inputs, TIMESTEPS[3])
    assert adaspa_compile.report(b).rewritten[0].phases == {0: "D"}
    with pytest.raises(ValueError, match="holds models"):
        adaspa_compile.report().step
    with pytest.raises(ValueError, match="has no adaspa state"):
        adaspa_compile.report(tiny_dit(2))


def test_a_deleted_model_leaves_no_trace():
    model = tiny_dit(0)
    compiled = torch.compile(model, backend="adaspa", fullgraph=True, options=OPTIONS)
    for t in TIMESTEPS[:4]:
        call(compiled, tiny_dit_inputs(), t)
    site = next(iter(state_of(model).sites.values()))
    lse, mask = weakref.ref(site.caches[0].lse), weakref.ref(site.caches[0].mask)
    state = weakref.ref(state_of(model))
    assert adaspa_compile.report().rewritten
    del model, compiled, site
    gc.collect()
    assert state() is None and lse() is None and mask() is None
    assert not adaspa_compile.report().sites and not adaspa_compile.report().models


def test_other_options_on_a_live_compile_are_an_error_and_a_recompile_takes_them():
    model = tiny_dit(0)
    inputs = tiny_dit_inputs()
    first = torch.compile(model, backend="adaspa", fullgraph=True, options=OPTIONS)
    call(first, inputs, TIMESTEPS[0])
    second = torch.compile(model, backend="adaspa", fullgraph=True,
                           options=dict(OPTIONS, sparsity=0.9))
    with pytest.raises(Exception, match="twice with different options.*sparsity=0.5.*"
                                        "sparsity=0.9"):
        call(second, inputs, TIMESTEPS[0])
    torch._dynamo.reset()
    gc.collect()
    call(second, inputs, TIMESTEPS[0])
    assert state_of(model).cfg.sparsity == 0.9


class PythonTimestep(TinyDiT):
    """Takes the timestep as a Python float."""

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask=None):
        return super().forward(hidden_states, torch.tensor([timestep]), encoder_hidden_states,
                               encoder_attention_mask)


def test_timestep_as_a_python_number_recompiles_once_and_keeps_one_site_per_call():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = PythonTimestep().eval()
    inputs = tiny_dit_inputs()
    compiled = torch.compile(model, backend="adaspa", options=OPTIONS)
    counters.clear()
    with torch.no_grad():
        for t in TIMESTEPS[:4]:
            compiled(**dict(inputs, timestep=t))
    assert counters["stats"]["unique_graphs"] <= 2
    report = adaspa_compile.report(model)
    assert [s.name for s in report.rewritten] == ["blocks.0", "blocks.1"]
    assert all(s.phases == {0: "DDFS"} for s in report.rewritten), str(report)
