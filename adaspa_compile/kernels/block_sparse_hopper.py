"""Block-sparse attention for Hopper in Gluon: the 64-row programs of :mod:`.block_sparse`, with
the next block's scores computed while this block's softmax runs.

Same semantics as :func:`.block_sparse.block_sparse_triton` with ``block_size=64``. Triton's
compiler waits for a ``q @ k^T`` wgmma as soon as it is issued unless its result is a
loop-carried accumulator, so the tensor cores idle while the exponentials run. Here each step
issues the scores of block ``t`` and the ``P @ V`` of block ``t - 1`` as asynchronous wgmmas,
waits only for the scores, and runs block ``t``'s softmax while ``P @ V`` is in flight
(FlashAttention-3's intra-warpgroup overlap). K and V arrive by TMA into ``K_STAGES`` /
``V_STAGES`` buffers, each with its own mbarrier; one V buffer and a register cap let 3
programs share an SM (:data:`.dispatch.GLUON_OPTIONS`). That third program, not the overlap,
is what made it faster than the Triton kernel (:data:`.dispatch.GLUON_HEAD_DIMS`).

It runs the calls :func:`.dispatch.gluon_takes` accepts, key padding and the rotated list walk
included, and raises ``ValueError`` on others. GPU only (Gluon has no interpreter).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _common
from .dispatch import Call, LaunchOptions, gluon_takes

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:  # a Triton without Gluon: AVAILABLE is False
    gluon = None

__all__ = ["block_sparse_gluon", "AVAILABLE"]

AVAILABLE = gluon is not None
BLOCK = 64

if gluon is not None:
    @gluon.jit
    def _list_block(idx_base, t, rot, count, stride_ik, ROTATE: gl.constexpr):
        """The key block in walk position ``t`` (rotated by ``rot``, wrapping at ``count``)."""
        slot = t
        if ROTATE:
            slot = t + rot
            slot = gl.where(slot >= count, slot - count, slot)
        return gl.load(idx_base + slot * stride_ik).to(gl.int32)

    @gluon.jit
    def _issue_kv(desc, smem, bars, t, count, idx_base, rot, stride_ik, z, h,
                  BLOCK_SIZE: gl.constexpr, ROTATE: gl.constexpr, N_BUFFERS: gl.constexpr):
        """Start the TMA load of walk position ``t``'s block into buffer ``t % STAGES`` (no-op
        past the list's end)."""
        if t < count:
            j = _list_block(idx_base, t, rot, count, stride_ik, ROTATE)
            buf = t % N_BUFFERS
            mbarrier.expect(bars.index(buf), desc.block_type.nbytes)
            tma.async_copy_global_to_shared(desc, [z, h, j * BLOCK_SIZE, 0], bars.index(buf),
                                            smem.index(buf))

    @gluon.jit
    def _softmax(s, j, m_i, l_i, bias_base, lo, hi, qk_scale, s_layout: gl.constexpr,
                 BLOCK_SIZE: gl.constexpr, HAS_BIAS: gl.constexpr):
        """Block ``j``'s probabilities (unnormalized, base 2) and the updated row state."""
        if HAS_BIAS:
            if (j >= lo) & (j < hi):
                cols = gl.arange(0, BLOCK_SIZE, layout=gl.SliceLayout(0, s_layout))
                s = s + gl.load(bias_base + j * BLOCK_SIZE + cols)[None, :]
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        p = gl.exp2(s * qk_scale - m_new[:, None])
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, 1)
        return p, m_new, l_i, alpha

    @gluon.jit
    def _hopper_kernel(q_desc, k_desc, v_desc, o_desc, Counts, Indices, Order, Bias, BiasRange,
                       stride_cz, stride_ch, stride_cm, stride_iz, stride_ih, stride_im,
                       stride_ik, H, n_lists, n_k_blocks, qk_scale, rotate_period,
                       HEAD_DIM: gl.constexpr, BLOCK_SIZE: gl.constexpr, HAS_BIAS: gl.constexpr,
                       ROTATE: gl.constexpr, K_STAGES: gl.constexpr, V_STAGES: gl.constexpr,
                       num_warps: gl.constexpr):
        dtype: gl.constexpr = q_desc.dtype
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_SIZE, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout,
                                                     k_width=2)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

        flat = gl.load(Order + gl.program_id(0))
        zh = flat // n_lists
        lst = flat % n_lists
        z = zh // H
        h = zh % H
        count = gl.load(Counts + z.to(gl.int64) * stride_cz + h * stride_ch
                        + lst * stride_cm).to(gl.int32)
        idx_base = Indices + z.to(gl.int64) * stride_iz + h.to(gl.int64) * stride_ih \
            + lst.to(gl.int64) * stride_im
        rot = 0
        if ROTATE:
            rot = ((gl.program_id(0) % rotate_period) * count) // rotate_period
        bias_base = Bias + z.to(gl.int64) * n_k_blocks * BLOCK_SIZE
        lo = 0
        hi = 0
        if HAS_BIAS:
            lo = gl.load(BiasRange + z * 2)
            hi = gl.load(BiasRange + z * 2 + 1)

        q_smem = gl.allocate_shared_memory(dtype, [1, 1, BLOCK_SIZE, HEAD_DIM], q_desc.layout)
        k_smem = gl.allocate_shared_memory(dtype, [K_STAGES, 1, 1, BLOCK_SIZE, HEAD_DIM],
                                           k_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [V_STAGES, 1, 1, BLOCK_SIZE, HEAD_DIM],
                                           v_desc.layout)
        order_smem = gl.allocate_shared_memory(
            gl.float32, [BLOCK_SIZE], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_bars = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
        v_bars = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(K_STAGES):
            mbarrier.init(k_bars.index(i), count=1)
        for i in gl.static_range(V_STAGES):
            mbarrier.init(v_bars.index(i), count=1)

        mbarrier.expect(q_bar, q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [z, h, lst * BLOCK_SIZE, 0], q_bar, q_smem)
        for i in gl.static_range(K_STAGES):
            _issue_kv(k_desc, k_smem, k_bars, i, count, idx_base, rot, stride_ik, z, h,
                      BLOCK_SIZE, ROTATE, K_STAGES)
        for i in gl.static_range(V_STAGES):
            _issue_kv(v_desc, v_smem, v_bars, i, count, idx_base, rot, stride_ik, z, h,
                      BLOCK_SIZE, ROTATE, V_STAGES)
        mbarrier.wait(q_bar, 0)
        q = q_smem.reshape([BLOCK_SIZE, HEAD_DIM])

        m_i = gl.full([BLOCK_SIZE], -1.0e30, gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([BLOCK_SIZE], gl.float32, layout=gl.SliceLayout(1, s_layout))
        acc = gl.zeros([BLOCK_SIZE, HEAD_DIM], gl.float32, layout=o_layout)
        s_zero = gl.zeros([BLOCK_SIZE, BLOCK_SIZE], gl.float32, layout=s_layout)
        if count > 0:
            # Walk position 0: its scores alone.
            j = _list_block(idx_base, 0, rot, count, stride_ik, ROTATE)
            mbarrier.wait(k_bars.index(0), 0)
            k = k_smem.index(0).reshape([BLOCK_SIZE, HEAD_DIM]).permute((1, 0))
            s_tok = warpgroup_mma(q, k, s_zero, use_acc=False, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok, ))
            gl.thread_barrier()
            _issue_kv(k_desc, k_smem, k_bars, K_STAGES, count, idx_base, rot, stride_ik, z, h,
                      BLOCK_SIZE, ROTATE, K_STAGES)
            p, m_i, l_i, alpha = _softmax(s, j, m_i, l_i, bias_base, lo, hi, qk_scale, s_layout,
                                          BLOCK_SIZE, HAS_BIAS)
            for t in range(1, count):
                buf = t % K_STAGES
                prev = (t - 1) % V_STAGES
                # Scores of position t, then P @ V of position t - 1, both in flight.
                j = _list_block(idx_base, t, rot, count, stride_ik, ROTATE)
                mbarrier.wait(k_bars.index(buf), (t // K_STAGES) & 1)
                k = k_smem.index(buf).reshape([BLOCK_SIZE, HEAD_DIM]).permute((1, 0))
                s_tok = warpgroup_mma(q, k, s_zero, use_acc=False, is_async=True)
                mbarrier.wait(v_bars.index(prev), ((t - 1) // V_STAGES) & 1)
                p_op = gl.convert_layout(p.to(dtype), p_layout)
                v = v_smem.index(prev).reshape([BLOCK_SIZE, HEAD_DIM])
                acc_tok = warpgroup_mma(p_op, v, acc, is_async=True)
                s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok, ))
                p, m_i, l_i, alpha = _softmax(s, j, m_i, l_i, bias_base, lo, hi, qk_scale,
                                              s_layout, BLOCK_SIZE, HAS_BIAS)
                # A shared-memory store of the row sums (which need every exponential) before
                # the wait: ptxas keeps memory operations on their side of a wgmma wait, but
                # moves arithmetic freely, and would otherwise run most exponentials after it.
                order_smem.store(l_i)
                acc, p_op, p, alpha = warpgroup_mma_wait(num_outstanding=0,
                                                         deps=(acc_tok, p_op, p, alpha))
                acc = acc * gl.convert_layout(alpha, row_o)[:, None]
                # Both buffers read: refill them STAGES positions on.
                gl.thread_barrier()
                _issue_kv(k_desc, k_smem, k_bars, t + K_STAGES, count, idx_base, rot, stride_ik,
                          z, h, BLOCK_SIZE, ROTATE, K_STAGES)
                _issue_kv(v_desc, v_smem, v_bars, t - 1 + V_STAGES, count, idx_base, rot,
                          stride_ik, z, h, BLOCK_SIZE, ROTATE, V_STAGES)
            last = (count - 1) % V_STAGES
            mbarrier.wait(v_bars.index(last), ((count - 1) // V_STAGES) & 1)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            v = v_smem.index(last).reshape([BLOCK_SIZE, HEAD_DIM])
            acc_tok = warpgroup_mma(p_op, v, acc, is_async=True)
            acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc_tok, p_op))

        mbarrier.invalidate(q_bar)
        for i in gl.static_range(K_STAGES):
            mbarrier.invalidate(k_bars.index(i))
        for i in gl.static_range(V_STAGES):
            mbarrier.invalidate(v_bars.index(i))
        l_o = gl.convert_layout(l_i, row_o)
        out = acc / gl.where(l_o > 0.0, l_o, 1.0)[:, None]
        q_smem.reshape([BLOCK_SIZE, HEAD_DIM]).store(out.to(dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(o_desc, [z, h, lst * BLOCK_SIZE, 0], q_smem)
        tma.store_wait(pendings=0)


def _descriptor(t: torch.Tensor):
    layout = gl.NVMMASharedLayout.get_default_for([1, 1, BLOCK, t.shape[-1]],
                                                  getattr(gl, str(t.dtype).split(".")[-1]))
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, BLOCK, t.shape[-1]],
                            layout)


def block_sparse_gluon(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       counts: torch.Tensor, indices: torch.Tensor, scale: float,
                       key_valid: Optional[torch.Tensor], options: LaunchOptions, *,
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of each 64-row query block over ``indices[b, h, i, :counts[b, h, i]]``, as
    :func:`.block_sparse.block_sparse_triton` with ``block_size=64``, on Hopper.

    ``options``: from :func:`.dispatch.block_sparse_plan` (or chosen by hand):
    ``rotate_period``, ``k_stages`` / ``v_stages`` (K and V buffers: blocks loaded ahead),
    ``max_registers`` (a per-thread cap), ``num_warps``.
    """
    _common.check_attention_inputs(q, k, v, scale, BLOCK, key_valid)
    tensors = (q, k, v) if out is None else (q, k, v, out)
    call = Call.of(q, BLOCK, key_valid, tensors=tensors)
    if not AVAILABLE or not gluon_takes(call):
        raise ValueError("block_sparse_gluon needs Gluon, an sm90 GPU, bf16/fp16, head dim 64 or "
                         "128 and TMA-compatible strides (last dim contiguous, the others "
                         f"16-byte aligned); got {q.dtype}, head dim {q.shape[-1]} on {q.device}")
    B, H, L, D = q.shape
    out, indices, nb = _common.launch_lists(q, counts, indices, BLOCK, out)
    if L == 0 or B * H == 0:
        return out
    bias = _common.key_bias(key_valid, B, L, BLOCK, q.device)
    has_bias = _common.mask_mode(key_valid, L, BLOCK) != _common.MASK_NONE
    # The range is read only with the bias.
    block_range = _common.bias_block_range(bias, BLOCK) if has_bias else bias
    _hopper_kernel[(B * H * nb,)](
        _descriptor(q), _descriptor(k), _descriptor(v), _descriptor(out), counts, indices,
        _common.work_order(counts), bias, block_range,
        counts.stride(0), counts.stride(1), counts.stride(2),
        indices.stride(0), indices.stride(1), indices.stride(2), indices.stride(3),
        H, nb, nb, _common.log2_scale(scale), options.rotate_period or 1,
        HEAD_DIM=D, BLOCK_SIZE=BLOCK, HAS_BIAS=has_bias, ROTATE=options.rotate_period != 0,
        K_STAGES=options.k_stages, V_STAGES=options.v_stages, num_warps=options.num_warps,
        **options.compiler_options(),
    )
    return out
