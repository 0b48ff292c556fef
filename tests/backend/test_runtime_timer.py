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
    """The events bracket the queued work: at most the wall time around it (after a sync), and
    most of it, since the host only queues the GEMMs."""
    x = torch.randn(4096, 4096, device="cuda")
    (x @ x).sum().item()  # warm up cuBLAS
    torch.cuda.synchronize()
    start = time.perf_counter()
    timer = SearchTimer(x.device)
    for _ in range(20):
        x = x @ x.T / 64
    timer.stop()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3
    assert 0.5 * wall_ms <= timer.ms() <= wall_ms + 0.5, (timer.ms(), wall_ms)
