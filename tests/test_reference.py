"""The reference ops against naive float64 attention (the L x L matrix is fine at test sizes)."""

import math

import pytest
import torch
from hypothesis import given, strategies as st

from adaspa_compile import BlockMask, attention_with_lse, block_mass, block_sparse_attention


def naive(q, k, v, scale, key_valid=None, allowed=None):
    """float64 softmax attention; ``allowed`` is a token-level [B,H,L,L] bool mask."""
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    keep = torch.ones_like(s, dtype=torch.bool)
    if key_valid is not None:
        keep &= key_valid[:, None, None, :]
    if allowed is not None:
        keep &= allowed
    s = s.masked_fill(~keep, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.where(torch.isfinite(lse)[..., None], torch.exp(s - lse[..., None]), torch.zeros_like(s))
    return p @ v.double(), lse, p


def expand_blocks(block_mask, block_size, length):
    dense = block_mask.repeat_interleave(block_size, -1).repeat_interleave(block_size, -2)
    return dense[..., :length, :length]


@st.composite
def problems(draw):
    B = draw(st.integers(1, 2))
    H = draw(st.integers(1, 3))
    bs = draw(st.sampled_from([16, 32]))
    L = draw(st.integers(1, 5 * bs))
    D = draw(st.sampled_from([4, 8, 16]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=g) for _ in range(3))
    kind = draw(st.sampled_from(["none", "tail", "random", "all"]))
    key_valid = None
    if kind == "tail":
        key_valid = torch.arange(L)[None].expand(B, L) < draw(st.integers(1, L))
    elif kind == "random":
        key_valid = torch.rand(B, L, generator=g) < 0.7
    elif kind == "all":
        key_valid = torch.zeros(B, L, dtype=torch.bool)
    density = draw(st.floats(0.0, 1.0))
    nb = -(-L // bs)
    mask = torch.rand(B, H, nb, nb, generator=g) < density
    return q, k, v, key_valid, bs, mask


def rel_err(a, b):
    return ((a.double() - b).norm() / b.norm().clamp(min=1e-12)).item()


@given(problems())
def test_attention_with_lse_matches_naive(p):
    q, k, v, key_valid, bs, _ = p
    scale = q.shape[-1] ** -0.5
    out, lse = attention_with_lse(q, k, v, key_padding_mask=key_valid)
    ref, ref_lse, _ = naive(q, k, v, scale, key_valid)
    assert not out.isnan().any()
    assert rel_err(out, ref) < 1e-5
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert torch.allclose(lse[finite].double(), ref_lse[finite], atol=1e-5)


@given(problems())
def test_block_mass_matches_naive_and_rows_sum_to_valid_rows(p):
    q, k, v, key_valid, bs, _ = p
    B, H, L, _ = q.shape
    scale = 0.3
    _, lse = attention_with_lse(q, k, v, scale=scale, key_padding_mask=key_valid)
    mass = block_mass(q, k, lse, block_size=bs, scale=scale, key_padding_mask=key_valid)
    _, _, probs = naive(q, k, v, scale, key_valid)
    nb = -(-L // bs)
    padded = torch.nn.functional.pad(probs, (0, nb * bs - L, 0, nb * bs - L))
    ref = padded.view(B, H, nb, bs, nb, bs).sum(dim=(3, 5))
    assert mass.shape == (B, H, nb, nb) and mass.dtype == torch.float32
    assert torch.allclose(mass.double(), ref, atol=1e-4)
    row_has_key = torch.isfinite(lse).float()
    rows = torch.nn.functional.pad(row_has_key, (0, nb * bs - L)).view(B, H, nb, bs).sum(-1)
    assert torch.allclose(mass.sum(-1).double(), rows.double(), atol=1e-3)


@given(problems())
def test_block_sparse_matches_naive_on_expanded_mask(p):
    q, k, v, key_valid, bs, mask = p
    L = q.shape[2]
    out = block_sparse_attention(q, k, v, mask, block_size=bs, key_padding_mask=key_valid)
    ref, _, _ = naive(q, k, v, q.shape[-1] ** -0.5, key_valid, expand_blocks(mask, bs, L))
    assert not out.isnan().any()
    assert rel_err(out, ref) < 1e-5


@given(problems())
def test_block_sparse_with_full_mask_is_dense(p):
    q, k, v, key_valid, bs, mask = p
    full = torch.ones_like(mask)
    out = block_sparse_attention(q, k, v, BlockMask.from_dense(full, block_size=bs, seq_len=q.shape[2]),
                                 block_size=bs, key_padding_mask=key_valid)
    dense, _ = attention_with_lse(q, k, v, key_padding_mask=key_valid)
    assert torch.allclose(out, dense, atol=1e-5)


def test_output_keeps_strides_of_bshd_views():
    x = torch.randn(1, 100, 2, 8)
    q = x.transpose(1, 2)
    out, _ = attention_with_lse(q, q, q)
    assert out.stride() == q.stride()


def test_additive_mask_reads_as_padding():
    q = torch.randn(1, 2, 40, 8)
    additive = torch.zeros(1, 1, 1, 40)
    additive[..., 30:] = float("-inf")
    a, _ = attention_with_lse(q, q, q, key_padding_mask=additive)
    b, _ = attention_with_lse(q, q, q, key_padding_mask=additive == 0)
    assert torch.equal(a, b)


@pytest.mark.parametrize("call, match", [
    (lambda q: attention_with_lse(q, q[..., :4], q), "share"),
    (lambda q: attention_with_lse(q[0], q[0], q[0]), r"\[B, H, L, D\]"),
    (lambda q: attention_with_lse(q, q.double(), q), "dtype"),
    (lambda q: attention_with_lse(q, q, q, key_padding_mask=torch.ones(1, 1, 8, dtype=torch.bool)), "key_padding_mask"),
    (lambda q: block_sparse_attention(q, q, q, torch.ones(1, 2, 3, 3), block_size=16), "bool"),
    (lambda q: block_sparse_attention(q, q, q, torch.ones(1, 2, 2, 3, dtype=torch.bool), block_size=16), r"\[B, H, nq, nk\]"),
    (lambda q: block_mass(q, q, torch.zeros(1, 2, 7), block_size=16), "lse"),
    (lambda q: block_mass(q, q, torch.zeros(1, 2, 40), block_size=0), "block_size"),
    (lambda q: block_sparse_attention(q, q, q, torch.ones(1, 2, 14, 14, dtype=torch.bool),
                                      block_size=3), "power of two from 16 to 256"),
    (lambda q: block_sparse_attention(*(q.transpose(1, 2),) * 3,
                                      torch.ones(1, 2, 3, 3, dtype=torch.bool), block_size=16),
     r"\[B, L, H, D\].*transpose\(1, 2\)"),
])
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(1, 2, 40, 8))


def test_an_all_false_row_gives_zeros():
    """A query block that keeps no key block attends to nothing: its rows are 0."""
    q = torch.randn(1, 1, 32, 8)
    mask = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    mask[0, 0, 1] = False
    out = block_sparse_attention(q, q, q, mask, block_size=16)
    assert torch.equal(out[0, 0, 16:], torch.zeros(16, 8))
    assert out[0, 0, :16].abs().sum() > 0
