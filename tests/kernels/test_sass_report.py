"""benchmarks/sass_report.py on the CPU: the sm_90 code of the cached search.

Guards the structural claim the report exists for: in the mass loop every wgmma group is waited
on before the exponentials (the overlap comes from other warps, not from within one warp).
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


def report(*flags: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, not run
    out = subprocess.run([sys.executable, str(SCRIPT), "--kernel", "cached", "--head-dim", "64",
                          *flags], capture_output=True, text=True, env=env, check=True).stdout
    assert re.search(r"HGMMA [1-9]", out) and re.search(r"MUFU [1-9]", out), out
    return out


def order(*flags: str):
    """The run-length ``order:`` line of the report, as ``[(count, opcode), ...]``."""
    line = next(line for line in report(*flags).splitlines() if line.startswith("order: "))
    return [(int(n), op) for n, op in re.findall(r"(\d+)x (\S+)", line)]



def exps_between_wgmmas(runs) -> bool:
    """Whether some exponentials sit between two wgmma issues with no wait in between."""
    names = [op for _, op in runs if op in ("HGMMA", "WARPGROUP.DEPBAR", "MUFU.EX2")]
    return any(a == "HGMMA" and b == "MUFU.EX2" and c == "HGMMA"
               for a, b, c in zip(names, names[1:], names[2:]))


def test_plain_loop_waits_before_the_exponentials():
    assert not exps_between_wgmmas(order())
