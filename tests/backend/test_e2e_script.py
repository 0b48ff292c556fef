"""benchmarks/e2e.py --quick on the CPU: Wan 2.2's two experts, whole and regional compiles."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
