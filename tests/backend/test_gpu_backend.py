"""The backend on CUDA: Triton kernels behind the op, bf16, inductor (run on the H100)."""

import pytest
import torch

import adaspa_compile
from tests.tiny_models import inputs_on_cuda, tiny_hunyuan_video, tiny_wan

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("fresh_compile"),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

OPTIONS = {"min_seq_len": 128, "search_steps": (1, 3), "sparsity": 0.5}


def on_cuda(factory):
    model, kwargs = factory()
    return model.to("cuda", torch.bfloat16), inputs_on_cuda(kwargs)


def run(model, kwargs, compiled, n):
    pairs = []
    with torch.no_grad():
        for i in range(n):
            t = torch.full_like(kwargs["timestep"], 900 - 100 * i)
            args = dict(kwargs, timestep=t)
            pairs.append((model(**args)[0].float(), compiled(**args)[0].float()))
    return pairs


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("factory", [tiny_hunyuan_video, tiny_wan])
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_all_phases_on_cuda(factory, sparsity):
    model, kwargs = on_cuda(factory)
    compiled = torch.compile(model, backend="adaspa", fullgraph=True,
                             options=dict(OPTIONS, sparsity=sparsity))
    pairs = run(model, kwargs, compiled, 5)
    assert rel(pairs[0][1], pairs[0][0]) < 2e-2  # dense step: the model's own SDPA
    assert rel(pairs[1][1], pairs[1][0]) < 2e-2  # fused search: exact output
    for eager, ours in pairs:
        assert torch.isfinite(ours).all()
        if sparsity == 0.0:
            assert rel(ours, eager) < 2e-2
    for site in adaspa_compile.report().rewritten:
        assert site.phases == {0: "DFSCS"}
