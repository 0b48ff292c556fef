"""benchmarks/e2e.py: --quick on the CPU (Wan 2.2's two experts, whole and regional compiles) and
its full-size shapes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
# --quick --full-depth: eager only (compiling 40 blocks takes inductor ~80 s on 2 CPU cores)
FULL_DEPTH_METHODS = "eager"


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


def run_e2e(tmp_path, *args):
    out = tmp_path / "e2e.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "e2e.py"), "--quick", *args,
           "--json", str(out), "--no-merge"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_full_depth_builds_the_real_layer_count(tmp_path):
    """--full-depth builds Wan at its 40 layers (tiny widths with --quick) and says so; the
    projection carries the depth."""
    pytest.importorskip("diffusers")
    entry = run_e2e(tmp_path, "--full-depth", "--models", "wan",
                    "--methods", FULL_DEPTH_METHODS)["models"]["wan"]
    assert entry["config"]["depth"] == {"layers": 40, "full": 40, "label": "40",
                                        "reason": "full depth"}
    for method in FULL_DEPTH_METHODS.split(","):
        result = entry["methods"][method]
        assert "error" not in result, result
        assert result["projected_50_s"] > 0 and result["depth"] == "40 layers of 40"


def test_step_caches_alone_and_with_adaspa(tmp_path):
    """A cache alone and with adaspa time a whole generation; MagCache, which needs calibrated
    ratios, is skipped with its reason; the adaspa sites record the phases they ran."""
    pytest.importorskip("diffusers")
    payload = run_e2e(tmp_path, "--models", "wan", "--methods",
                      "inductor,cache-fbc,adaspa-0.8+taylorseer,cache-magcache")
    methods = payload["models"]["wan"]["methods"]
    assert "mag_ratios" in methods["cache-magcache"]["skipped"]
    for method in ("cache-fbc", "adaspa-0.8+taylorseer"):
        result = methods[method]
        assert "error" not in result, result
        assert result["steps"] == 8 and result["generation_s"] > 0
        assert result["x_inductor_gen"] > 0
    both = methods["adaspa-0.8+taylorseer"]
    assert both["sites_rewritten"] == 2
    # TaylorSeer (cache_interval 5, from step 3) computes steps 0, 1, 2 and 4 of 8 and predicts
    # the rest: every site ran 4 calls per branch, searching at its own steps 2 and 4
    assert both["hooked_modules"] == 4  # attn1 and attn2 of both blocks
    assert both["site_calls"] == {f"blocks.{i}.attn1 (WanTransformer3DModel)": 8
                                  for i in range(2)}, both["report"]
    assert all(p == "DDFC" for phases in both["site_phases"].values() for p in phases.values())
    assert all(c["ok"] for c in payload["checks"]), payload["checks"]


def test_full_depth_halves_after_out_of_memory(monkeypatch):
    """--full-depth on CUDA: a depth whose build or first forward runs out of memory is
    retried at half the layers (not below the truncated default); the depth used and why are
    recorded. Here the build of more than 10 layers fails as a CUDA OOM would (tiny widths)."""
    pytest.importorskip("diffusers")
    e2e = load_script(ROOT / "benchmarks" / "e2e.py", monkeypatch)
    args = e2e.parse_args(["--quick", "--full-depth"])
    assert e2e.depths("hunyuan_video", args)[0] == (20, 40)
    assert e2e.depths("wan", args) == [40, 20, 10, 5, 2]
    build = e2e.build_model

    def build_or_oom(spec, device, dtype):
        if spec.layers > 10:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return build(spec, device, dtype)

    monkeypatch.setattr(e2e, "build_model", build_or_oom)
    specs = [e2e.wan_spec(True, d) for d in e2e.depths("wan", args)]
    spec, model, branches, depth = e2e.build_fitting(specs, args, torch.device("cpu"),
                                                     torch.bfloat16)
    assert spec.layers == 10 and len(model.blocks) == 10 and len(branches) == 2
    assert depth == {"layers": 10, "full": 40, "label": "10",
                     "reason": "out of memory at 40 and at 20 layers"}


def test_fp8_method_runs_the_sparse_steps_in_fp8(tmp_path):
    """``adaspa-0.8-fp8``: the options carry the precision, the phases are the default's, and
    its report says the sparse steps ran in FP8 (on the CPU: the FP8 reference)."""
    pytest.importorskip("diffusers")
    payload = run_e2e(tmp_path, "--models", "wan", "--methods", "adaspa-0.8,adaspa-0.8-fp8")
    methods = payload["models"]["wan"]["methods"]
    assert methods["adaspa-0.8-fp8"]["options"]["precision"] == "fp8"
    assert "precision" not in methods["adaspa-0.8"]["options"]
    assert methods["adaspa-0.8-fp8"]["phases_seen"] == methods["adaspa-0.8"]["phases_seen"]
    assert "sparse steps in FP8" in methods["adaspa-0.8-fp8"]["report"]
    assert methods["adaspa-0.8-fp8"]["projected_50_s"] > 0
