"""The FMA-unit ``2^x`` of the kernels (``kernels/_exp2.py``): its arithmetic, in PyTorch on the
CPU, and the PTX builder. The PTX itself runs only on a GPU (``test_kernels.py``'s ``gpu`` tests
draw ``exp_poly``); ``test_sass_report.py`` checks that it compiles for sm_90."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adaspa_compile.kernels._exp2 import PACK, exp2_poly_torch, mixed_exp2_asm

MAX_REL_ERR = 7.6e-5  # the cubic's minimax error on [-0.5, 0.5], evaluated in fp32


def test_relative_error_on_the_whole_range():
    x = torch.linspace(-125.0, 2.0, 2_000_001, dtype=torch.float32)  # -126: subnormal
    got = exp2_poly_torch(x).double()
    want = torch.exp2(x.double())
    assert float(((got - want) / want).abs().max()) < MAX_REL_ERR


@settings(max_examples=200, deadline=None)
@given(st.floats(-125.0, 4.0, width=32))
def test_relative_error_at_random_points(x):
    got = float(exp2_poly_torch(torch.tensor([x], dtype=torch.float32)))
    assert abs(got / 2.0 ** x - 1.0) < MAX_REL_ERR


def test_below_the_range_is_tiny_and_nonnegative():
    x = torch.tensor([-126.0, -127.5, -1e30, float("-inf")])
    got = exp2_poly_torch(x)
    assert bool((got >= 0).all()) and float(got.max()) <= 2.0 ** -125


def test_integers_are_near_exact():
    x = torch.arange(-100, 3, dtype=torch.float32)
    rel = exp2_poly_torch(x).double() / torch.exp2(x.double()) - 1
    assert float(rel.abs().max()) < 1e-4


@pytest.mark.parametrize("n_poly", range(PACK + 1))
def test_asm_has_n_polynomials_and_the_rest_on_mufu(n_poly):
    asm = mixed_exp2_asm(n_poly)
    assert asm.count("ex2.approx.ftz.f32") == PACK - n_poly
    assert asm.count("fma.rn.ftz.f32") == 3 * n_poly
    outputs = [f"${i}," for i in range(PACK)]
    assert all(o in asm for o in outputs)  # every output written


@pytest.mark.parametrize("n_poly", [-1, PACK + 1])
def test_asm_rejects_bad_counts(n_poly):
    with pytest.raises(ValueError, match="n_poly"):
        mixed_exp2_asm(n_poly)
