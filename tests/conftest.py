"""Shared test setup: hypothesis profiles and a clean Dynamo/adaspa state per test."""

from __future__ import annotations

import gc
import os

import torch

# Triton decides at decoration time whether a kernel is interpreted, so the interpreter must be on
# before anything imports adaspa_compile.kernels: here, the first conftest pytest loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        from tests.kernels import _interp_shim

        _interp_shim.install()
    except ImportError:  # no triton: the kernel tests skip themselves
        pass

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=60, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def fresh_compile():
    """Reset Dynamo and collect the models of earlier tests (their adaspa state goes with them)
    before and after a test."""
    torch._dynamo.reset()
    gc.collect()
    yield
    torch._dynamo.reset()
    gc.collect()
