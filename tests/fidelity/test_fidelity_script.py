"""benchmarks/fidelity.py --quick end to end on the CPU (a tiny model trained on the spot)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.scripts import load_script

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "fidelity.py"

pytest.importorskip("diffusers")


def test_metrics_and_schedule(monkeypatch):
    import torch

    m = load_script(SCRIPT, monkeypatch, siblings=("train_fidelity_model",))
    assert m.search_steps_for(50) == (9, 29)
    assert m.search_steps_for(8) == (1, 5)
    assert m.search_steps_for(2) == (0, 1)
    x = torch.rand(2, 3, 2, 16, 16)
    assert torch.allclose(m.ssim(x, x), torch.ones(2), atol=1e-5)
    assert m.psnr(x, x).min() >= 99.0
    noisy = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    assert (m.ssim(noisy, x) < 0.99).all() and (m.psnr(noisy, x) < 30).all()
    assert m.token_grid((16, 128, 128)) == (16, 32, 32)


def test_paired_difference_interval(monkeypatch):
    m = load_script(SCRIPT, monkeypatch, siblings=("train_fidelity_model",))
    ours, peer = [20.0, 22.5, 25.0, 18.0, 21.0], [19.0, 19.5, 21.0, 18.2, 20.0]
    diff, (low, high) = m.paired_difference(ours, peer)
    assert diff == 1.76 and low <= diff <= high and low < high
    assert m.paired_difference(peer, peer) == (0.0, [0.0, 0.0])  # one difference: no spread
    two = m.paired_difference([30.0, 31.0], [29.0, 29.5])  # BCa is undefined for two pairs
    assert two[1][0] <= two[0] <= two[1][1]


SUMMARY_KEYS = {"resolution", "density", "method", "pairs", "psnr", "ssim", "density_achieved",
                "recall", "vs_window_db", "vs_window_ci95", "vs_pooled_db", "vs_pooled_ci95",
                "vs_default_db", "vs_default_ci95"}


def test_quick_end_to_end(tmp_path):
    out, summary = tmp_path / "fidelity_quick.json", tmp_path / "fidelity_summary_quick.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--densities", "0.2", "--max-minutes", "60",
           "--weights", str(tmp_path / "no_weights"), "--out-json", str(out),
           "--summary-json", str(summary), "--plot-png", str(tmp_path / "psnr.png"),
           "--strip-png", str(tmp_path / "strip.png")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "QUICK" in proc.stdout and "goals:" in proc.stdout
    report = json.loads(out.read_text())
    assert report["quick"] and report["model"]["source"].startswith("quick-trained")
    # the harness itself: sparsity 0 reproduces the dense clips
    assert report["sanity"]["passed"] and report["sanity"]["psnr_min"] >= 60.0
    done = [r for r in report["results"] if not r.get("skipped")]
    methods = {r["method"] for r in done}
    assert methods == {"default", "paper", "window", "pooled", "recall0.9", "cfg-cond", "cfg-sum",
                       "layer-budget", "no-tiers", "fp8"}
    errors = report["attention_error"]["4x32x32"]
    assert errors["calls"] > 0 and errors["step"] == 1
    assert 0 < errors["densities"]["0.2"]["fp8_vs_bf16"] < 0.1
    assert all(r["same_as"] == "default @ 0.2" for r in done if r["method"] == "paper")
    big = [r for r in done if r["resolution"] == "4x32x32"]
    for r in big:
        assert len(r["psnr"]) == 2 and len(r["ssim"]) == 2
        assert set(r["search"]) == {"1", "5"}, r["phases"]
        assert 0 < r["density_mean"] <= 1 and 0 < r["recall_mean"] <= 1
    assert (tmp_path / "strip.png").is_file()
    assert report["goals"] and all(g["status"] in ("met", "missed") for g in report["goals"])
    rows = json.loads(summary.read_text())
    assert len(rows) == len(done)
    for row in rows:
        assert set(row) == SUMMARY_KEYS, row
        assert row["pairs"] == 2
        for peer in ("window", "pooled"):
            diff, ci = row[f"vs_{peer}_db"], row[f"vs_{peer}_ci95"]
            if row["method"] == "recall0.9":  # no peer runs at a density of its own
                assert diff is None and ci is None
                continue
            assert all(math.isfinite(v) for v in (diff, *ci)) and ci[0] <= diff <= ci[1], row
    window = next(r for r in rows if r["method"] == "window" and r["resolution"] == "4x32x32")
    assert window["vs_window_db"] == 0.0 and window["vs_window_ci95"] == [0.0, 0.0]


def test_full_run_without_weights_says_how_to_train(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--weights", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0
    assert "python benchmarks/train_fidelity_model.py --minutes 8" in proc.stderr
