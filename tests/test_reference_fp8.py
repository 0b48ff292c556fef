"""The FP8 reference (``precision="fp8"``): its rounding, and its error against exact attention."""

import math

import pytest
import torch
from hypothesis import given, strategies as st

from adaspa_compile import BlockMask, block_sparse_attention, reference

# float8_e4m3fn keeps 3 mantissa bits: a normal value is rounded to within 2^-4 of itself; below
# 2^-6 (times the scale) the spacing is fixed at 2^-9.
HALF_ULP = 2.0 ** -4
SUBNORMAL_STEP = 2.0 ** -9


def qkv(seed: int, shape, input_scale: float = 1.0, k_offset: float = 0.0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*shape, generator=gen) for _ in range(3))
    return q * input_scale, k * input_scale + k_offset, v


def random_mask(seed: int, B: int, H: int, L: int, bs: int, density: float) -> BlockMask:
    gen = torch.Generator().manual_seed(seed + 1)
    nb = -(-L // bs)
    dense = torch.rand(B, H, nb, nb, generator=gen) < density
    dense |= torch.eye(nb, dtype=torch.bool)
    return BlockMask.from_dense(dense, block_size=bs, seq_len=L)


def per_token(scale: torch.Tensor, bs: int, L: int) -> torch.Tensor:
    return scale.repeat_interleave(bs, dim=2)[:, :, :L, None]


def assert_rounded(x: torch.Tensor, x8: torch.Tensor, scale: torch.Tensor) -> None:
    """Every value of ``x8 * scale`` is ``x`` rounded to FP8: within half a unit in the last
    place (relative 2^-4, or half the subnormal step), and no block's largest value clipped."""
    back = x8.float() * scale
    bound = HALF_ULP * x.abs() + 0.5 * SUBNORMAL_STEP * scale + 1e-7
    assert torch.all((back - x).abs() <= bound)
    assert torch.isfinite(back).all()


shapes = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 300),
                   st.sampled_from([16, 64, 128]))


@given(shape=shapes, bs=st.sampled_from([16, 64, 128]), seed=st.integers(0, 2**31 - 1),
       input_scale=st.sampled_from([1e-3, 1.0, 30.0]), k_offset=st.sampled_from([0.0, 5.0]))
def test_rounding_is_to_the_nearest_fp8_with_block_and_channel_scales(shape, bs, seed,
                                                                      input_scale, k_offset):
    q, k, v = qkv(seed, shape, input_scale, k_offset)
    B, H, L, D = shape
    fp8 = reference.quantize_fp8_ref(q, k, v, bs)
    nb = -(-L // bs)
    assert fp8.q.dtype == fp8.k.dtype == fp8.v.dtype == reference.FP8_DTYPE
    assert fp8.q_scale.shape == fp8.k_scale.shape == (B, H, nb) and fp8.v_scale.shape == (B, H, D)
    assert_rounded(q, fp8.q, per_token(fp8.q_scale, bs, L))
    assert_rounded(k - k.mean(dim=2, keepdim=True), fp8.k, per_token(fp8.k_scale, bs, L))
    assert_rounded(v, fp8.v, fp8.v_scale[:, :, None, :])
    # Each block's (each channel's) largest magnitude becomes the largest FP8 value.
    blocks = torch.nn.functional.pad(fp8.q.float().abs(), (0, 0, 0, nb * bs - L))
    assert torch.all(blocks.view(B, H, nb, -1).amax(-1) == reference.FP8_MAX)
    assert torch.all(fp8.v.float().abs().amax(2) == reference.FP8_MAX)


def test_an_all_zero_block_gets_scale_one_and_stays_zero():
    q, k, v = (torch.zeros(1, 1, 70, 16) for _ in range(3))
    q[:, :, 64:] = 1.0
    fp8 = reference.quantize_fp8_ref(q, k, v, 64)
    assert torch.equal(fp8.q_scale[0, 0], torch.tensor([1.0, 1.0 / reference.FP8_MAX]))
    assert torch.all(fp8.k_scale == 1.0) and torch.all(fp8.v_scale == 1.0)
    assert not fp8.k.float().any() and not fp8.v.float().any()


@given(seed=st.integers(0, 2**31 - 1), k_offset=st.sampled_from([0.0, 3.0, 30.0]))
def test_smoothing_k_leaves_attention_unchanged(seed, k_offset):
    """Softmax ignores a per-row constant: K minus its mean gives the same attention."""
    q, k, v = (t.double() for t in qkv(seed, (1, 2, 100, 32), 1.0, k_offset))
    m = random_mask(seed, 1, 2, 100, 16, 0.5)
    counts, indices = m.to_indices()
    raw = reference.block_sparse_attention_ref(q, k, v, counts, indices, 32 ** -0.5, 16)
    smooth = reference.block_sparse_attention_ref(q, k - k.mean(2, keepdim=True), v, counts,
                                                  indices, 32 ** -0.5, 16)
    assert torch.allclose(raw, smooth, atol=1e-9)


@given(seed=st.integers(0, 2**31 - 1), D=st.sampled_from([64, 128]),
       input_scale=st.sampled_from([0.5, 1.0, 2.0]), k_offset=st.sampled_from([0.0, 10.0]),
       density=st.floats(0.2, 1.0), padded=st.booleans())
def test_fp8_attention_stays_near_exact_attention(seed, D, input_scale, k_offset, density,
                                                  padded):
    """Relative error against exact (float64) attention on the same mask. Measured on random
    inputs: 4% at score std 0.5, 5% at 1, 8% at 2 (rounding Q and K moves the scores in
    proportion to their size); the bound leaves about half as much again. A K offset, which
    rounding without smoothing would turn into large score errors, changes nothing."""
    B, H, L, bs = 1, 2, 260, 64
    q, k, v = qkv(seed, (B, H, L, D), input_scale, k_offset)
    m = random_mask(seed, B, H, L, bs, density)
    counts, indices = m.to_indices()
    key_valid = None
    if padded:
        key_valid = torch.ones(B, L, dtype=torch.bool)
        key_valid[:, L - 40:] = False
    exact = reference.block_sparse_attention_ref(q.double(), k.double(), v.double(), counts,
                                                 indices, D ** -0.5, bs, key_valid)
    got = reference.block_sparse_attention_fp8_ref(q, k, v, counts, indices, D ** -0.5, bs,
                                                   key_valid).double()
    err = float((got - exact).norm() / exact.norm())
    assert err <= 0.07 + 0.03 * input_scale, f"relative error {err:.3f}"


def test_fp8_probability_rounding_is_what_round_probs_turns_off():
    q, k, v = qkv(0, (1, 2, 200, 64))
    m = random_mask(0, 1, 2, 200, 64, 0.6)
    counts, indices = m.to_indices()
    rounded = reference.block_sparse_attention_fp8_ref(q, k, v, counts, indices, 0.125, 64)
    plain = reference.block_sparse_attention_fp8_ref(q, k, v, counts, indices, 0.125, 64,
                                                     round_probs=False)
    diff = float((rounded - plain).norm() / plain.norm())
    assert 1e-3 < diff < 0.05


def test_rows_with_nothing_to_attend_are_zero_in_fp8_too():
    q, k, v = qkv(1, (1, 1, 128, 64))
    dense = torch.tensor([[[[True, False], [False, False]]]])
    m = BlockMask.from_dense(dense, block_size=64, seq_len=128)
    key_valid = torch.ones(1, 128, dtype=torch.bool)
    key_valid[:, :64] = False
    out = block_sparse_attention(q, k, v, m, block_size=64, precision="fp8",
                                 key_padding_mask=key_valid)
    assert not out.any() and torch.isfinite(out).all()


def test_the_public_op_takes_the_precision():
    q, k, v = qkv(2, (1, 2, 130, 64))
    m = random_mask(2, 1, 2, 130, 64, 0.7)
    counts, indices = m.to_indices()
    out = block_sparse_attention(q, k, v, m, block_size=64, precision="fp8")
    ref = reference.block_sparse_attention_fp8_ref(q, k, v, counts, indices, 0.125, 64)
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match=r"precision must be one of \('bf16', 'fp8'\)"):
        block_sparse_attention(q, k, v, m, block_size=64, precision="int8")
    assert math.isclose(float(block_sparse_attention(q, k, v, m, block_size=64).norm()),
                        float(out.norm()), rel_tol=0.1)
