"""The mask-to-index kernel against ``BlockMask.to_indices()`` (the reference): exact equality.

Without CUDA the kernel runs under Triton's CPU interpreter; the ``gpu``-marked tests run it
compiled on a CUDA device, up to the HunyuanVideo 720p shape. Outputs are poisoned first, so an
element the kernel forgets to write fails. Small chunk sizes (monkeypatched) exercise the chunk
loop's running offset and the multi-chunk zero fill on rows short enough for the interpreter.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaspa_compile import kernels, ops, reference
from adaspa_compile.blockmask import BlockMask

pytest.importorskip("triton")

from adaspa_compile.kernels import mask_indices as mask_indices_mod  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
interpreter_only = pytest.mark.skipif(
    HAS_CUDA, reason="interpreter tests run where CUDA is absent; CUDA runs the gpu-marked ones")
gpu_only = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]
POISON = -7

# (MAX_BLOCK, TILE): the default, and chunks of 16 / 32 columns so rows span several chunks.
TILINGS = [None, (16, 16), (32, 128)]


@dataclass(frozen=True)
class MaskCase:
    batch: int
    heads: int
    n_blocks: int
    density: float
    empty_rows: float  # share of rows keeping nothing
    full_rows: float  # share of rows keeping everything
    garbage_padding: bool  # set the unused bits of the last byte
    extra_width: int  # max_kept above the largest count (still a valid BlockMask)
    seed: int


@st.composite
def mask_cases(draw, max_blocks: int) -> MaskCase:
    return MaskCase(
        batch=draw(st.integers(1, 2)), heads=draw(st.integers(1, 3)),
        n_blocks=draw(st.sampled_from([1, 7, 8, 9]) | st.integers(1, max_blocks)),
        density=draw(st.sampled_from([0.0, 1.0]) | st.floats(0.0, 1.0)),
        empty_rows=draw(st.sampled_from([0.0, 0.2, 1.0])),
        full_rows=draw(st.sampled_from([0.0, 0.2])),
        garbage_padding=draw(st.booleans()), extra_width=draw(st.sampled_from([0, 0, 3])),
        seed=draw(st.integers(0, 2**31 - 1)))


def make_block_mask(case: MaskCase, device: str) -> BlockMask:
    gen = torch.Generator().manual_seed(case.seed)
    B, H, nb = case.batch, case.heads, case.n_blocks
    dense = torch.rand(B, H, nb, nb, generator=gen) < case.density
    dense &= ~(torch.rand(B, H, nb, 1, generator=gen) < case.empty_rows)
    dense |= torch.rand(B, H, nb, 1, generator=gen) < case.full_rows
    mask = BlockMask.from_dense(dense, block_size=64, seq_len=nb * 64)
    bits = mask.bits.clone()
    if case.garbage_padding and nb % 8:
        bits[..., -1] |= torch.tensor(0xFF << (nb % 8) & 0xFF, dtype=torch.uint8)
    return BlockMask(bits=bits.to(device), num_kv_blocks=nb, block_size=64, seq_len=nb * 64,
                     max_kept=min(nb, mask.max_kept + case.extra_width))


def check_against_reference(mask: BlockMask) -> None:
    want_counts, want_indices = mask.to_indices()
    counts = torch.full_like(want_counts, POISON)
    indices = torch.full_like(want_indices, POISON)
    got_counts, got_indices = kernels.mask_to_indices(mask.bits, mask.num_kv_blocks, mask.max_kept,
                                                   counts=counts, indices=indices)
    assert got_counts is counts and got_indices is indices
    assert got_counts.dtype == got_indices.dtype == torch.int32
    assert torch.equal(got_counts.cpu(), want_counts.cpu()), "counts differ from to_indices()"
    assert torch.equal(got_indices.cpu(), want_indices.cpu()), "indices differ from to_indices()"


def set_tiling(monkeypatch, tiling) -> None:
    if tiling is not None:
        monkeypatch.setattr(mask_indices_mod, "MAX_BLOCK", tiling[0])
        monkeypatch.setattr(mask_indices_mod, "TILE", tiling[1])


# ----------------------------------------------------------------------------- interpreter
@interpreter_only
@pytest.mark.parametrize("tiling", TILINGS, ids=str)
@settings(settings.get_profile("kernels-ci"))
@given(case=mask_cases(max_blocks=70))
def test_mask_indices_interpreter(tiling, case):
    with pytest.MonkeyPatch.context() as mp:
        set_tiling(mp, tiling)
        check_against_reference(make_block_mask(case, "cpu"))


@interpreter_only
def test_mask_indices_default_tile_spans_several_rows_per_program():
    """nb = 300: BLOCK 512, 4 rows a program, a ragged last program."""
    case = MaskCase(batch=1, heads=1, n_blocks=301, density=0.3, empty_rows=0.1, full_rows=0.1,
                    garbage_padding=True, extra_width=0, seed=5)
    check_against_reference(make_block_mask(case, "cpu"))


@interpreter_only
def test_sparse_forward_uses_the_kernel(monkeypatch):
    """With the kernels in use, ``ops.sparse_forward`` takes its indices from ``mask_to_indices``
    (not ``to_indices``), and the output matches the reference."""
    calls = []
    real = kernels.mask_to_indices

    def spy(*args, **kwargs):
        calls.append(args[1:])
        return real(*args, **kwargs)

    def no_reference(self):
        raise AssertionError("to_indices() called on the kernel path")

    monkeypatch.setattr(kernels, "mask_to_indices", spy)
    monkeypatch.setattr(ops, "_kernels_for", lambda q, block_size, scale: kernels)
    gen = torch.Generator().manual_seed(0)
    B, H, L, D, bs = 1, 2, 200, 16, 64
    q, k, v = (torch.randn(B, H, L, D, generator=gen) for _ in range(3))
    dense = torch.rand(B, H, 4, 4, generator=gen) < 0.5
    mask = BlockMask.from_dense(dense, block_size=bs, seq_len=L)
    want = reference.block_sparse_attention_ref(q.double(), k.double(), v.double(),
                                                *mask.to_indices(), D ** -0.5, bs, None)
    monkeypatch.setattr(BlockMask, "to_indices", no_reference)
    got = ops.block_sparse_attention(q, k, v, mask, block_size=bs)
    assert calls == [(4, mask.max_kept)]
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- GPU
@settings(settings.get_profile("kernels-gpu"))
@given(case=mask_cases(max_blocks=300))
def test_mask_indices_gpu(case):
    check_against_reference(make_block_mask(case, "cuda"))


@pytest.mark.parametrize("n_blocks", [1861, 4001])
def test_mask_indices_gpu_large(n_blocks):
    """HunyuanVideo 720p (1861 blocks of 64, 24 heads, one chunk) and a two-chunk row length."""
    case = MaskCase(batch=1, heads=24 if n_blocks == 1861 else 2, n_blocks=n_blocks, density=0.2,
                    empty_rows=0.01, full_rows=0.01, garbage_padding=True, extra_width=0, seed=1)
    check_against_reference(make_block_mask(case, "cuda"))


for _test in (test_mask_indices_gpu, test_mask_indices_gpu_large):
    for _mark in gpu_only:
        _mark(_test)


# ----------------------------------------------------------------------------- bad input
DEVICE = "cuda" if HAS_CUDA else "cpu"


@pytest.mark.parametrize("problem", ["dtype", "dims", "last_dim", "max_kept", "negative_kept",
                                     "counts_shape", "indices_dtype", "indices_strided"])
def test_bad_input_raises_value_error(problem):
    B, H, nb = 1, 2, 10
    bits = torch.zeros(B, H, nb, 2, dtype=torch.uint8, device=DEVICE)
    nk, max_kept, out = nb, 4, {}
    if problem == "dtype":
        bits = bits.to(torch.int32)
    elif problem == "dims":
        bits = bits[0]
    elif problem == "last_dim":
        nk = 17
    elif problem == "max_kept":
        max_kept = nb + 1
    elif problem == "negative_kept":
        max_kept = -1
    elif problem == "counts_shape":
        out["counts"] = torch.zeros(B, H, nb + 1, dtype=torch.int32, device=DEVICE)
    elif problem == "indices_dtype":
        out["indices"] = torch.zeros(B, H, nb, max_kept, dtype=torch.int64, device=DEVICE)
    elif problem == "indices_strided":
        out["indices"] = torch.zeros(B, H, nb, 2 * max_kept, dtype=torch.int32,
                                     device=DEVICE)[..., ::2]
    with pytest.raises(ValueError):
        kernels.mask_to_indices(bits, nk, max_kept, **out)


def test_cpu_tensor_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        kernels.mask_to_indices(torch.zeros(1, 1, 3, 1, dtype=torch.uint8), 3, 1)


def test_empty_shapes():
    bits = torch.zeros(1, 0, 5, 1, dtype=torch.uint8, device=DEVICE)
    counts, indices = kernels.mask_to_indices(bits, 5, 0)
    assert counts.shape == (1, 0, 5) and indices.shape == (1, 0, 5, 0)
