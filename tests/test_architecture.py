"""The house plan, checked: import layers, one source root per component, module size.

docs/architecture.md describes the layers; pyproject.toml's [tool.importlinter]
holds the contracts that `lint-imports` checks here.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = ("core", "policy", "serve", "feedback", "learner", "cluster", "cli")
SOURCE_ROOTS = COMPONENTS + ("testkit",)
MAX_MODULE_LINES = 500


def _modules() -> list[Path]:
    return sorted(p for root in SOURCE_ROOTS for p in (ROOT / root / "banditroute").rglob("*.py"))


def test_import_contracts_hold():
    # In a subprocess: import-linter builds the import graph of the installed packages from scratch.
    run = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
                          "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True))"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "BROKEN" not in run.stdout


@pytest.mark.parametrize("component", SOURCE_ROOTS)
def test_each_component_is_one_source_root_of_the_namespace(component):
    package = ROOT / component / "banditroute"
    assert (package / component / "__init__.py").is_file()
    assert not (package / "__init__.py").exists(), "banditroute is a PEP 420 namespace: no banditroute/__init__.py"
    assert sorted(p.name for p in package.iterdir() if p.name != "__pycache__") == [component]
    spec = importlib.util.find_spec(f"banditroute.{component}")
    assert spec is not None and Path(spec.origin).resolve() == (package / component / "__init__.py").resolve()


def test_tests_and_bench_are_not_packages():
    for folder in ("tests", "bench"):
        assert not (ROOT / folder / "__init__.py").exists()
        assert importlib.util.find_spec(f"banditroute.{folder}") is None


def test_no_import_path_manipulation():
    offenders = []
    for path in _modules() + sorted((ROOT / "bench").glob("*.py")) + sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if (node.value.id, node.attr) == ("sys", "path") or node.attr == "__path__":
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == [], "imports must resolve through the installed source roots, not sys.path/__path__ edits"


def test_bench_never_imports_tests():
    for path in sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "tests" or n.startswith("tests.") or n == "conftest" for n in names), path.name


def test_no_module_is_over_the_size_limit():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in _modules()}
    too_big = {name: lines for name, lines in sizes.items() if lines > MAX_MODULE_LINES}
    assert too_big == {}, f"split these modules (limit {MAX_MODULE_LINES} lines): {too_big}"
