"""``SearchTimer``: the search time the report shows, without a host sync on the GPU."""

import time

import pytest
import torch

from adaspa_compile.runtime import SearchTimer


def test_cpu_timer_reads_the_wall_clock():
    timer = SearchTimer(torch.device("cpu"))
    time.sleep(0.02)
    timer.stop()
    assert 15.0 <= timer.ms() < 1000.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_timer_times_the_stream():
    x = torch.randn(4096, 4096, device="cuda")
    timer = SearchTimer(x.device)
    for _ in range(10):
        x = x @ x.T / 64
    timer.stop()
    assert 0.0 < timer.ms() < 10_000.0
