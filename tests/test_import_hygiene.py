"""No module of this repository shadows an installed package.

A script's folder is first on ``sys.path`` when the script runs, and pytest puts the repository
root there. A module in either place named like an installed package's top-level module wins over
that package: ``benchmarks/kernels.py`` once replaced Hugging Face's ``kernels``, which
``transformers`` imports, and broke every diffusers test. These tests check the names, then
import what the scripts import, with their folder first on the path, in one process each.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path
from typing import Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_FOLDERS = ("benchmarks", "examples", "research")
# Imported in every probe: the modules through which transformers and diffusers load theirs.
LIBRARY_MODULES = ("adaspa_compile", "transformers", "transformers.modeling_utils", "diffusers",
                   "diffusers.loaders.peft", "diffusers.models.attention_dispatch")


def local_modules(folder: Path) -> Set[str]:
    """The names ``import NAME`` finds in ``folder`` when it is on ``sys.path``."""
    names = {p.stem for p in folder.glob("*.py")}
    names |= {p.name for p in folder.iterdir() if p.is_dir() and p.name.isidentifier()}
    return names


def imported_modules(folder: Path) -> Set[str]:
    """Every absolute module name the scripts of ``folder`` import, at any depth."""
    names = set()
    for script in folder.glob("*.py"):
        for node in ast.walk(ast.parse(script.read_text(), filename=str(script))):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
    return names


def test_no_module_is_named_like_an_installed_package():
    installed = importlib.metadata.packages_distributions()
    ours = {"adaspa_compile"}
    places = {".": ROOT, **{name: ROOT / name for name in SCRIPT_FOLDERS}}
    clashes = {f"{place}/{name}": installed[name]
               for place, folder in places.items()
               for name in sorted(local_modules(folder) - ours) if name in installed}
    assert not clashes, (f"these modules shadow installed packages' modules of the same name: "
                         f"{clashes}; rename them")


PROBE = """
import importlib, json, os, sys
folder = os.path.realpath(os.getcwd())
local, wanted = set(json.loads(sys.argv[1])), json.loads(sys.argv[2])
missing = []
for name in wanted:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] != name.split(".")[0]:
            raise
        missing.append(name)  # an optional dependency that is not installed here
files = {n: getattr(m, "__file__", None) for n, m in list(sys.modules.items())}
strays = sorted(n for n, f in files.items() if isinstance(f, str) and os.path.isabs(f)
                and os.path.realpath(f).startswith(folder + os.sep) and n.split(".")[0] not in local)
print(json.dumps({"missing": missing, "strays": strays}))
"""


@pytest.mark.parametrize("folder", ["benchmarks", "examples"])
def test_script_imports_resolve_to_installed_packages(folder):
    """With the folder first on the path (``python -c`` runs in it), the libraries and every
    module the folder's scripts import load, and only the folder's own modules come from it."""
    pytest.importorskip("diffusers")
    path = ROOT / folder
    local = local_modules(path)
    wanted = list(LIBRARY_MODULES) + sorted(imported_modules(path))
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(sorted(local)),
                           json.dumps(wanted)], cwd=path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not found["strays"], f"modules loaded from {folder}/ under another name: {found}"
    assert not set(found["missing"]) & set(LIBRARY_MODULES), found


def _edits_sys_path(node: ast.AST) -> bool:
    """``sys.path.insert(...)`` and the like, ``sys.path = ...`` or ``monkeypatch.syspath_prepend``."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return ast.unparse(node.func.value) == "sys.path" or node.func.attr == "syspath_prepend"
    if isinstance(node, (ast.Assign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return any(ast.unparse(t) == "sys.path" for t in targets)
    return False


def test_no_test_edits_sys_path():
    """Tests load scripts through ``tests/scripts.py`` or run them as subprocesses."""
    edits = [f"{test.relative_to(ROOT)}:{node.lineno}"
             for test in sorted((ROOT / "tests").rglob("*.py"))
             for node in ast.walk(ast.parse(test.read_text(), filename=str(test)))
             if _edits_sys_path(node)]
    assert not edits, f"tests that edit sys.path: {edits}"
