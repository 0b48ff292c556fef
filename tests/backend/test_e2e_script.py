"""benchmarks/e2e.py: --quick on the CPU (Wan 2.2's two experts, whole and regional compiles) and
its full-size shapes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]


def test_wan22_experts_whole_and_regional(tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "e2e.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "e2e.py"), "--quick", "--models", "wan22",
           "--methods", "inductor,adaspa-0.8,adaspa-0.8-regional", "--json", str(out),
           "--no-merge"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    entry = json.loads(out.read_text())["models"]["wan22"]
    assert entry["config"]["boundary_step_timed"] == 5
    for method in ("adaspa-0.8", "adaspa-0.8-regional"):
        result = entry["methods"][method]
        # the high-noise expert: dense, fused, sparse, cached; the low-noise one: its own fused
        # search at its first step, then sparse
        assert result["phases_seen"] == "DDFSCFSS", result["report"]
        assert result["sites_rewritten"] == 4 and result["recompiles"] == 0
        assert result["schedule_projected"]["fused_search"] == 2
        assert result["projected_50_s"] > 0


def test_full_size_specs_are_the_shared_shapes(monkeypatch):
    """e2e.py builds its full-size models from ``benchmarks/_common.py``'s shapes, the ones that
    kernel_speed.py times: the same heads, head dim, tokens, text and depth."""
    pytest.importorskip("diffusers")
    e2e = load_script(ROOT / "benchmarks" / "e2e.py", monkeypatch)
    shapes = e2e.SHAPES
    assert {name: s.tokens for name, s in shapes.items()} == {
        "hunyuan": 119_056, "wan": 75_600, "cogvideox": 45_106}
    specs = {"hunyuan": e2e.hunyuan_spec(False, 2, 4), "wan": e2e.wan_spec(False, 4),
             "cogvideox": e2e.cogvideox_spec(False, 4)}
    for name, spec in specs.items():
        s = shapes[name]
        assert (spec.heads, spec.head_dim, spec.tokens, spec.text_tokens, spec.full_layers) == (
            s.heads, s.head_dim, s.tokens, s.text_tokens, s.layers), name
