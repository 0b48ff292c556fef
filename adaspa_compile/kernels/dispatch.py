"""Which kernel runs a call, and with which launch options: the one place that decides.

A call is described by :class:`Call`. From it, :func:`dense_pass_order`,
:func:`attention_lse_options`, :func:`block_mass_options` and :func:`block_sparse_plan` give the
executor and a :class:`LaunchOptions`, which the public launchers of the kernel modules take.
Everything here is a plain function of the description, so the choices are tested on a CPU.

Every choice below was measured on an H100 (bf16); the numbers are in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from . import _common

__all__ = ["Call", "LaunchOptions", "SparsePlan", "dense_pass_order", "attention_lse_options",
           "block_mass_options", "block_sparse_plan", "supported_block_sizes", "fp8_refusal",
           "FP8_HEAD_DIMS"]

HALF_DTYPES = (torch.float16, torch.bfloat16)
# Head dims at which FlashAttention-4 was measured (CogVideoX 64; HunyuanVideo and Wan 128).
FA4_HEAD_DIMS = (64, 128)
# Head dims where the Gluon kernel is the block-sparse executor on Hopper: at 128 it took 5-9%
# less time than the Triton kernel on density-0.2 masks; at 64 it was 4-5% slower.
GLUON_HEAD_DIMS = (128,)
# Programs per SM in the rotated list walk's period: at head dim 128 periods of 3-6 per SM ran
# alike (and 21% faster than no rotation on a random mask); at 64, 4 per SM was best.
ROTATE_PROGRAMS_PER_SM = 4
# (num_warps, num_stages) per kernel and (padded head dim, block size), tuned on the H100 with
# ``benchmarks/kernel_speed.py --tune`` (the block size 128 rows of "mass" and "sparse" are
# untuned; "sparse-fp8" at head dim 128 only); small head dims take the 64 entry, anything
# missing ``_DEFAULT_WARPS_STAGES``.
WARPS_STAGES = {
    ("attn", 128, 64): (8, 3), ("attn", 128, 128): (8, 3),
    ("attn", 64, 64): (8, 3), ("attn", 64, 128): (8, 3),
    ("mass", 128, 64): (8, 3), ("mass", 128, 128): (8, 2),
    ("mass", 64, 64): (4, 3), ("mass", 64, 128): (4, 3),
    ("sparse", 128, 64): (4, 2), ("sparse", 128, 128): (8, 2),
    ("sparse", 64, 64): (4, 2), ("sparse", 64, 128): (8, 2),
    ("sparse-fp8", 128, 64): (4, 3), ("sparse-fp8", 128, 128): (8, 2),
}
_DEFAULT_WARPS_STAGES = (4, 2)
# Register caps where one more program then fits an SM and ran faster: the mass pass at head
# dim 64 (5 programs of 4 warps instead of 4: 3% faster).
MAX_REGISTERS = {("mass", 64, 64): 96}
# The Gluon kernel: 2 K buffers, 1 V buffer and 168 registers fit 3 programs per SM at head dim
# 128 (5-10% faster than 2 per SM with 2 / 2 buffers and no cap).
GLUON_OPTIONS = dict(num_warps=4, k_stages=2, v_stages=1, max_registers=168)
# The FP8 block-sparse kernel: head dims whose tiles FP8 tensor cores take (the reduction dim of
# an FP8 dot is at least 32 wide), and the first architecture with FP8 tensor cores (Ada, sm89).
FP8_HEAD_DIMS = (64, 128)
FP8_MIN_ARCH = (8, 9)


@dataclass(frozen=True)
class Call:
    """What the kernel choice depends on.

    ``arch`` is the CUDA compute capability, ``(0, 0)`` off the GPU (Triton's interpreter);
    ``sm_count`` the GPU's multiprocessors (0 off the GPU); ``padded``: a key-padding mask is
    given; ``full_mask``: the block mask keeps every block; ``tma_ok``: the tensors' strides and
    bases suit tensor descriptors; ``fp8``: the block-sparse attention runs in FP8.
    """

    arch: Tuple[int, int]
    sm_count: int
    dtype: torch.dtype
    head_dim: int
    block_size: int
    padded: bool = False
    full_mask: bool = False
    tma_ok: bool = True
    fp8: bool = False

    @classmethod
    def of(cls, q: torch.Tensor, block_size: int, key_valid: Optional[torch.Tensor] = None, *,
           full_mask: bool = False, tensors: Tuple[torch.Tensor, ...] = (),
           fp8: bool = False) -> "Call":
        """The description of a call on ``q`` (``tensors``: those read through TMA)."""
        on_gpu = q.is_cuda and not _common.interpreting()
        arch = torch.cuda.get_device_capability(q.device) if on_gpu else (0, 0)
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if on_gpu else 0
        return cls(arch=tuple(arch), sm_count=sms, dtype=q.dtype, head_dim=q.shape[-1],
                   block_size=block_size, padded=key_valid is not None, full_mask=full_mask,
                   tma_ok=all(_common.tma_compatible(t) for t in tensors), fp8=fp8)

    @property
    def head_dim_pad(self) -> int:
        return _common.padded_head_dim(self.head_dim)

    @property
    def hopper(self) -> bool:
        return self.arch[0] == 9

    def tma_measured(self) -> bool:
        """TMA loads where they were measured faster (10-20%): sm90+, 16-bit, head dim 64/128."""
        return (self.arch[0] >= 9 and self.dtype in HALF_DTYPES and self.head_dim in (64, 128)
                and self.tma_ok)


@dataclass(frozen=True)
class LaunchOptions:
    """Launch options of one kernel.

    ``tma``: read K (and V) through tensor descriptors; ``rotate_period``: program ``p`` walks
    its list from the fraction ``(p mod P) / P`` on (0: no rotation); ``bias_range``: only kept
    blocks inside the per-batch range of padded key blocks take the key bias; ``k_stages`` /
    ``v_stages``: the Gluon kernel's K and V buffers; ``max_registers``: a per-thread cap.
    """

    num_warps: int = 4
    num_stages: int = 2
    max_registers: Optional[int] = None
    tma: bool = False
    rotate_period: int = 0
    bias_range: bool = False
    k_stages: int = 2
    v_stages: int = 1

    def __post_init__(self):
        for name, least in (("num_warps", 1), ("num_stages", 1), ("k_stages", 1),
                            ("v_stages", 1), ("rotate_period", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"LaunchOptions.{name} must be an int >= {least}, got {value!r}")

    def replace(self, **changes) -> "LaunchOptions":
        return dataclasses.replace(self, **changes)

    def compiler_options(self) -> dict:
        """Extra keyword arguments of the launch (``maxnreg``), none under the interpreter."""
        if self.max_registers is None or _common.interpreting():
            return {}
        return {"maxnreg": self.max_registers}


@dataclass(frozen=True)
class SparsePlan:
    """The block-sparse executor (``"gluon"``, ``"triton"`` or ``"triton-fp8"``) and its
    options."""

    executor: str
    options: LaunchOptions


def _warps_stages(kernel: str, call: Call) -> dict:
    key = (kernel, max(64, call.head_dim_pad), call.block_size)
    warps, stages = WARPS_STAGES.get(key, _DEFAULT_WARPS_STAGES)
    return {"num_warps": warps, "num_stages": stages, "max_registers": MAX_REGISTERS.get(key)}


def dense_pass_order(call: Call) -> Tuple[str, ...]:
    """Dense attention with LSE (the exact search's first half): the executors to try in order,
    each declining calls it cannot run. FlashAttention-4 (where installed) was the fastest
    (0.74-0.78x cuDNN); cuDNN beat our kernel at head dim 128 (310 vs 355 ms at the HunyuanVideo
    shape) and ours beat cuDNN at 64 (57-59 vs 60-61 ms at CogVideoX's). With key padding cuDNN
    runs only the valid keys, so it stays first there."""
    order = []
    if call.arch == (9, 0) and call.dtype in HALF_DTYPES and call.head_dim in FA4_HEAD_DIMS \
            and not call.padded:
        order.append("fa4")
    if call.head_dim != 64 or call.padded:
        order.append("cudnn")
    return tuple(order) + ("triton",)


def attention_lse_options(call: Call) -> LaunchOptions:
    """Our dense attention+LSE kernel."""
    return LaunchOptions(**_warps_stages("attn", call))


def block_mass_options(call: Call) -> LaunchOptions:
    """The block-mass pass (the mass from an LSE), with TMA for K where measured faster."""
    return LaunchOptions(tma=call.tma_measured(), **_warps_stages("mass", call))


def gluon_takes(call: Call) -> bool:
    """Whether the Gluon kernel can run the call: Hopper (wgmma exists on sm90 only), fp16 /
    bf16, head dim 64 or 128, block size 64, TMA-compatible tensors."""
    return (call.hopper and call.dtype in HALF_DTYPES and call.head_dim in (64, 128)
            and call.block_size == 64 and call.tma_ok)


def block_sparse_plan(call: Call, gluon_available: bool = True) -> SparsePlan:
    """The block-sparse executor. On Hopper at the Gluon head dims, the Gluon kernel, walking
    lists rotated unless the mask keeps every block (rotated on full masks it was 2-6% slower);
    elsewhere the Triton kernel, rotated on any GPU, with TMA where measured and, at head dim
    128 with key padding, the key bias only inside the padded blocks' range (87-90 -> 80-82 ms
    at the HunyuanVideo shape; at head dim 64 it was mixed, so every block keeps the bias)."""
    rotate = ROTATE_PROGRAMS_PER_SM * call.sm_count
    if call.fp8:  # its operands are ours: contiguous, padded to whole blocks, TMA-compatible
        return SparsePlan("triton-fp8", LaunchOptions(
            tma=call.arch[0] >= 9, rotate_period=rotate,
            bias_range=call.padded and call.head_dim_pad >= 128,
            **_warps_stages("sparse-fp8", call)))
    if gluon_available and call.head_dim in GLUON_HEAD_DIMS and gluon_takes(call):
        return SparsePlan("gluon", LaunchOptions(
            tma=True, rotate_period=0 if call.full_mask else rotate, **GLUON_OPTIONS))
    return SparsePlan("triton", LaunchOptions(
        tma=call.tma_measured(), rotate_period=rotate,
        bias_range=call.padded and call.head_dim_pad >= 128,
        **_warps_stages("sparse", call)))


def fp8_refusal(arch: Tuple[int, int], head_dim: int) -> str:
    """Why the FP8 kernel cannot run this head dim on a GPU of this architecture (``""``: it
    can). ``arch`` ``(0, 0)`` is Triton's interpreter, which runs it at any supported dim."""
    if head_dim not in FP8_HEAD_DIMS:
        return (f"the FP8 kernel runs head dims {FP8_HEAD_DIMS}, and this model's attention has "
                f"head dim {head_dim}")
    if arch != (0, 0) and tuple(arch) < FP8_MIN_ARCH:
        return (f"this GPU (compute capability {arch[0]}.{arch[1]}) has no FP8 tensor cores; "
                f"they need {FP8_MIN_ARCH[0]}.{FP8_MIN_ARCH[1]} or newer (Ada, Hopper)")
    return ""


def supported_block_sizes(arch: Tuple[int, int]) -> Tuple[int, ...]:
    """Block sizes some kernel runs on a GPU of this architecture (the CPU path takes any)."""
    return _common.SUPPORTED_BLOCK_SIZES if arch[0] >= 8 else ()
