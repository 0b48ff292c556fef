"""Kernel-test setup: Triton's CPU interpreter when no GPU is present, hypothesis profiles.

``TRITON_INTERPRET`` must be set before Triton or the kernel modules are imported, so the
top-level ``tests/conftest.py`` sets it (and installs the interpreter shim) when CUDA is
unavailable. Profiles (applied per test, not loaded globally, so they do not fight the project's
own profiles):

- ``kernels-ci``: interpreter runs, bounded for CI (``ADASPA_KERNEL_EXAMPLES`` overrides the count);
- ``kernels-gpu``: the ``gpu``-marked runs on a CUDA device.
"""

import os

from hypothesis import HealthCheck, settings

_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile(
    "kernels-ci", max_examples=int(os.environ.get("ADASPA_KERNEL_EXAMPLES", "40")),
    deadline=None, suppress_health_check=_SUPPRESS, derandomize=True, print_blob=True)
settings.register_profile(
    "kernels-gpu", max_examples=int(os.environ.get("ADASPA_KERNEL_GPU_EXAMPLES", "40")),
    deadline=None, suppress_health_check=_SUPPRESS, print_blob=True)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (runs the compiled kernels)")
