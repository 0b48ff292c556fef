"""benchmarks/sass_report.py on the CPU: the sm_90 code of the cached search and of the Gluon
block-sparse kernel.

Guards the structural claims: in the cached search's mass loop every wgmma group is waited on
before the exponentials (the overlap comes from other warps, not from within one warp); in the
Gluon kernel's loop the exponentials run between the wait for the scores and the wait for the
in-flight ``P @ V`` (the overlap it exists for), without spills.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "sass_report.py"
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"

pytestmark = pytest.mark.skipif(not CUOBJDUMP.exists(), reason="triton ships no cuobjdump here")


def report(*flags: str, kernel: str = "cached", head_dim: int = 64) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, not run
    out = subprocess.run([sys.executable, str(SCRIPT), "--kernel", kernel, "--head-dim",
                          str(head_dim), *flags], capture_output=True, text=True, env=env,
                         check=True).stdout
    assert re.search(r"HGMMA [1-9]", out) and re.search(r"MUFU [1-9]", out), out
    return out


def order(*flags: str, **kwargs):
    """The run-length ``order:`` line of the report, as ``[(count, opcode), ...]``."""
    line = next(line for line in report(*flags, **kwargs).splitlines()
                if line.startswith("order: "))
    return [(int(n), op) for n, op in re.findall(r"(\d+)x (\S+)", line)]



def exps_between_wgmmas(runs) -> bool:
    """Whether some exponentials sit between two wgmma issues with no wait in between."""
    names = [op for _, op in runs if op in ("HGMMA", "WARPGROUP.DEPBAR", "MUFU.EX2")]
    return any(a == "HGMMA" and b == "MUFU.EX2" and c == "HGMMA"
               for a, b, c in zip(names, names[1:], names[2:]))


def test_plain_loop_waits_before_the_exponentials():
    assert not exps_between_wgmmas(order())


@pytest.mark.parametrize("head_dim", [64, 128])
def test_hopper_kernel_runs_the_softmax_between_its_two_waits(head_dim):
    """Scores wgmma, then P @ V wgmma, a wait for the scores only, the block's exponentials,
    then the wait for P @ V."""
    flags = ("--rotate", "--mask-mode", "2")
    assert "STACK:0 " in report(*flags, kernel="hopper", head_dim=head_dim)
    runs = [(n, op) for n, op in order(*flags, kernel="hopper", head_dim=head_dim)
            if op in ("HGMMA", "WARPGROUP.DEPBAR", "MUFU.EX2")]
    assert any(a[1] == b[1] == "HGMMA" and c[1] == "WARPGROUP.DEPBAR" and d == (d[0], "MUFU.EX2")
               and d[0] >= 32 and e[1] == "WARPGROUP.DEPBAR"
               for a, b, c, d, e in zip(runs, runs[1:], runs[2:], runs[3:], runs[4:])), runs
