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


def _exec(path: Path, name: str, monkeypatch) -> ModuleType:
    """Run ``path`` as module ``name``, registered in ``sys.modules`` (dataclasses look it up)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def load_script(path: Path, monkeypatch, siblings: Sequence[str] = ()) -> ModuleType:
    """Import the script at ``path``, its sibling modules ``siblings`` first (by bare name).

    The folder's ``_common`` (the helpers its scripts share), where it has one, is always loaded
    first: every script of the folder, and every sibling, may import it.
    """
    shared = ("_common",) if (path.parent / "_common.py").is_file() else ()
    for sibling in dict.fromkeys((*shared, *siblings)):
        _exec(path.parent / f"{sibling}.py", sibling, monkeypatch)
    return _exec(path, f"adaspa_script_{path.stem}", monkeypatch)
