"""Property tests of the three Triton kernels against the pure-PyTorch reference in float64.

Without CUDA they run under Triton's CPU interpreter in fp32 (relative error < 1e-4). The same
properties, marked ``gpu``, run the compiled kernels on a CUDA device in bf16 (and fp32 with IEEE
dots), against the float64 reference of the dtype-rounded inputs. Every output is poisoned with
NaN first, so an element the kernel forgets to write fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from adaspa_compile import kernels, ops, reference
from adaspa_compile.blockmask import BlockMask, pack_bits

pytest.importorskip("triton")

from adaspa_compile.kernels import (block_sparse, block_sparse_hopper,  # noqa: E402
                                    shared_pairs)

HAS_CUDA = torch.cuda.is_available()
interpreter_only = pytest.mark.skipif(
    HAS_CUDA, reason="interpreter tests run where CUDA is absent; CUDA runs the gpu-marked ones")
gpu_only = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]

PADDINGS = ("none", "random", "tail", "whole_block", "batch_fully_padded")


@dataclass(frozen=True)
class Case:
    batch: int
    heads: int
    seq_len: int
    head_dim: int
    block_size: int
    layout: str  # "bhsd" (contiguous) or "bshd" (BSHD memory viewed as BHSD)
    padding: str
    density: float
    input_scale: float
    seed: int

    @property
    def n_blocks(self) -> int:
        return -(-self.seq_len // self.block_size)


@st.composite
def cases(draw, max_blocks: float, head_dims) -> Case:
    block_size = draw(st.sampled_from([64, 128]))
    seq_len = draw(st.integers(1, int(max_blocks * block_size)))
    return Case(batch=draw(st.integers(1, 2)), heads=draw(st.integers(1, 3)), seq_len=seq_len,
                head_dim=draw(st.sampled_from(head_dims)), block_size=block_size,
                layout=draw(st.sampled_from(["bhsd", "bshd"])),
                padding=draw(st.sampled_from(PADDINGS)),
                density=draw(st.sampled_from([0.0, 1.0]) | st.floats(0.0, 1.0)),
                input_scale=draw(st.sampled_from([0.5, 1.0, 3.0])),
                seed=draw(st.integers(0, 2**31 - 1)))


INTERP_CASES = cases(max_blocks=2.6, head_dims=[16, 32, 40, 64, 80, 128])
GPU_CASES = cases(max_blocks=12.5, head_dims=[64, 80, 128])


@st.composite
def long_cases(draw) -> Case:
    """64 to 80 key blocks (several chunks of the mass loop, long index lists), a ragged last
    block, one head, bf16-sized work."""
    case = draw(cases(max_blocks=1, head_dims=[64, 128]))
    n_blocks = draw(st.integers(64, 80))
    ragged = draw(st.integers(0, case.block_size - 1))
    return Case(**{**case.__dict__, "batch": 1, "heads": 1,
                   "seq_len": n_blocks * case.block_size - ragged})


GPU_LONG_CASES = long_cases()
GPU_DTYPES = [torch.bfloat16, torch.float32]
HOPPER_CASES = cases(max_blocks=12.5, head_dims=[64, 128])


# ----------------------------------------------------------------------------- inputs
def make_qkv(case: Case, dtype: torch.dtype, device: str):
    gen = torch.Generator().manual_seed(case.seed)
    B, H, L, D = case.batch, case.heads, case.seq_len, case.head_dim
    out = []
    for _ in range(3):
        if case.layout == "bshd":
            t = torch.randn(B, L, H, D, generator=gen).to(device=device, dtype=dtype).transpose(1, 2)
        else:
            t = torch.randn(B, H, L, D, generator=gen).to(device=device, dtype=dtype)
        out.append(t * case.input_scale if len(out) < 2 else t)
    return out


def make_key_valid(case: Case, device: str) -> Optional[torch.Tensor]:
    gen = torch.Generator().manual_seed(case.seed + 1)
    B, L, bs = case.batch, case.seq_len, case.block_size
    if case.padding == "none":
        return None
    valid = torch.ones(B, L, dtype=torch.bool)
    if case.padding == "random":
        valid = torch.rand(B, L, generator=gen) < 0.7
    elif case.padding == "tail":
        valid[:, L - int(torch.randint(0, L + 1, (1,), generator=gen)):] = False
    elif case.padding == "whole_block":
        blk = int(torch.randint(0, case.n_blocks, (1,), generator=gen))
        valid[:, blk * bs:(blk + 1) * bs] = False
    elif case.padding == "batch_fully_padded":
        valid[0] = False
    return valid.to(device)


def make_mask(case: Case, device: str) -> BlockMask:
    gen = torch.Generator().manual_seed(case.seed + 2)
    B, H, nb = case.batch, case.heads, case.n_blocks
    dense = torch.rand(B, H, nb, nb, generator=gen) < case.density
    empty_rows = torch.rand(B, H, nb, 1, generator=gen) < 0.1
    dense &= ~empty_rows
    return BlockMask.from_dense(dense.to(device), block_size=case.block_size, seq_len=case.seq_len)


def poisoned(shape_like: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(shape_like).fill_(float("nan"))


def f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64)


# ----------------------------------------------------------------------------- checks
def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = f64(got), f64(ref)
    assert torch.isfinite(got).all(), "non-finite (unwritten or NaN) elements in the output"
    denom = ref.norm()
    if denom == 0:
        return float(got.abs().max()) if got.numel() else 0.0
    return float((got - ref).norm() / denom)


def check_lse(got: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    got, ref = f64(got), f64(ref)
    assert not torch.isnan(got).any(), "NaN (unwritten) LSE entries"
    empty = torch.isneginf(ref)
    assert torch.equal(torch.isneginf(got), empty), "rows with no valid key must have LSE -inf"
    if (~empty).any():
        err = rel_err(got[~empty], ref[~empty])
        assert err < tol, f"LSE relative error {err:.2e} >= {tol:.0e}"


def out_tolerance(dtype: torch.dtype, torch_err: float) -> float:
    """fp32: 1e-4. bf16/fp16: twice a plain PyTorch run's error, at least 1e-2."""
    if dtype == torch.float32:
        return 1e-4
    return max(2.0 * torch_err, 1e-2)


def mass_tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 1e-2


# ----------------------------------------------------------------------------- bodies
def run_fused(case: Case, dtype: torch.dtype, device: str, with_mass: bool) -> None:
    q, k, v = make_qkv(case, dtype, device)
    kv = make_key_valid(case, device)
    scale = case.head_dim ** -0.5
    B, H, L, _ = q.shape
    nb = case.n_blocks
    out, lse = poisoned(q), torch.full((B, H, L), float("nan"), device=device)
    mass = torch.full((B, H, nb, nb), float("nan"), device=device) if with_mass else None
    got_out, got_lse, got_mass = kernels.fused_search(q, k, v, scale, case.block_size, kv,
                                                      with_mass=with_mass, out=out, lse=lse,
                                                      mass=mass)
    assert got_out is out and got_out.stride() == q.stride()
    kv_cpu = None if kv is None else kv.cpu()
    ref_out, ref_lse = reference.attention_with_lse_ref(f64(q), f64(k), f64(v), scale, kv_cpu,
                                                        case.block_size)
    torch_err = 0.0
    if dtype != torch.float32:
        plain, _ = reference.attention_with_lse_ref(q, k, v, scale, kv, case.block_size)
        torch_err = rel_err(plain, ref_out)
    err = rel_err(got_out, ref_out)
    assert err < out_tolerance(dtype, torch_err), f"out rel err {err:.2e} (torch {torch_err:.2e})"
    check_lse(got_lse, ref_lse, 1e-4 if dtype == torch.float32 else 1e-3)
    if with_mass:
        ref_mass = reference.block_mass_ref(f64(q), f64(k), ref_lse.double(), scale,
                                            case.block_size, kv_cpu)
        err = rel_err(got_mass, ref_mass)
        assert err < mass_tolerance(dtype), f"mass rel err {err:.2e}"
    else:
        assert got_mass is None


def run_cached(case: Case, dtype: torch.dtype, device: str, tma: Optional[bool] = None) -> None:
    """Cached-search mass vs the reference; ``tma`` as in ``run_sparse``."""
    q, k, _ = make_qkv(case, dtype, device)
    kv = make_key_valid(case, device)
    scale = case.head_dim ** -0.5
    kv_cpu = None if kv is None else kv.cpu()
    # The cached LSE comes from the same step here; any fp32 LSE is a valid input.
    _, lse = reference.attention_with_lse_ref(f64(q), f64(k), f64(k), scale, kv_cpu)
    nb = case.n_blocks
    mass = torch.full((case.batch, case.heads, nb, nb), float("nan"), device=device)
    got = kernels.cached_search(q, k, lse.to(device), scale, case.block_size, kv, tma=tma,
                                mass=mass)
    ref = reference.block_mass_ref(f64(q), f64(k), lse.double(), scale, case.block_size, kv_cpu)
    err = rel_err(got, ref)
    assert err < mass_tolerance(dtype), f"mass rel err {err:.2e}"
    # Rows of the mass map sum to the number of valid query rows of the block.
    if dtype == torch.float32:
        rows_valid = torch.isfinite(lse).double()
        per_block = torch.nn.functional.pad(rows_valid, (0, nb * case.block_size - case.seq_len))
        expected = per_block.view(case.batch, case.heads, nb, case.block_size).sum(-1)
        assert torch.allclose(f64(got).sum(-1), expected, rtol=1e-4, atol=1e-4)


def run_sparse(case: Case, dtype: torch.dtype, device: str, tma: Optional[bool] = None,
               rotate_period: Optional[int] = None, shared: bool = False,
               bias_range: bool = False, split: bool = False,
               hopper: Optional[dict] = None) -> None:
    """Block-sparse output vs the reference; ``tma``: K/V through tensor descriptors (forced
    under the interpreter when True); ``rotate_period``: the rotated walk; ``shared``: programs
    over pairs of query blocks sharing their common key blocks (``shared_pairs``);
    ``bias_range``: the key bias only inside the padded blocks' range; ``split``: shared pairs in
    two launches (shared blocks, then each row's own blocks resuming the softmax state);
    ``hopper``: run the Gluon kernel (``block_sparse_hopper``) with these options."""
    q, k, v = make_qkv(case, dtype, device)
    kv = make_key_valid(case, device)
    mask = make_mask(case, device)
    counts, indices = mask.to_indices()
    scale = case.head_dim ** -0.5
    out = poisoned(q)
    if hopper is not None:
        got = block_sparse_hopper.block_sparse_attention_hopper(q, k, v, counts, indices, scale,
                                                                kv, out=out,
                                                                rotate_period=rotate_period,
                                                                **hopper)
    elif shared:
        lists = shared_pairs.shared_pair_lists(mask.bits, mask.num_kv_blocks, mask.max_kept)
        got = shared_pairs.shared_pair_attention(q, k, v, *lists, scale, kv, tma=tma, out=out,
                                                 rotate_period=rotate_period, split=split)
    elif rotate_period is None and not bias_range:  # the public entry point
        got = kernels.block_sparse_attention(q, k, v, counts, indices, scale, case.block_size, kv,
                                             tma=tma, out=out)
    else:
        got = block_sparse._launch(q, k, v, counts, indices, scale, case.block_size, kv, out,
                                   use_tma=tma, rotate_period=rotate_period,
                                   bias_range=bias_range)
    assert got is out
    kv_cpu = None if kv is None else kv.cpu()
    ref = reference.block_sparse_attention_ref(f64(q), f64(k), f64(v), counts.cpu(),
                                               indices.cpu(), scale, case.block_size, kv_cpu)
    torch_err = 0.0
    if dtype != torch.float32:
        plain = reference.block_sparse_attention_ref(q, k, v, counts, indices, scale,
                                                     case.block_size, kv)
        torch_err = rel_err(plain, ref)
    err = rel_err(got, ref)
    assert err < out_tolerance(dtype, torch_err), f"out rel err {err:.2e} (torch {torch_err:.2e})"


# ----------------------------------------------------------------------------- interpreter
@interpreter_only
@settings(settings.get_profile("kernels-ci"))
@given(case=INTERP_CASES)
def test_fused_search_interpreter(case):
    run_fused(case, torch.float32, "cpu", with_mass=False)


@pytest.mark.research
@interpreter_only
@settings(settings.get_profile("kernels-ci"))
@given(case=INTERP_CASES)
def test_fused_search_with_mass_interpreter(case):
    """``with_mass=True``: a mode the backend does not run (it lost its measurement)."""
    run_fused(case, torch.float32, "cpu", with_mass=True)


@interpreter_only
@settings(settings.get_profile("kernels-ci"))
@given(case=INTERP_CASES, tma=st.sampled_from([None, True]))
def test_cached_search_interpreter(case, tma):
    run_cached(case, torch.float32, "cpu", tma)


@interpreter_only
@settings(settings.get_profile("kernels-ci"))
@given(case=INTERP_CASES, tma=st.sampled_from([None, True]),
       rotate_period=st.sampled_from([None, None, 1, 3]), bias_range=st.booleans())
def test_block_sparse_interpreter(case, tma, rotate_period, bias_range):
    run_sparse(case, torch.float32, "cpu", tma, rotate_period, bias_range=bias_range)


@interpreter_only
@pytest.mark.parametrize("period", [2, 3, 5])
@pytest.mark.parametrize("seq_len,padding,bias_range", [
    (6 * 64, "none", False), (6 * 64 - 30, "none", False), (6 * 64, "tail", False),
    (6 * 64, "tail", True), (6 * 64 - 30, "whole_block", True)])
def test_block_sparse_rotated_walk_interpreter(period, seq_len, padding, bias_range):
    """``rotate_period``: lists long enough (6 blocks) that every program's walk wraps."""
    case = Case(batch=1, heads=3, seq_len=seq_len, head_dim=16, block_size=64, layout="bshd",
                padding=padding, density=0.7, input_scale=1.0, seed=period)
    run_sparse(case, torch.float32, "cpu", None, period, bias_range=bias_range)


@interpreter_only
@settings(settings.get_profile("kernels-ci"))
@given(case=INTERP_CASES, tma=st.sampled_from([None, True]),
       rotate_period=st.sampled_from([None, 0, 1, 3]))
def test_shared_pairs_interpreter(case, tma, rotate_period):
    assume(case.block_size == 64)  # pairs exist at block size 64 only
    run_sparse(case, torch.float32, "cpu", tma=tma, rotate_period=rotate_period, shared=True)


@pytest.mark.research
@interpreter_only
@settings(settings.get_profile("kernels-ci"))
@given(case=INTERP_CASES, tma=st.sampled_from([None, True]),
       rotate_period=st.sampled_from([None, 0, 1, 3]))
def test_shared_pairs_split_interpreter(case, tma, rotate_period):
    """Split pairs: a mode the backend does not run (it lost its measurement)."""
    assume(case.block_size == 64)
    run_sparse(case, torch.float32, "cpu", tma=tma, rotate_period=rotate_period, shared=True,
               split=True)


@interpreter_only
@pytest.mark.parametrize("period", [2, 5])
@pytest.mark.parametrize("split", [False, pytest.param(True, marks=pytest.mark.research)])
@pytest.mark.parametrize("seq_len,padding", [(7 * 64, "none"), (7 * 64 - 30, "none"),
                                             (7 * 64, "tail")])
def test_shared_pairs_rotated_walk_interpreter(period, split, seq_len, padding):
    """Dense enough (0.8) that every pair has long shared and own lists, and walks wrap."""
    case = Case(batch=1, heads=2, seq_len=seq_len, head_dim=16, block_size=64, layout="bshd",
                padding=padding, density=0.8, input_scale=1.0, seed=period)
    run_sparse(case, torch.float32, "cpu", rotate_period=period, shared=True, split=split)


@pytest.mark.research
def test_shared_pair_lists_split_each_pair():
    torch.manual_seed(0)
    dense = torch.rand(2, 3, 11, 11) < 0.5  # odd nq: the last row stands alone
    counts, indices = shared_pairs.shared_pair_lists(pack_bits(dense).to(DEVICE), 11, 11)
    counts, indices = counts.cpu(), indices.cpu()
    padded = torch.nn.functional.pad(dense, (0, 0, 0, 1))
    lo, hi = padded[:, :, 0::2], padded[:, :, 1::2]
    for part, want in enumerate((lo & hi, lo & ~hi, hi & ~lo)):
        assert torch.equal(counts[..., part], want.sum(-1).int())
        for b, h, p in zip(*torch.nonzero(want.any(-1), as_tuple=True)):
            cols = torch.nonzero(want[b, h, p]).flatten().int()
            assert torch.equal(indices[b, h, p, part, :cols.numel()], cols)


def test_shared_pairs_reject_bad_lists():
    q = torch.randn(1, 2, 200, 16, device=DEVICE)
    counts = torch.zeros(1, 2, 2, dtype=torch.int32, device=DEVICE)  # union-pair shape
    indices = torch.zeros(1, 2, 2, 1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"n_pairs, 3"):
        shared_pairs.shared_pair_attention(q, q, q, counts, indices, 0.25, None)
    with pytest.raises(ValueError, match="rotate_period"):
        shared_pairs.shared_pair_attention(q, q, q, counts, indices, 0.25, None, rotate_period=-1)


# ----------------------------------------------------------------------------- GPU
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@settings(settings.get_profile("kernels-gpu"))
@given(case=GPU_CASES, with_mass=st.booleans())
def test_fused_search_gpu(dtype, case, with_mass):
    assume(dtype != torch.float32 or case.head_dim <= 64)  # fp32 FMA dots compile slowly
    run_fused(case, dtype, "cuda", with_mass)


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@settings(settings.get_profile("kernels-gpu"))
@given(case=GPU_CASES, tma=st.sampled_from([None, False]))
def test_cached_search_gpu(dtype, case, tma):
    assume(dtype != torch.float32 or case.head_dim <= 64)  # fp32 FMA dots compile slowly
    run_cached(case, dtype, "cuda", tma)


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@settings(settings.get_profile("kernels-gpu"))
@given(case=GPU_CASES, tma=st.sampled_from([None, False]),
       rotate_period=st.sampled_from([None, None, 7]), bias_range=st.booleans())
def test_block_sparse_gpu(dtype, case, tma, rotate_period, bias_range):
    assume(dtype != torch.float32 or case.head_dim <= 64)  # fp32 FMA dots compile slowly
    run_sparse(case, dtype, "cuda", tma, rotate_period, bias_range=bias_range)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@settings(settings.get_profile("kernels-gpu"), max_examples=8)
@given(case=GPU_LONG_CASES, kernel=st.sampled_from(["fused", "cached", "sparse"]))
def test_long_sequences_gpu(case, kernel):
    """Real models run many chunks and long lists: 64+ key blocks, with padding and ragged ends."""
    if kernel == "fused":
        run_fused(case, torch.bfloat16, "cuda", True)
    elif kernel == "cached":
        run_cached(case, torch.bfloat16, "cuda", None)
    else:
        run_sparse(case, torch.bfloat16, "cuda", None, None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@settings(settings.get_profile("kernels-gpu"))
@given(case=HOPPER_CASES, rotate_period=st.sampled_from([None, 0, 7]),
       buffers=st.sampled_from([(2, 2, None), (2, 1, 168), (3, 3, None), (1, 1, None)]))
def test_block_sparse_hopper_gpu(dtype, case, rotate_period, buffers):
    assume(case.block_size == 64)
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel needs an sm90 GPU")
    k_stages, v_stages, max_registers = buffers
    run_sparse(case, dtype, "cuda", rotate_period=rotate_period,
               hopper=dict(k_stages=k_stages, v_stages=v_stages, max_registers=max_registers))


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@settings(settings.get_profile("kernels-gpu"))
@given(case=GPU_CASES, tma=st.sampled_from([None, False]), rotate_period=st.sampled_from([None, 7]),
       split=st.booleans())
def test_shared_pairs_gpu(dtype, case, tma, rotate_period, split):
    assume(dtype != torch.float32 or case.head_dim <= 64)  # fp32 FMA dots compile slowly
    assume(case.block_size == 64)
    run_sparse(case, dtype, "cuda", tma=tma, rotate_period=rotate_period, shared=True,
               split=split)


for _test in (test_fused_search_gpu, test_cached_search_gpu, test_block_sparse_gpu,
              test_block_sparse_hopper_gpu, test_shared_pairs_gpu):
    for _mark in gpu_only:
        _mark(_test)


# ----------------------------------------------------------------------------- bad input
DEVICE = "cuda" if HAS_CUDA else "cpu"


def _qkv(shape=(1, 2, 100, 64), dtype=torch.float32):
    return [torch.randn(shape, device=DEVICE).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("fn", ["fused", "cached", "sparse", "hopper"])
@pytest.mark.parametrize("problem", ["dtype", "head_dim", "block_size", "key_valid", "shape"])
def test_bad_input_raises_value_error(fn, problem):
    dtype = torch.float64 if problem == "dtype" else torch.float32
    shape = (1, 2, 100, 160) if problem == "head_dim" else (1, 2, 100, 64)
    q, k, v = _qkv(shape, dtype)
    if problem == "shape":
        k = k[:, :, :50]
    bs = 32 if problem == "block_size" else 64
    kv = torch.ones(1, 99, dtype=torch.bool, device=DEVICE) if problem == "key_valid" else None
    nb = -(-100 // 64)
    with pytest.raises(ValueError):
        if fn == "fused":
            kernels.fused_search(q, k, v, 0.1, bs, kv)
        elif fn == "cached":
            kernels.cached_search(q, k, torch.zeros(1, 2, 100, device=DEVICE), 0.1, bs, kv)
        else:
            counts = torch.ones(1, 2, nb, dtype=torch.int32, device=DEVICE)
            indices = torch.zeros(1, 2, nb, 1, dtype=torch.int32, device=DEVICE)
            if fn == "sparse":
                kernels.block_sparse_attention(q, k, v, counts, indices, 0.1, bs, kv)
            else:
                block_sparse_hopper.block_sparse_attention_hopper(q, k, v, counts, indices, 0.1,
                                                                  kv)


def test_hopper_kernel_refuses_what_it_does_not_support():
    """fp32 (and, without an sm90 GPU, anything): a ValueError naming the requirements, and the
    public entry point keeps the Triton kernel."""
    q, k, v = _qkv((1, 2, 100, 128))
    counts = torch.ones(1, 2, 2, dtype=torch.int32, device=DEVICE)
    indices = torch.zeros(1, 2, 2, 1, dtype=torch.int32, device=DEVICE)
    assert not block_sparse.uses_hopper_kernel(q, k, v, 64)
    with pytest.raises(ValueError, match="sm90"):
        block_sparse_hopper.block_sparse_attention_hopper(q, k, v, counts, indices, 0.1)


@pytest.mark.parametrize("period", [-1, -2, 2.5])
def test_bad_rotate_period_raises(period):
    q, k, v = _qkv()
    counts = torch.ones(1, 2, 2, dtype=torch.int32, device=DEVICE)
    indices = torch.zeros(1, 2, 2, 1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="rotate_period"):
        block_sparse._launch(q, k, v, counts, indices, 0.1, 64, None, None, rotate_period=period)


def test_bad_mask_shape_raises():
    q, k, v = _qkv()
    counts = torch.ones(1, 2, 3, dtype=torch.int32, device=DEVICE)  # nq is 2 for L=100, bs=64
    indices = torch.zeros(1, 2, 3, 1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="counts"):
        kernels.block_sparse_attention(q, k, v, counts, indices, 0.1, 64, None)


@pytest.mark.parametrize("scale", [0.0, -0.1, float("inf"), float("nan")])
def test_attention_kernels_need_a_positive_scale(scale):
    """The row max is taken on unscaled scores (``_tiles.online_softmax_step``)."""
    q, k, v = _qkv()
    nb = -(-100 // 64)
    counts = torch.ones(1, 2, nb, dtype=torch.int32, device=DEVICE)
    indices = torch.zeros(1, 2, nb, 1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="positive finite softmax scale"):
        kernels.block_sparse_attention(q, k, v, counts, indices, scale, 64, None)
    with pytest.raises(ValueError, match="positive finite softmax scale"):
        kernels.fused_search(q, k, v, scale, 64, None)
    ok, reason = kernels.kernel_support(q, 64, scale)
    assert not ok and "scale" in reason


def test_ops_run_the_reference_for_a_negative_scale():
    """Where the kernels cannot take the scale, the ops fall back to the reference (same result)."""
    q, k, v = _qkv()
    mask = torch.rand(1, 2, 2, 2, generator=torch.Generator().manual_seed(0)) < 0.6
    mask |= torch.eye(2, dtype=torch.bool)
    got = ops.block_sparse_attention(q, k, v, mask.to(DEVICE), block_size=64, scale=-0.2)
    counts, indices = BlockMask.from_dense(mask, block_size=64, seq_len=100).to_indices()
    want = reference.block_sparse_attention_ref(q.cpu(), k.cpu(), v.cpu(), counts, indices, -0.2,
                                                64, None)
    assert torch.allclose(got.cpu(), want, rtol=1e-5, atol=1e-6)


def test_bad_lse_raises():
    q, k, _ = _qkv()
    with pytest.raises(ValueError, match="lse"):
        kernels.cached_search(q, k, torch.zeros(1, 2, 100, dtype=torch.float16, device=DEVICE),
                              0.1, 64, None)


def test_kernel_support_reasons(monkeypatch):
    q = torch.randn(1, 2, 100, 64, device=DEVICE)
    assert kernels.kernel_support(q, 64) == (True, "")
    ok, reason = kernels.kernel_support(q.double(), 64)
    assert not ok and "dtype" in reason
    ok, reason = kernels.kernel_support(torch.randn(1, 2, 100, 160, device=DEVICE), 64)
    assert not ok and "head dim" in reason
    ok, reason = kernels.kernel_support(q, 32)
    assert not ok and "block_size" in reason
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, reason = kernels.kernel_support(torch.randn(1, 2, 100, 64), 64)
    assert not ok and "not CUDA" in reason


def test_register_cap_only_on_the_gpu_and_where_measured(monkeypatch):
    from adaspa_compile.kernels import _common

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _common.register_cap("cached", 64, 64) == {"maxnreg": 96}
    assert _common.register_cap("cached", 32, 64) == {"maxnreg": 96}  # small dims take 64's
    assert _common.register_cap("cached", 128, 64) == {}
    assert _common.register_cap("sparse", 64, 64) == {}
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter has no registers to cap
    assert _common.register_cap("cached", 64, 64) == {}


def test_rotation_is_a_gpu_default(monkeypatch):
    q = torch.empty(1, 1, 64, 64)
    assert block_sparse.default_rotate_period(q) == 0  # not CUDA
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(multi_processor_count=132))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert block_sparse.default_rotate_period(q) == 4 * 132
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert block_sparse.default_rotate_period(q) == 0


def test_prefer_pairs_only_for_head_dim_128_and_low_overhead():
    bf16 = torch.bfloat16
    assert kernels.prefer_pairs(1.0, 128, 64, bf16)
    assert kernels.prefer_pairs(shared_pairs.PAIR_MAX_OVERHEAD, 128, 64, torch.float16)
    assert not kernels.prefer_pairs(1.3, 128, 64, bf16)  # real AdaSpa masks: 1.44-1.72
    assert not kernels.prefer_pairs(1.0, 64, 64, bf16)
    assert not kernels.prefer_pairs(1.0, 128, 128, bf16)  # pairs exist at block size 64 only
    assert not kernels.prefer_pairs(1.0, 128, 64, torch.float32)


@pytest.mark.parametrize("hopper", [False, True])
@pytest.mark.parametrize("density", [1.0, 0.3])
def test_sparse_forward_dispatch(monkeypatch, hopper, density):
    """``ops.sparse_forward``: where the Gluon kernel runs, it takes every mask (unrotated when
    the mask keeps every block); elsewhere pair programs take dense masks (``prefer_pairs``,
    forced here so that fp32 on the CPU reaches them) and 64-row programs the rest; every path
    matches the reference. (The Gluon kernel itself runs only on an sm90 GPU; here its choice is
    forced, and the launch underneath is whichever kernel the device has.)"""
    from adaspa_compile import ops

    pair_calls, single_calls = [], []
    real_pairs, real_single = kernels.shared_pair_lists, kernels.block_sparse_attention
    monkeypatch.setattr(ops, "_kernels_for", lambda *a: kernels)  # the interpreter on the CPU
    monkeypatch.setattr(kernels, "uses_hopper_kernel", lambda *a, **kw: hopper)
    monkeypatch.setattr(kernels, "prefer_pairs", lambda overhead, *a: overhead <= 1.15)
    monkeypatch.setattr(kernels, "shared_pair_lists",
                        lambda *a: pair_calls.append(a) or real_pairs(*a))
    monkeypatch.setattr(kernels, "block_sparse_attention",
                        lambda *a, **kw: single_calls.append(kw) or real_single(*a, **kw))
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    case = Case(batch=1, heads=2, seq_len=1000 if HAS_CUDA else 380, head_dim=128,  # even nq
                block_size=64, layout="bshd", padding="tail", density=density, input_scale=1.0,
                seed=3)
    q, k, v = make_qkv(case, dtype, DEVICE)
    kv = make_key_valid(case, DEVICE)
    nb = case.n_blocks
    dense = torch.rand(1, 2, nb, nb, generator=torch.Generator().manual_seed(5)) < density
    mask = BlockMask.from_dense(dense.to(DEVICE), block_size=64, seq_len=case.seq_len)
    got = ops.sparse_forward(q, k, v, mask, 128 ** -0.5, kv)
    counts, indices = mask.to_indices()
    ref = reference.block_sparse_attention_ref(f64(q), f64(k), f64(v), counts.cpu(),
                                               indices.cpu(), 128 ** -0.5, 64, kv.cpu())
    assert rel_err(got, ref) < (1e-2 if HAS_CUDA else 1e-4)
    assert mask.is_full == (density == 1.0)
    assert bool(pair_calls) == (not hopper and density == 1.0)
    if not pair_calls:
        assert [kw["rotate_period"] for kw in single_calls] == [
            0 if hopper and density == 1.0 else None]


def test_natural_log_lse_matches_logsumexp():
    """Guards the base-2 to natural-log conversion with a hand-computable case."""
    L, D = 70, 16
    q = torch.zeros(1, 1, L, D, device=DEVICE)
    k = torch.zeros(1, 1, L, D, device=DEVICE)
    q[..., 0], k[..., 0] = 1.0, torch.linspace(-1, 1, L, device=DEVICE)
    v = torch.randn(1, 1, L, D, device=DEVICE)
    _, lse, _ = kernels.fused_search(q, k, v, 1.0, 64, None, with_mass=False)
    expected = torch.logsumexp(torch.linspace(-1, 1, L, dtype=torch.float64), 0)
    assert math.isclose(float(lse[0, 0, 0]), float(expected), rel_tol=1e-5)


@interpreter_only
@settings(settings.get_profile("kernels-ci"), max_examples=10)
@given(chunk=st.sampled_from([1, 2, 4]), n_blocks=st.integers(3, 6), ragged=st.integers(0, 63),
       padded=st.integers(0, 80), seed=st.integers(0, 2**16))
def test_mass_pass_walks_every_chunk_interpreter(chunk, n_blocks, ragged, padded, seed):
    """The mass loop gathers ``chunk`` key blocks at a time; real models run many chunks
    (HunyuanVideo 720p: 1,861 key blocks over chunks of 16). A small chunk over up to 6 blocks,
    with a ragged last block and padded keys, runs several chunks and a partial last one."""
    import importlib

    cached_search = importlib.import_module("adaspa_compile.kernels.cached_search")  # the module
    block = 64
    L = n_blocks * block - ragged
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, 2, L, 32, generator=g) for _ in range(2))
    key_valid = torch.ones(1, L, dtype=torch.bool)
    key_valid[:, L - min(padded, L - 1):] = False
    scale = 32 ** -0.5
    _, lse = reference.attention_with_lse_ref(q, k, k, scale, key_valid)
    got = cached_search._launch(q, k, lse, scale, block, key_valid, None, chunk=chunk)
    want = reference.block_mass_ref(f64(q), f64(k), lse.double(), scale, block, key_valid)
    assert rel_err(got, want) < 1e-5, f"mass rel err {rel_err(got, want):.2e}"
