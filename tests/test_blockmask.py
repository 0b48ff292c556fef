import pytest
import torch
from hypothesis import given, strategies as st

from adaspa_compile import BlockMask


@given(st.integers(1, 2), st.integers(1, 3), st.integers(1, 20), st.floats(0, 1), st.integers(0, 999))
def test_bits_round_trip_and_indices(B, H, nb, density, seed):
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(B, H, nb, nb, generator=g) < density
    mask = BlockMask.from_dense(dense, block_size=16, seq_len=nb * 16 - 3)
    assert torch.equal(mask.to_dense(), dense)
    assert mask.bits.shape[-1] == -(-nb // 8)
    counts, indices = mask.to_indices()
    assert torch.equal(counts, dense.sum(-1).int())
    assert indices.shape[-1] == mask.max_kept
    for b in range(B):
        for h in range(H):
            for i in range(nb):
                want = dense[b, h, i].nonzero().flatten().int()
                assert torch.equal(indices[b, h, i, : counts[b, h, i]], want)
    assert torch.allclose(mask.density(), dense.float().mean((-2, -1)))
    assert mask.kept_blocks == int(dense.sum())


def test_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="bool"):
        BlockMask.from_dense(torch.ones(1, 1, 2, 2), block_size=16, seq_len=32)
    with pytest.raises(ValueError, match="needs 2 query and key blocks"):
        BlockMask.from_dense(torch.ones(1, 1, 3, 3, dtype=torch.bool), block_size=16, seq_len=32)


def test_repr_shows_shape():
    mask = BlockMask.from_dense(torch.ones(1, 2, 4, 4, dtype=torch.bool), block_size=16, seq_len=64)
    assert "nq=4" in repr(mask) and "max_kept=4" in repr(mask)


def test_is_full_needs_every_block_kept():
    dense = torch.ones(1, 2, 3, 3, dtype=torch.bool)
    full = BlockMask.from_dense(dense, block_size=64, seq_len=150)
    assert full.is_full and full.kept_blocks == 18
    dense[0, 1, 2, 0] = False
    assert not BlockMask.from_dense(dense, block_size=64, seq_len=150).is_full
    unknown = BlockMask(bits=full.bits, num_kv_blocks=3, block_size=64, seq_len=150, max_kept=3)
    assert unknown.kept_blocks is None and not unknown.is_full
