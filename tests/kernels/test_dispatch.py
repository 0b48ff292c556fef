"""The kernel choice (``kernels.dispatch``): a pure function of the call's description."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaspa_compile.kernels import dispatch
from adaspa_compile.kernels.dispatch import Call, LaunchOptions

H100 = dict(arch=(9, 0), sm_count=132)
A100 = dict(arch=(8, 0), sm_count=108)
BLACKWELL = dict(arch=(10, 0), sm_count=148)
INTERPRETER = dict(arch=(0, 0), sm_count=0)
bf16 = torch.bfloat16


def call(gpu=H100, dtype=bf16, head_dim=128, block_size=64, **kw) -> Call:
    return Call(**gpu, dtype=dtype, head_dim=head_dim, block_size=block_size, **kw)


calls = st.builds(
    Call, arch=st.sampled_from([(0, 0), (8, 0), (8, 9), (9, 0), (10, 0)]),
    sm_count=st.sampled_from([0, 108, 132]),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
    head_dim=st.integers(1, 128), block_size=st.sampled_from([64, 128]),
    padded=st.booleans(), full_mask=st.booleans(), tma_ok=st.booleans())


def test_block_sparse_on_the_h100():
    """Gluon at head dim 128 (rotated, unrotated on full masks); Triton at 64, with TMA."""
    plan = dispatch.block_sparse_plan(call())
    assert plan.executor == "gluon"
    assert plan.options == LaunchOptions(tma=True, rotate_period=4 * 132, **dispatch.GLUON_OPTIONS)
    assert dispatch.block_sparse_plan(call(full_mask=True)).options.rotate_period == 0
    plan = dispatch.block_sparse_plan(call(head_dim=64, padded=True))
    assert plan.executor == "triton"
    assert plan.options.tma and plan.options.rotate_period == 4 * 132
    assert not plan.options.bias_range  # measured mixed at head dim 64
    assert (plan.options.num_warps, plan.options.num_stages) == (4, 2)


@pytest.mark.parametrize("changes", [dict(dtype=torch.float32), dict(block_size=128),
                                     dict(tma_ok=False), dict(head_dim=96), dict(gpu=A100),
                                     dict(gpu=BLACKWELL)])
def test_block_sparse_keeps_triton_where_gluon_cannot_run(changes):
    plan = dispatch.block_sparse_plan(call(**changes))
    assert plan.executor == "triton"
    assert plan.options.rotate_period == 4 * changes.get("gpu", H100)["sm_count"]


def test_gluon_needs_its_module():
    assert dispatch.block_sparse_plan(call(), gluon_available=False).executor == "triton"


def test_triton_options_where_measured():
    padded_128 = dispatch.block_sparse_plan(call(padded=True), gluon_available=False).options
    assert padded_128.bias_range and padded_128.tma
    assert not dispatch.block_sparse_plan(call(dtype=torch.float32), False).options.tma
    assert not dispatch.block_sparse_plan(call(gpu=A100)).options.tma  # sm90+ only
    interp = dispatch.block_sparse_plan(call(gpu=INTERPRETER, dtype=torch.float32))
    assert interp == dispatch.SparsePlan("triton", LaunchOptions(num_warps=4, num_stages=2))


def test_dense_pass_order():
    assert dispatch.dense_pass_order(call()) == ("fa4", "cudnn", "triton")
    assert dispatch.dense_pass_order(call(head_dim=64)) == ("fa4", "triton")
    assert dispatch.dense_pass_order(call(head_dim=64, padded=True)) == ("cudnn", "triton")
    assert dispatch.dense_pass_order(call(head_dim=80)) == ("cudnn", "triton")
    assert dispatch.dense_pass_order(call(gpu=A100)) == ("cudnn", "triton")
    assert dispatch.dense_pass_order(call(dtype=torch.float32, head_dim=64)) == ("triton",)


def test_mass_pass_options():
    assert dispatch.block_mass_options(call(head_dim=64)) == LaunchOptions(
        num_warps=4, num_stages=3, max_registers=96, tma=True)
    assert dispatch.block_mass_options(call(head_dim=40)).max_registers == 96  # takes 64's
    assert dispatch.block_mass_options(call()) == LaunchOptions(num_warps=8, num_stages=3,
                                                                tma=True)
    assert not dispatch.block_mass_options(call(gpu=A100)).tma


@settings(max_examples=200, deadline=None)
@given(c=calls)
def test_every_call_gets_valid_options(c):
    """Any description gets an executor that can run it and options that validate."""
    plan = dispatch.block_sparse_plan(c)
    assert plan.executor in ("gluon", "triton")
    if plan.executor == "gluon":
        assert c.arch[0] == 9 and c.block_size == 64 and c.tma_ok and c.dtype != torch.float32
    assert plan.options.rotate_period == (0 if plan.executor == "gluon" and c.full_mask
                                          else 4 * c.sm_count)
    order = dispatch.dense_pass_order(c)
    assert order[-1] == "triton" and len(set(order)) == len(order)
    for options in (plan.options, dispatch.block_mass_options(c),
                    dispatch.attention_lse_options(c)):
        assert dataclasses.replace(options) == options  # re-validates


def test_call_of_a_cpu_tensor_is_the_interpreter():
    q = torch.randn(1, 2, 100, 64)
    c = Call.of(q, 64, torch.ones(1, 100, dtype=torch.bool), full_mask=True, tensors=(q,))
    assert (c.arch, c.sm_count, c.padded, c.full_mask, c.tma_ok) == ((0, 0), 0, True, True, True)
    assert not Call.of(q, 64, tensors=(q[..., ::2],)).tma_ok  # strided last dim


def test_supported_block_sizes():
    assert dispatch.supported_block_sizes((9, 0)) == (64, 128)
    assert dispatch.supported_block_sizes((7, 5)) == ()


@pytest.mark.parametrize("block_size,capability,refused", [
    (32, (9, 0), True), (64, (9, 0), False), (128, (8, 0), False), (32, (7, 5), False)])
def test_backend_refuses_a_block_size_no_cuda_kernel_runs(monkeypatch, block_size, capability,
                                                          refused):
    """At compile time, on a GPU that runs the kernels; older GPUs keep the logged reference."""
    from adaspa_compile import backend
    from adaspa_compile.config import AdaSpaConfig

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
    cfg = AdaSpaConfig(block_size=block_size)
    if refused:
        with pytest.raises(ValueError, match=r"block_size=32 has no CUDA kernel.*\(64, 128\)"):
            backend._check_block_size_has_a_kernel(torch.device("cuda"), cfg)
    else:
        backend._check_block_size_has_a_kernel(torch.device("cuda"), cfg)


def test_fp8_runs_its_own_triton_kernel_with_tma_on_hopper():
    hopper = Call(arch=(9, 0), sm_count=132, dtype=torch.bfloat16, head_dim=128, block_size=64,
                  padded=True, fp8=True)
    plan = dispatch.block_sparse_plan(hopper)
    assert plan.executor == "triton-fp8"
    assert plan.options.tma and plan.options.bias_range
    assert plan.options.rotate_period == dispatch.ROTATE_PROGRAMS_PER_SM * 132
    ada = dataclasses.replace(hopper, arch=(8, 9), head_dim=64, padded=False)
    assert not dispatch.block_sparse_plan(ada).options.tma


@pytest.mark.parametrize("arch,head_dim,reason", [
    ((9, 0), 128, ""), ((8, 9), 64, ""), ((0, 0), 64, ""), ((10, 0), 128, ""),
    ((8, 0), 128, r"compute capability 8\.0\) has no FP8 tensor cores"),
    ((9, 0), 80, r"head dims \(64, 128\).*head dim 80"),
    ((0, 0), 32, r"head dim 32")])
def test_fp8_refusal_reasons(arch, head_dim, reason):
    got = dispatch.fp8_refusal(arch, head_dim)
    assert (got == "") if not reason else re.search(reason, got)


def _graph_with_a_site(head_dim: int) -> torch.fx.GraphModule:
    from adaspa_compile import op  # noqa: F401  (registers adaspa::attention)

    graph = torch.fx.Graph()
    q = graph.placeholder("q")
    q.meta["val"] = torch.empty(1, 2, 4096, head_dim)
    graph.output(graph.call_function(torch.ops.adaspa.attention.default,
                                     (q, q, q, None, None, 0)))
    return torch.fx.GraphModule(torch.nn.Module(), graph)


@pytest.mark.parametrize("capability,head_dim,precision,refused", [
    ((8, 0), 128, "fp8", r"no FP8 tensor cores.*Use precision='bf16'"),
    ((9, 0), 96, "fp8", r"head dims \(64, 128\)"),
    ((9, 0), 128, "fp8", None), ((8, 0), 128, "bf16", None)])
def test_backend_refuses_fp8_where_its_kernel_cannot_run(monkeypatch, capability, head_dim,
                                                         precision, refused):
    from adaspa_compile import backend
    from adaspa_compile.config import AdaSpaConfig

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
    gm, cfg = _graph_with_a_site(head_dim), AdaSpaConfig(precision=precision)
    if refused:
        with pytest.raises(ValueError, match=refused):
            backend._check_precision_has_a_kernel(gm, torch.device("cuda"), cfg)
    else:
        backend._check_precision_has_a_kernel(gm, torch.device("cuda"), cfg)
