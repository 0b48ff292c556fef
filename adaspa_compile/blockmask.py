"""`BlockMask`: which key blocks each (batch, head, query block) attends to, stored as bits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

__all__ = ["BlockMask", "pack_bits"]

_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def pack_bits(dense: torch.Tensor) -> torch.Tensor:
    """Bool ``[..., nk]`` -> uint8 ``[..., ceil(nk / 8)]``, bit ``j % 8`` of byte ``j // 8``."""
    nk = dense.shape[-1]
    padded = torch.nn.functional.pad(dense.to(torch.uint8), (0, (-nk) % 8))
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=dense.device)
    return (padded.view(*dense.shape[:-1], -1, 8) * weights).sum(-1, dtype=torch.uint8)


@dataclass(frozen=True)
class BlockMask:
    """A block-sparse attention mask, compact enough to cache for every layer.

    ``bits`` is a ``uint8`` tensor ``[B, H, num_q_blocks, ceil(num_kv_blocks / 8)]``; bit ``j % 8``
    of byte ``j // 8`` in row ``(b, h, i)`` is set when query block ``i`` attends key block ``j``
    (little-endian bit order). Blocks are squares of side ``block_size`` over a sequence of
    ``seq_len`` tokens; the last block may be ragged. ``max_kept`` is the largest number of kept
    blocks in any row; it sizes the index lists that kernels read (see :meth:`to_indices`).
    ``kept_blocks`` is the number of kept blocks over all rows, where known (None otherwise).

    For HunyuanVideo 720p (1861 blocks, 24 heads) one layer's mask is 10 MB, against 100 MB for
    int32 index lists at density 0.3.
    """

    bits: torch.Tensor
    num_kv_blocks: int
    block_size: int
    seq_len: int
    max_kept: int
    kept_blocks: Optional[int] = None

    def __post_init__(self) -> None:
        if self.bits.dtype != torch.uint8 or self.bits.dim() != 4:
            raise ValueError(f"BlockMask.bits must be uint8 [B, H, nq, nk/8], got {self.bits.dtype} "
                             f"{tuple(self.bits.shape)}")
        nb = -(-self.seq_len // self.block_size)
        if self.bits.shape[2] != nb or self.num_kv_blocks != nb:
            raise ValueError(f"BlockMask for seq_len={self.seq_len}, block_size={self.block_size} "
                             f"needs {nb} query and key blocks, got {self.bits.shape[2]} and "
                             f"{self.num_kv_blocks}")
        if self.bits.shape[3] != -(-nb // 8):
            raise ValueError(f"BlockMask.bits last dim must be ceil({nb} / 8), got {self.bits.shape[3]}")

    @classmethod
    def from_dense(cls, dense: torch.Tensor, *, block_size: int, seq_len: int) -> "BlockMask":
        """Pack a bool ``[B, H, nq, nk]`` mask. Reads ``max_kept`` back to the host once."""
        if dense.dtype != torch.bool or dense.dim() != 4:
            raise ValueError(f"dense block mask must be bool [B, H, nq, nk], got {dense.dtype} "
                             f"{tuple(dense.shape)}")
        return cls.from_bits(pack_bits(dense), dense.sum(-1, dtype=torch.int32),
                             num_kv_blocks=dense.shape[-1], block_size=block_size, seq_len=seq_len)

    @classmethod
    def from_bits(cls, bits: torch.Tensor, counts: torch.Tensor, *, num_kv_blocks: int,
                  block_size: int, seq_len: int) -> "BlockMask":
        """A mask from packed ``bits`` and its kept blocks per row ``counts`` ``[B, H, nq]``.
        Reads ``max_kept`` and the kept total back to the host once."""
        if not counts.numel():
            return cls(bits=bits, num_kv_blocks=num_kv_blocks, block_size=block_size,
                       seq_len=seq_len, max_kept=0, kept_blocks=0)
        max_kept, kept = torch.stack([counts.max(), counts.sum()]).tolist()
        return cls(bits=bits, num_kv_blocks=num_kv_blocks, block_size=block_size, seq_len=seq_len,
                   max_kept=max_kept, kept_blocks=kept)

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        """``(B, H, num_q_blocks, num_kv_blocks)``."""
        b, h, nq, _ = self.bits.shape
        return (b, h, nq, self.num_kv_blocks)

    def to_dense(self) -> torch.Tensor:
        """The bool ``[B, H, nq, nk]`` mask."""
        shifts = torch.arange(8, dtype=torch.uint8, device=self.bits.device)
        unpacked = (self.bits.unsqueeze(-1) >> shifts) & 1
        return unpacked.flatten(-2)[..., : self.num_kv_blocks].bool()

    def to_indices(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(counts, indices)``: int32 ``[B, H, nq]`` and ``[B, H, nq, max_kept]``.

        Row ``(b, h, i)`` attends key blocks ``indices[b, h, i, :counts[b, h, i]]``, ascending;
        entries past the count are 0. Runs on the mask's device without a host sync.

        This is the pure-PyTorch reference (it unpacks the dense mask); with the Triton kernels,
        ``adaspa_compile.kernels.mask_to_indices`` gives the same tensors from the packed bits in
        one launch, and the sparse path uses it.
        """
        dense = self.to_dense()
        counts = dense.sum(-1, dtype=torch.int32)
        slot = torch.cumsum(dense, -1, dtype=torch.int64) - 1
        slot = torch.where(dense, slot, torch.full_like(slot, self.max_kept))
        cols = torch.arange(self.num_kv_blocks, dtype=torch.int32, device=dense.device)
        indices = torch.zeros(*dense.shape[:-1], self.max_kept + 1, dtype=torch.int32,
                              device=dense.device)
        indices.scatter_(-1, slot, cols.expand_as(slot))
        return counts, indices[..., : self.max_kept].contiguous()

    @property
    def is_full(self) -> bool:
        """Whether every row keeps every block (known only when ``kept_blocks`` is)."""
        b, h, nq, nk = self.shape
        return self.kept_blocks is not None and self.kept_blocks == b * h * nq * nk

    def density(self) -> torch.Tensor:
        """Kept share of blocks per (batch, head), fp32 ``[B, H]``."""
        return self.to_dense().float().mean(dim=(-2, -1))

    def sparsity(self) -> float:
        """Dropped share of all blocks, as a float (syncs)."""
        return 1.0 - float(self.density().mean())

    def nbytes(self) -> int:
        """Bytes held on the device."""
        return self.bits.numel()

    def __repr__(self) -> str:
        b, h, nq, nk = self.shape
        return (f"BlockMask(shape=(B={b}, H={h}, nq={nq}, nk={nk}), block_size={self.block_size}, "
                f"seq_len={self.seq_len}, max_kept={self.max_kept}, device={self.bits.device})")
