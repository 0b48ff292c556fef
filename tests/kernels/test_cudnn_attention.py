"""cuDNN and FlashAttention-4 dense attention + LSE (the exact search's first half on CUDA)
against the reference, and the order in which ``ops.fused_search`` tries them."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings

from adaspa_compile import kernels, ops, reference
from adaspa_compile.kernels import cudnn_attention, dispatch, fa4_attention
from adaspa_compile.kernels.cudnn_attention import (cudnn_attention_with_lse,
                                                    cudnn_unsupported_reason)

from .test_kernels import (GPU_CASES, Case, check_lse, f64, gpu_only, make_key_valid,
                           make_qkv, mass_tolerance, out_tolerance, rel_err)


def test_unsupported_inputs_decline_with_a_reason():
    q = torch.randn(1, 2, 64, 64)
    assert cudnn_unsupported_reason(q, None) == "not a CUDA tensor"
    assert cudnn_attention_with_lse(q, q, q, 0.125, None) is None


def test_fa4_declines_with_a_reason(monkeypatch):
    q = torch.randn(1, 2, 64, 64)
    assert fa4_attention.fa4_unsupported_reason(q, None) == "not a CUDA tensor"
    assert fa4_attention.fa4_attention_with_lse(q, q, q, 0.125, None) is None
    monkeypatch.setenv("ADASPA_FA4", "0")
    assert fa4_attention.fa4_unsupported_reason(q, None) == "ADASPA_FA4=0"


@pytest.mark.parametrize("takers", [{"fa4"}, {"cudnn"}, {"triton"}, {"fa4", "triton"}])
def test_dense_pass_runs_the_first_executor_that_takes_the_call(monkeypatch, takers):
    """``ops.fused_search`` tries the dispatch's order and stops at the first result; the mass
    pass reads that result's LSE."""
    q = torch.randn(1, 2, 100, 64)
    calls = []

    def executor(name):
        def run(*args):
            calls.append(name)
            return (torch.full_like(q, len(calls)), torch.zeros(q.shape[:3])) \
                if name in takers else None
        return run

    monkeypatch.setattr(ops, "_kernels_for", lambda q_, block_size, scale: kernels)
    monkeypatch.setattr(dispatch, "dense_pass_order", lambda call: ("fa4", "cudnn", "triton"))
    monkeypatch.setattr(fa4_attention, "fa4_attention_with_lse", executor("fa4"))
    monkeypatch.setattr(cudnn_attention, "cudnn_attention_with_lse", executor("cudnn"))
    monkeypatch.setattr(kernels, "attention_with_lse", executor("triton"))
    monkeypatch.setattr(kernels, "mass_from_lse", lambda *args: "mass")
    out, lse, mass = ops.fused_search(q, q, q, 0.125, 64, None)
    first = next(name for name in ("fa4", "cudnn", "triton") if name in takers)
    assert calls == ["fa4", "cudnn", "triton"][:["fa4", "cudnn", "triton"].index(first) + 1]
    assert float(out[0, 0, 0, 0]) == len(calls) and mass == "mass"


@settings(settings.get_profile("kernels-gpu"))
@given(case=GPU_CASES)
def test_fused_search_through_ops_matches_reference_gpu(case):
    """``ops.fused_search``: cuDNN output and LSE (or the Triton fallback) and the mass."""
    q, k, v = make_qkv(case, torch.bfloat16, "cuda")
    kv = make_key_valid(case, "cuda")
    scale = case.head_dim ** -0.5
    kv_cpu = None if kv is None else kv.cpu()
    out, lse, mass = ops.fused_search(q, k, v, scale, case.block_size, kv)
    ref_out, ref_lse = reference.attention_with_lse_ref(f64(q), f64(k), f64(v), scale, kv_cpu,
                                                        case.block_size)
    plain, _ = reference.attention_with_lse_ref(q, k, v, scale, kv, case.block_size)
    err = rel_err(out, ref_out)
    assert err < out_tolerance(torch.bfloat16, rel_err(plain, ref_out)), f"out rel err {err:.2e}"
    check_lse(lse, ref_lse, 1e-3)
    ref_mass = reference.block_mass_ref(f64(q), f64(k), ref_lse.double(), scale, case.block_size,
                                        kv_cpu)
    assert rel_err(mass, ref_mass) < mass_tolerance(torch.bfloat16)


@pytest.mark.parametrize("padding", ["none", "tail", "random"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cudnn_runs_and_matches_gpu(padding, head_dim):
    """cuDNN itself (not the fallback) runs the shapes the backend sends, padding included."""
    case = Case(batch=2, heads=3, seq_len=1000, head_dim=head_dim, block_size=64, layout="bshd",
                padding=padding, density=1.0, input_scale=1.0, seed=7)
    q, k, v = make_qkv(case, torch.bfloat16, "cuda")
    kv = make_key_valid(case, "cuda")
    got = cudnn_attention_with_lse(q, k, v, head_dim ** -0.5, kv)
    assert got is not None, "cuDNN declined (see the log line)"
    kv_cpu = None if kv is None else kv.cpu()
    ref_out, ref_lse = reference.attention_with_lse_ref(f64(q), f64(k), f64(v), head_dim ** -0.5,
                                                        kv_cpu, 64)
    assert rel_err(got[0], ref_out) < 1e-2
    check_lse(got[1], ref_lse, 1e-3)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_fa4_runs_and_matches_gpu(head_dim):
    """FlashAttention-4 (where installed: it is optional) against the reference."""
    case = Case(batch=2, heads=3, seq_len=1000, head_dim=head_dim, block_size=64, layout="bshd",
                padding="none", density=1.0, input_scale=1.0, seed=7)
    q, k, v = make_qkv(case, torch.bfloat16, "cuda")
    reason = fa4_attention.fa4_unsupported_reason(q, None)
    if "not importable" in reason:
        pytest.skip(reason)
    got = fa4_attention.fa4_attention_with_lse(q, k, v, head_dim ** -0.5, None)
    assert got is not None, f"FlashAttention-4 declined: {reason}"
    ref_out, ref_lse = reference.attention_with_lse_ref(f64(q), f64(k), f64(v), head_dim ** -0.5,
                                                        None, 64)
    assert got[0].shape == q.shape and got[1].shape == q.shape[:3]
    assert rel_err(got[0], ref_out) < 1e-2
    check_lse(got[1], ref_lse, 1e-3)


for _test in (test_fused_search_through_ops_matches_reference_gpu, test_cudnn_runs_and_matches_gpu,
              test_fa4_runs_and_matches_gpu):
    for _mark in gpu_only:
        _mark(_test)


def test_valid_keys_slices_a_prefix_and_gathers_otherwise():
    from adaspa_compile.kernels.cudnn_attention import _valid_keys

    k, v = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 8)
    key_valid = torch.ones(2, 10, dtype=torch.bool)
    key_valid[0, 7:] = False            # a padded tail: a view of the prefix
    key_valid[1, [1, 4]] = False        # scattered padding: a gather
    k0, v0 = _valid_keys(k, v, key_valid, 0)
    assert k0.data_ptr() == k.data_ptr() and torch.equal(v0, v[:1, :, :7])
    k1, v1 = _valid_keys(k, v, key_valid, 1)
    keep = [0, 2, 3, 5, 6, 7, 8, 9]
    assert torch.equal(k1, k[1:2, :, keep]) and torch.equal(v1, v[1:2, :, keep])
