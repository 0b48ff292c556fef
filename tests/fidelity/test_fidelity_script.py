"""benchmarks/fidelity.py --quick end to end on the CPU (a tiny model trained on the spot)."""

from __future__ import annotations

import json
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


def test_quick_end_to_end(tmp_path):
    out = tmp_path / "fidelity_quick.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--densities", "0.2",
           "--weights", str(tmp_path / "no_weights"), "--out-json", str(out),
           "--plot-png", str(tmp_path / "psnr.png"), "--strip-png", str(tmp_path / "strip.png")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "QUICK" in proc.stdout and "goals (issue 4)" in proc.stdout
    report = json.loads(out.read_text())
    assert report["quick"] and report["model"]["source"].startswith("quick-trained")
    done = [r for r in report["results"] if not r.get("skipped")]
    methods = {r["method"] for r in done}
    assert methods == {"adaspa", "window", "pooled", "adaspa-no-head-adaptive",
                       "adaspa-no-lse-cache", "adaspa-shared-cfg", "adaspa-recall"}
    big = [r for r in done if r["resolution"] == "4x32x32"]
    for r in big:
        assert len(r["psnr"]) == 2 and len(r["ssim"]) == 2
        assert set(r["search"]) == {"1", "5"}, r["phases"]
        assert 0 < r["density_mean"] <= 1 and 0 < r["recall_mean"] <= 1
    assert (tmp_path / "strip.png").is_file()
    assert report["goals"] and all(g["status"] in ("met", "missed") for g in report["goals"])


def test_full_run_without_weights_says_how_to_train(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--weights", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0
    assert "python benchmarks/train_fidelity_model.py --minutes 8" in proc.stderr


def test_quick_run_at_density_one_reproduces_dense(tmp_path):
    """Sanity of the whole harness: at density 1 (sparsity 0) every phase keeps every block, so
    the adaspa clips equal the dense ones (PSNR >= 60 dB)."""
    out = tmp_path / "fidelity_dense.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--densities", "1.0", "--methods", "adaspa",
           "--resolutions", "4x16x16", "--weights", str(tmp_path / "no_weights"),
           "--out-json", str(out), "--plot-png", str(tmp_path / "psnr.png"),
           "--strip-png", str(tmp_path / "strip.png")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    done = [r for r in json.loads(out.read_text())["results"] if not r.get("skipped")]
    assert done and all(min(r["psnr"]) >= 60.0 for r in done), done
