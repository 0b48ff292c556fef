"""``2^x`` on the FMA units: a polynomial for some of a tile's exponentials.

On the H100 the multi-function unit (``MUFU.EX2``) issues 16 exponentials per clock per SM
against 128 FP32 operations, so a loop whose only per-element work is an exponential and a sum or
two (the mass pass of the search, the softmax at head dim 64) waits on that unit while the FMA
pipes idle. Computing a few of every 8 exponentials as ``2^round(x) * p(x - round(x))`` (a cubic
``p``, Horner form, about 9 FMA-pipe instructions) moves that work over.

``POLY_COEFFS`` fit ``2^f`` on ``[-0.5, 0.5]`` for the smallest largest relative error (7.5e-5 in
fp32, measured by ``tests/kernels/test_exp2.py``); inputs are clamped to ``-126``, so the result
is never exactly 0: callers use it only where every input is finite (no ``-inf`` bias), where a
value below ``2^-126`` is as good as 0.

:func:`exp2_poly_torch` is the same arithmetic in PyTorch (the semantics, testable on the CPU);
:func:`mixed_exp2_asm` the PTX the kernels inline (GPU only: the interpreter has no inline asm).
"""

from __future__ import annotations

import struct

import torch

__all__ = ["POLY_COEFFS", "PACK", "exp2_poly_torch", "mixed_exp2_asm"]

# p(f) = ((c3 f + c2) f + c1) f + c0 as fp32 bit patterns (c3, c2, c1, c0).
POLY_COEFFS = (0x3D61FBB0, 0x3E786F0E, 0x3F31798D, 0x3F7FFB49)
_ROUND_MAGIC = 0x4B400000  # 1.5 * 2^23: adding it rounds an fp32 below 2^22 to an integer
_LOWEST = 0xC2FC0000  # -126.0
# Exponentials handed to one inline-asm call; ``EXP_POLY`` of them take the polynomial.
PACK = 8


def _f32(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def exp2_poly_torch(x: torch.Tensor) -> torch.Tensor:
    """The polynomial ``2^x`` of the kernels, step by step in fp32 (the FMAs as mul + add)."""
    x = torch.clamp_min(x.float(), _f32(_LOWEST))
    t = x + _f32(_ROUND_MAGIC)
    f = x - (t - _f32(_ROUND_MAGIC))
    c3, c2, c1, c0 = (_f32(c) for c in POLY_COEFFS)
    p = ((c3 * f + c2) * f + c1) * f + c0
    return (p.view(torch.int32) + (t.view(torch.int32) << 23)).view(torch.float32)


def _poly_ptx(out: str, inp: str) -> str:
    c3, c2, c1, c0 = (f"0f{c:08X}" for c in POLY_COEFFS)
    magic = f"0f{_ROUND_MAGIC:08X}"
    return ("{ .reg .b32 x, t, j, f, p, e;\n"
            f"max.ftz.f32 x, {inp}, 0f{_LOWEST:08X};\n"
            f"add.rn.ftz.f32 t, x, {magic};\n"
            f"sub.rn.ftz.f32 j, t, {magic};\n"
            "sub.rn.ftz.f32 f, x, j;\n"
            f"fma.rn.ftz.f32 p, f, {c3}, {c2};\n"
            f"fma.rn.ftz.f32 p, p, f, {c1};\n"
            f"fma.rn.ftz.f32 p, p, f, {c0};\n"
            "shl.b32 e, t, 23;\n"
            f"add.s32 {out}, p, e; }}\n")


def mixed_exp2_asm(n_poly: int) -> str:
    """PTX for ``PACK`` exponentials (outputs ``$0..$7``, inputs ``$8..$15``): the first
    ``n_poly`` by the polynomial, the rest by ``ex2.approx.ftz.f32``."""
    if not 0 <= n_poly <= PACK:
        raise ValueError(f"n_poly must be in 0..{PACK}, got {n_poly}")
    lines = []
    for i in range(PACK):
        out, inp = f"${i}", f"${i + PACK}"
        lines.append(_poly_ptx(out, inp) if i < n_poly else f"ex2.approx.ftz.f32 {out}, {inp};\n")
    return "".join(lines)
