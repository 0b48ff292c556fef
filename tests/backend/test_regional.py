"""Regional compilation: ``transformer.compile_repeated_blocks(backend="adaspa")`` runs the same
schedule as compiling the whole transformer, on tiny random diffusers models, each in a fresh
process (nothing compiled before it)."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tiny_models import timestep_like

ROOT = Path(__file__).resolve().parents[2]
OPTIONS = {"min_seq_len": 128, "search_steps": (1, 3), "sparsity": 0.5}
STEPS = 6


def generate(model, kwargs, steps=STEPS, t0=900.0):
    """One generation of ``steps`` calls with falling timesteps."""
    outs = []
    with torch.no_grad():
        for i in range(steps):
            timestep = timestep_like(kwargs["timestep"], t0 - 100 * i)
            outs.append(model(**dict(kwargs, timestep=timestep))[0])
    return outs


def compare_regional_with_whole(name: str) -> dict:
    """Whole-model and regional adaspa on copies of one tiny model: outputs and phases per site,
    and whether a second generation recompiles."""
    import adaspa_compile
    from tests.tiny_models import ALL_TINY_MODELS

    model, kwargs = ALL_TINY_MODELS[name]()
    whole_model, regional_model = copy.deepcopy(model), copy.deepcopy(model)
    whole = torch.compile(whole_model, backend="adaspa", fullgraph=True, options=OPTIONS)
    expected = generate(whole, kwargs)
    regional_model.compile_repeated_blocks(backend="adaspa", fullgraph=True, options=OPTIONS)
    got = generate(regional_model, kwargs)
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = generate(regional_model, kwargs)
    phases = {r.name: r.phases for r in adaspa_compile.report(whole_model).rewritten}
    regional_phases = {r.name: r.phases for r in adaspa_compile.report(regional_model).rewritten}
    return {"max_diff": max(float((a - b).abs().max()) for a, b in zip(got, expected)),
            "max_diff_again": max(float((a - b).abs().max()) for a, b in zip(again, got)),
            "scale": max(float(e.abs().max()) for e in expected),
            "phases": phases, "regional_phases": regional_phases,
            "report": str(adaspa_compile.report(regional_model))}


@pytest.mark.parametrize("name", ["wan", "hunyuan_video", "ltx"])
def test_regional_compile_runs_the_whole_model_schedule(name):
    pytest.importorskip("diffusers")
    code = ("import json\nfrom tests.backend.test_regional import compare_regional_with_whole\n"
            f"print(json.dumps(compare_regional_with_whole({name!r})))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["regional_phases"] == result["phases"], result["report"]
    assert result["phases"] and all(
        p == {"0": "DFSCSS"} or set(p.values()) == {"DFSCSS"} for p in result["phases"].values()
    ), result["report"]
    assert result["max_diff"] <= 1e-4 * max(result["scale"], 1.0), result
    assert result["max_diff_again"] == 0.0, result
