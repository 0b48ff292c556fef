"""benchmarks/ncu_kernels.py on the CPU: its targets build and launch (under the interpreter, at
a few hundred tokens), and bad target names are refused. The ncu part needs a GPU machine."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import ncu_kernels  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="the interpreter launch; on a GPU run the script itself")


def args(tokens: int, rotate_period=None) -> argparse.Namespace:
    return argparse.Namespace(quick=False, tokens=tokens, rotate_period=rotate_period)


@pytest.mark.parametrize("target,rotate", [("cached-cogvideox", None),
                                           ("sparse-cogvideox-random", None),
                                           ("sparse-hunyuan-local", None),
                                           ("sparse-hunyuan-random", 3)])
def test_targets_launch(target, rotate, capsys):
    ncu_kernels.launch(target, args(200, rotate))
    assert "finite True" in capsys.readouterr().out


@pytest.mark.parametrize("target", ["cached", "sparse-hunyuan", "sparse-ltx-random", "dense-wan"])
def test_unknown_targets_are_refused(target):
    with pytest.raises(SystemExit, match="unknown target"):
        ncu_kernels.parse_target(target)


def test_metric_rows_read_ncu_csv():
    text = ('==PROF== noise\n"ID","Kernel Name","Section Name","Metric Name","Metric Unit",'
            '"Metric Value"\n"0","k","WarpStateStats","Stall Long Scoreboard","cycle","12.5"\n')
    assert ncu_kernels.metric_rows(text) == [("WarpStateStats", "Stall Long Scoreboard", "cycle",
                                              "12.5")]
