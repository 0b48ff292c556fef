"""The FP8 block-sparse kernel and its rounding kernel against the FP8 reference.

Under Triton's interpreter (no CUDA) the kernel runs with fp32 probabilities (the interpreter
cannot round to FP8 correctly), so it is compared with the reference run the same way, to 1e-4.
The ``gpu``-marked runs round the probabilities on the tensor cores against the running row max,
the reference against the final one: they must agree to within twice what that rounding alone
changes in the reference.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaspa_compile import kernels, reference
from adaspa_compile.kernels import dispatch
from adaspa_compile.kernels.dispatch import Call, LaunchOptions

from .test_kernels import Case, cases, make_key_valid, make_mask, make_qkv, poisoned, rel_err

pytest.importorskip("triton")

HAS_CUDA = torch.cuda.is_available()
interpreter_only = pytest.mark.skipif(
    HAS_CUDA, reason="interpreter tests run where CUDA is absent; CUDA runs the gpu-marked ones")
gpu_only = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]

INTERP_CASES = cases(max_blocks=2.6, head_dims=[64, 128])
GPU_CASES = cases(max_blocks=12.5, head_dims=[64, 128])


def run_fp8(case: Case, dtype: torch.dtype, device: str, options: LaunchOptions) -> None:
    q, k, v = make_qkv(case, dtype, device)
    kv = make_key_valid(case, device)
    counts, indices = make_mask(case, device).to_indices()
    scale = case.head_dim ** -0.5
    out = poisoned(q)
    got = kernels.block_sparse_fp8(q, k, v, counts, indices, scale, case.block_size, kv,
                                   options, out=out)
    assert got is out and got.dtype == dtype
    args = (q.cpu(), k.cpu(), v.cpu(), counts.cpu(), indices.cpu(), scale, case.block_size,
            None if kv is None else kv.cpu())
    unrounded = reference.block_sparse_attention_fp8_ref(*args, round_probs=False)
    if device == "cpu":
        err = rel_err(got, unrounded)
        assert err < 1e-4, f"rel err {err:.2e} against the reference (probabilities unrounded)"
        return
    ref = reference.block_sparse_attention_fp8_ref(*args)
    rounding = rel_err(ref, unrounded)
    err = rel_err(got, ref)
    assert err <= 2 * rounding + 1e-2, f"rel err {err:.2e}; rounding p moves {rounding:.2e}"


@interpreter_only
@settings(settings.get_profile("kernels-ci"), max_examples=20)
@given(case=INTERP_CASES, tma=st.booleans(), rotate_period=st.sampled_from([0, 3]),
       bias_range=st.booleans())
def test_block_sparse_fp8_interpreter(case, tma, rotate_period, bias_range):
    run_fp8(case, torch.float32, "cpu",
            LaunchOptions(tma=tma, rotate_period=rotate_period, bias_range=bias_range))


@interpreter_only
def test_fp8_operands_are_the_reference_rounding_in_the_kernel_layouts():
    q, k, v = make_qkv(Case(1, 2, 150, 64, 64, "bshd", "none", 1.0, 1.0, 3), torch.float32, "cpu")
    ops8 = kernels.quantize_fp8(q, k, v, 64)
    ref = reference.quantize_fp8_ref(q, k, v, 64)
    assert ops8.q.shape == ops8.k.shape == (1, 2, 192, 64) and ops8.v_t.shape == (1, 2, 64, 192)
    assert ops8.v_t.is_contiguous()
    assert torch.equal(ops8.q[:, :, :150].float(), ref.q.float())
    assert torch.equal(ops8.v_t.transpose(2, 3)[:, :, :150].float(), ref.v.float())
    assert not ops8.k[:, :, 150:].float().any() and not ops8.v_t[..., 150:].float().any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@settings(settings.get_profile("kernels-gpu"))
@given(case=GPU_CASES)
def test_block_sparse_fp8_gpu(dtype, case):
    q = torch.empty(1, 1, 1, case.head_dim, device="cuda", dtype=dtype)
    plan = dispatch.block_sparse_plan(Call.of(q, case.block_size, fp8=True))
    run_fp8(case, dtype, "cuda", plan.options)


@settings(settings.get_profile("kernels-gpu"))
@given(case=GPU_CASES)
def test_fp8_rounding_kernel_gpu(case):
    """The rounding kernel against PyTorch's: equal scales, equal FP8 values (but for a rare
    tie, where K's mean, summed in another order, differs in its last bit)."""
    q, k, v = make_qkv(case, torch.bfloat16, "cuda")
    got = kernels.quantize_fp8(q, k, v, case.block_size)
    ref = reference.quantize_fp8_ref(q, k, v, case.block_size)
    L = case.seq_len
    assert torch.equal(got.q_scale, ref.q_scale) and torch.equal(got.v_scale, ref.v_scale)
    assert torch.allclose(got.k_scale, ref.k_scale, rtol=1e-5)
    assert torch.equal(got.q[:, :, :L].float(), ref.q.float())
    assert torch.equal(got.v_t.transpose(2, 3)[:, :, :L].float(), ref.v.float())
    k_differ = (got.k[:, :, :L].float() != ref.k.float()).float().mean()
    assert k_differ < 1e-3
    for name, padded in (("q", got.q[:, :, L:]), ("k", got.k[:, :, L:]),
                         ("v_t", got.v_t[..., L:])):
        assert not padded.float().any(), f"{name} is not 0 past the sequence: {padded}"


for _test in (test_block_sparse_fp8_gpu, test_fp8_rounding_kernel_gpu):
    for _mark in gpu_only:
        _mark(_test)


def test_the_fp8_launcher_refuses_other_head_dims():
    q = torch.randn(1, 1, 64, 80)
    counts = torch.ones(1, 1, 1, dtype=torch.int32)
    indices = torch.zeros(1, 1, 1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"FP8 kernel runs head dims \(64, 128\), got 80"):
        kernels.block_sparse_fp8(q, q, q, counts, indices, 0.1, 64, None, LaunchOptions())
