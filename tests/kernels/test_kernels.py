"""Property tests of the attention kernels against the pure-PyTorch reference in float64.

Without CUDA they run under Triton's CPU interpreter in fp32 (relative error < 1e-4). The same
properties, marked ``gpu``, run the compiled kernels on a CUDA device in bf16 (and fp32 with IEEE
dots), against the float64 reference of the dtype-rounded inputs. Every output is poisoned with
NaN first, so an element the kernel forgets to write fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from adaspa_compile import kernels, ops, reference
from adaspa_compile.blockmask import BlockMask
from adaspa_compile.kernels.dispatch import Call, LaunchOptions, block_sparse_plan

pytest.importorskip("triton")

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
def run_attention(case: Case, dtype: torch.dtype, device: str) -> torch.Tensor:
    """Dense attention+LSE vs the reference; returns the kernel's LSE."""
    q, k, v = make_qkv(case, dtype, device)
    kv = make_key_valid(case, device)
    scale = case.head_dim ** -0.5
    B, H, L, _ = q.shape
    out, lse = poisoned(q), torch.full((B, H, L), float("nan"), device=device)
    options = LaunchOptions() if device == "cpu" else None
    if options is None:
        from adaspa_compile.kernels.dispatch import attention_lse_options
        options = attention_lse_options(Call.of(q, case.block_size, kv))
    got_out, got_lse = kernels.attention_with_lse(q, k, v, scale, kv, options, out=out, lse=lse)
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
    return got_lse


def run_mass(case: Case, dtype: torch.dtype, device: str, tma: bool = False,
             lse: Optional[torch.Tensor] = None) -> None:
    """Block mass vs the reference, from ``lse`` (default: the float64 reference's LSE; any fp32
    LSE is a valid input, as a cached one from an earlier step is)."""
    q, k, _ = make_qkv(case, dtype, device)
    kv = make_key_valid(case, device)
    scale = case.head_dim ** -0.5
    kv_cpu = None if kv is None else kv.cpu()
    if lse is None:
        lse = reference.attention_with_lse_ref(f64(q), f64(k), f64(k), scale, kv_cpu)[1].float()
    nb = case.n_blocks
    mass = torch.full((case.batch, case.heads, nb, nb), float("nan"), device=device)
    got = kernels.mass_from_lse(q, k, lse.to(device), scale, case.block_size, kv,
                                LaunchOptions(tma=tma), mass=mass)
    ref = reference.block_mass_ref(f64(q), f64(k), f64(lse), scale, case.block_size, kv_cpu)
    err = rel_err(got, ref)
    assert err < mass_tolerance(dtype), f"mass rel err {err:.2e}"
    # Rows of the mass map sum to the number of valid query rows of the block.
    if dtype == torch.float32:
        rows_valid = torch.isfinite(lse.cpu()).double()
        per_block = torch.nn.functional.pad(rows_valid, (0, nb * case.block_size - case.seq_len))
        expected = per_block.view(case.batch, case.heads, nb, case.block_size).sum(-1)
        assert torch.allclose(f64(got).sum(-1), expected, rtol=1e-4, atol=1e-4)


def run_sparse(case: Case, dtype: torch.dtype, device: str,
               options: Optional[LaunchOptions] = None, gluon: bool = False) -> None:
    """Block-sparse output vs the reference. ``options``: the launch options (None: what
    ``dispatch.block_sparse_plan`` picks for the call); ``gluon``: run the Gluon kernel."""
    q, k, v = make_qkv(case, dtype, device)
    kv = make_key_valid(case, device)
    mask = make_mask(case, device)
    counts, indices = mask.to_indices()
    scale = case.head_dim ** -0.5
    out = poisoned(q)
    if options is None:
        plan = block_sparse_plan(Call.of(q, case.block_size, kv, full_mask=mask.is_full,
                                         tensors=(q, k, v)), kernels.GLUON_AVAILABLE)
        options, gluon = plan.options, plan.executor == "gluon"
    if gluon:
        got = kernels.block_sparse_gluon(q, k, v, counts, indices, scale, kv, options, out=out)
    else:
        got = kernels.block_sparse_triton(q, k, v, counts, indices, scale, case.block_size, kv,
                                          options, out=out)
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
def test_attention_with_lse_interpreter(case):
    run_attention(case, torch.float32, "cpu")


@interpreter_only
@settings(settings.get_profile("kernels-ci"))
@given(case=INTERP_CASES, tma=st.booleans())
def test_block_mass_interpreter(case, tma):
    run_mass(case, torch.float32, "cpu", tma)


@interpreter_only
@settings(settings.get_profile("kernels-ci"))
@given(case=INTERP_CASES, tma=st.booleans(), rotate_period=st.sampled_from([0, 0, 1, 3]),
       bias_range=st.booleans())
def test_block_sparse_interpreter(case, tma, rotate_period, bias_range):
    run_sparse(case, torch.float32, "cpu",
               LaunchOptions(tma=tma, rotate_period=rotate_period, bias_range=bias_range))


@interpreter_only
@pytest.mark.parametrize("period", [2, 3, 5])
@pytest.mark.parametrize("seq_len,padding,bias_range", [
    (6 * 64, "none", False), (6 * 64 - 30, "none", False), (6 * 64, "tail", False),
    (6 * 64, "tail", True), (6 * 64 - 30, "whole_block", True)])
def test_block_sparse_rotated_walk_interpreter(period, seq_len, padding, bias_range):
    """``rotate_period``: lists long enough (6 blocks) that every program's walk wraps."""
    case = Case(batch=1, heads=3, seq_len=seq_len, head_dim=16, block_size=64, layout="bshd",
                padding=padding, density=0.7, input_scale=1.0, seed=period)
    run_sparse(case, torch.float32, "cpu",
               LaunchOptions(rotate_period=period, bias_range=bias_range))


# ----------------------------------------------------------------------------- GPU
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@settings(settings.get_profile("kernels-gpu"))
@given(case=GPU_CASES)
def test_attention_with_lse_gpu(dtype, case):
    assume(dtype != torch.float32 or case.head_dim <= 64)  # fp32 FMA dots compile slowly
    run_attention(case, dtype, "cuda")


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@settings(settings.get_profile("kernels-gpu"))
@given(case=GPU_CASES, tma=st.booleans())
def test_block_mass_gpu(dtype, case, tma):
    assume(dtype != torch.float32 or case.head_dim <= 64)  # fp32 FMA dots compile slowly
    run_mass(case, dtype, "cuda", tma)


@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=str)
@settings(settings.get_profile("kernels-gpu"))
@given(case=GPU_CASES, options=st.sampled_from([None, None, LaunchOptions(),
                                                 LaunchOptions(tma=True, rotate_period=7),
                                                 LaunchOptions(bias_range=True, num_warps=8)]))
def test_block_sparse_gpu(dtype, case, options):
    """The dispatched options (None), and hand-picked ones on the Triton kernel."""
    assume(dtype != torch.float32 or case.head_dim <= 64)  # fp32 FMA dots compile slowly
    run_sparse(case, dtype, "cuda", options)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@settings(settings.get_profile("kernels-gpu"), max_examples=8)
@given(case=GPU_LONG_CASES, kernel=st.sampled_from(["exact", "mass", "sparse"]))
def test_long_sequences_gpu(case, kernel):
    """Real models run many chunks and long lists: 64+ key blocks, with padding and ragged ends.
    ``exact``: the mass from the attention kernel's own LSE, as the exact search runs them."""
    if kernel == "exact":
        run_mass(case, torch.bfloat16, "cuda", lse=run_attention(case, torch.bfloat16, "cuda"))
    elif kernel == "mass":
        run_mass(case, torch.bfloat16, "cuda", tma=True)
    else:
        run_sparse(case, torch.bfloat16, "cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@settings(settings.get_profile("kernels-gpu"))
@given(case=HOPPER_CASES, rotate_period=st.sampled_from([0, 7, 528]),
       buffers=st.sampled_from([(2, 2, None), (2, 1, 168), (3, 3, None), (1, 1, None)]))
def test_block_sparse_gluon_gpu(dtype, case, rotate_period, buffers):
    assume(case.block_size == 64)
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel needs an sm90 GPU")
    k_stages, v_stages, max_registers = buffers
    run_sparse(case, dtype, "cuda", LaunchOptions(
        rotate_period=rotate_period, k_stages=k_stages, v_stages=v_stages,
        max_registers=max_registers), gluon=True)


for _test in (test_attention_with_lse_gpu, test_block_mass_gpu, test_block_sparse_gpu,
              test_block_sparse_gluon_gpu):
    for _mark in gpu_only:
        _mark(_test)


# ----------------------------------------------------------------------------- bad input
DEVICE = "cuda" if HAS_CUDA else "cpu"


def _qkv(shape=(1, 2, 100, 64), dtype=torch.float32):
    return [torch.randn(shape, device=DEVICE).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("fn", ["attention", "mass", "sparse", "gluon"])
@pytest.mark.parametrize("problem", ["dtype", "head_dim", "block_size", "key_valid", "shape"])
def test_bad_input_raises_value_error(fn, problem):
    dtype = torch.float64 if problem == "dtype" else torch.float32
    shape = (1, 2, 100, 160) if problem == "head_dim" else (1, 2, 100, 64)
    q, k, v = _qkv(shape, dtype)
    if problem == "shape":
        k = k[:, :, :50]
    bs = 32 if problem == "block_size" else 64
    if fn == "attention" and problem == "block_size":
        pytest.skip("dense attention has no block size")
    kv = torch.ones(1, 99, dtype=torch.bool, device=DEVICE) if problem == "key_valid" else None
    nb = -(-100 // 64)
    options = LaunchOptions()
    with pytest.raises(ValueError):
        if fn == "attention":
            kernels.attention_with_lse(q, k, v, 0.1, kv, options)
        elif fn == "mass":
            kernels.mass_from_lse(q, k, torch.zeros(1, 2, 100, device=DEVICE), 0.1, bs, kv,
                                  options)
        else:
            counts = torch.ones(1, 2, nb, dtype=torch.int32, device=DEVICE)
            indices = torch.zeros(1, 2, nb, 1, dtype=torch.int32, device=DEVICE)
            if fn == "sparse":
                kernels.block_sparse_triton(q, k, v, counts, indices, 0.1, bs, kv, options)
            else:
                kernels.block_sparse_gluon(q, k, v, counts, indices, 0.1, kv, options)


def test_gluon_kernel_refuses_what_it_does_not_support():
    """fp32 (and, without an sm90 GPU, anything): a ValueError naming the requirements, and the
    dispatch keeps the Triton kernel."""
    q, k, v = _qkv((1, 2, 100, 128))
    counts = torch.ones(1, 2, 2, dtype=torch.int32, device=DEVICE)
    indices = torch.zeros(1, 2, 2, 1, dtype=torch.int32, device=DEVICE)
    plan = block_sparse_plan(Call.of(q, 64, tensors=(q, k, v)), kernels.GLUON_AVAILABLE)
    assert plan.executor == "triton"
    with pytest.raises(ValueError, match="sm90"):
        kernels.block_sparse_gluon(q, k, v, counts, indices, 0.1, None, LaunchOptions())


@pytest.mark.parametrize("field,value", [("rotate_period", -1), ("rotate_period", 2.5),
                                         ("num_warps", 0), ("k_stages", True)])
def test_bad_launch_options_raise(field, value):
    with pytest.raises(ValueError, match=field):
        LaunchOptions(**{field: value})


def test_bad_mask_shape_raises():
    q, k, v = _qkv()
    counts = torch.ones(1, 2, 3, dtype=torch.int32, device=DEVICE)  # nq is 2 for L=100, bs=64
    indices = torch.zeros(1, 2, 3, 1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="counts"):
        kernels.block_sparse_triton(q, k, v, counts, indices, 0.1, 64, None, LaunchOptions())


@pytest.mark.parametrize("scale", [0.0, -0.1, float("inf"), float("nan")])
def test_attention_kernels_need_a_positive_scale(scale):
    """The row max is taken on unscaled scores (``_tiles.online_softmax_step``)."""
    q, k, v = _qkv()
    nb = -(-100 // 64)
    counts = torch.ones(1, 2, nb, dtype=torch.int32, device=DEVICE)
    indices = torch.zeros(1, 2, nb, 1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="positive finite softmax scale"):
        kernels.block_sparse_triton(q, k, v, counts, indices, scale, 64, None, LaunchOptions())
    with pytest.raises(ValueError, match="positive finite softmax scale"):
        kernels.attention_with_lse(q, k, v, scale, None, LaunchOptions())
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
        kernels.mass_from_lse(q, k, torch.zeros(1, 2, 100, dtype=torch.float16, device=DEVICE),
                              0.1, 64, None, LaunchOptions())


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


def test_register_caps_apply_only_on_the_gpu(monkeypatch):
    options = LaunchOptions(max_registers=96)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert options.compiler_options() == {"maxnreg": 96}
    assert LaunchOptions().compiler_options() == {}
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter has no registers to cap
    assert options.compiler_options() == {}


@pytest.mark.parametrize("gluon", [False, True])
@pytest.mark.parametrize("density", [1.0, 0.3])
def test_sparse_forward_runs_the_planned_executor(monkeypatch, gluon, density):
    """``ops.sparse_forward`` runs the executor and options ``block_sparse_plan`` gives for the
    call (whether the mask is full included), and matches the reference. The Gluon plan is
    forced here and its launch replaced by the Triton kernel with the same options, since Gluon
    runs only on an sm90 GPU."""
    plans, launches = [], []
    real_plan = kernels.dispatch.block_sparse_plan

    def plan(call, available):
        plans.append(call)
        got = real_plan(call, available)
        return kernels.dispatch.SparsePlan("gluon" if gluon else "triton", got.options)

    def launch(executor):
        def run(q, k, v, counts, indices, scale, *rest):
            launches.append((executor, rest[-1]))
            block_size = 64 if executor == "gluon" else rest[0]
            key_valid = rest[0] if executor == "gluon" else rest[1]
            return real_triton(q, k, v, counts, indices, scale, block_size, key_valid, rest[-1])
        return run

    real_triton = kernels.block_sparse_triton
    monkeypatch.setattr(ops, "_kernels_for", lambda *a: kernels)  # the interpreter on the CPU
    monkeypatch.setattr(kernels.dispatch, "block_sparse_plan", plan)
    monkeypatch.setattr(kernels, "block_sparse_triton", launch("triton"))
    monkeypatch.setattr(kernels, "block_sparse_gluon", launch("gluon"))
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    case = Case(batch=1, heads=2, seq_len=1000 if HAS_CUDA else 380, head_dim=128,
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
    assert [(c.full_mask, c.padded, c.head_dim) for c in plans] == [(density == 1.0, True, 128)]
    assert [executor for executor, _ in launches] == ["gluon" if gluon else "triton"]


def test_natural_log_lse_matches_logsumexp():
    """Guards the base-2 to natural-log conversion with a hand-computable case."""
    L, D = 70, 16
    q = torch.zeros(1, 1, L, D, device=DEVICE)
    k = torch.zeros(1, 1, L, D, device=DEVICE)
    q[..., 0], k[..., 0] = 1.0, torch.linspace(-1, 1, L, device=DEVICE)
    v = torch.randn(1, 1, L, D, device=DEVICE)
    _, lse = kernels.attention_with_lse(q, k, v, 1.0, None, LaunchOptions())
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
    block = 64
    L = n_blocks * block - ragged
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, 2, L, 32, generator=g) for _ in range(2))
    key_valid = torch.ones(1, L, dtype=torch.bool)
    key_valid[:, L - min(padded, L - 1):] = False
    scale = 32 ** -0.5
    _, lse = reference.attention_with_lse_ref(q, k, k, scale, key_valid)
    got = kernels.mass_from_lse(q, k, lse, scale, block, key_valid, LaunchOptions(), chunk=chunk)
    want = reference.block_mass_ref(f64(q), f64(k), lse.double(), scale, block, key_valid)
    assert rel_err(got, want) < 1e-5, f"mass rel err {rel_err(got, want):.2e}"
