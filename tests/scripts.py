"""Load a benchmark or example script into a test without touching ``sys.path``.

A script imports its siblings by bare name (``import _common``), as Python puts the script's own
folder first on ``sys.path`` when it runs. In a test the siblings are loaded from their files and
registered in ``sys.modules`` for the duration of the test only, so no folder of this repository
ever lands on ``sys.path``, where its modules could shadow installed packages.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]


def _exec(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_script(path: Path, monkeypatch, siblings: Sequence[str] = ()) -> ModuleType:
    """Import the script at ``path``, its sibling modules ``siblings`` first (by bare name)."""
    for sibling in siblings:
        monkeypatch.setitem(sys.modules, sibling, _exec(path.parent / f"{sibling}.py", sibling))
    return _exec(path, f"adaspa_script_{path.stem}")
