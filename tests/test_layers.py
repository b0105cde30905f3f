"""The package's layers hold: import-linter's contracts (pyproject.toml) are kept and a
broken one fails `make lint`; aiohttp's server lives only in `neuronctl.api`; the modules
that must start fast load no aiohttp."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "neuronctl"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
SUBPACKAGES = ("models", "supervisor", "api", "node", "cli", "fleet")

needs_import_linter = pytest.mark.skipif(
    not LINT_IMPORTS.exists(), reason="import-linter is not installed (the test extra)")


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=root, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(root),
                                                       "PATH": "/usr/bin:/bin"})


@needs_import_linter
def test_the_contracts_are_kept() -> None:
    result = _lint_imports(REPO)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "0 broken" in result.stdout


@needs_import_linter
def test_an_import_from_the_cli_into_the_daemon_side_breaks_lint(tmp_path: Path) -> None:
    shutil.copytree(PACKAGE, tmp_path / "neuronctl",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    formats = tmp_path / "neuronctl" / "cli" / "formats.py"
    formats.write_text(formats.read_text() + "\nfrom ..supervisor import registry  # noqa\n")
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert "neuronctl.cli is not allowed to import neuronctl.supervisor" in result.stdout


def _imports_aiohttp_web(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (
                node.module == "aiohttp.web"
                or (node.module == "aiohttp" and any(a.name == "web" for a in node.names))):
            return True
        if isinstance(node, ast.Import) and any(a.name.startswith("aiohttp.web")
                                                for a in node.names):
            return True
    return False


def test_aiohttp_server_only_in_the_http_layer() -> None:
    outside = [str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py")
               if _imports_aiohttp_web(p) and p.parent.name != "api"]
    assert outside == []


def test_every_subpackage_says_what_it_may_import_and_imports_nothing() -> None:
    for name in SUBPACKAGES:
        init = PACKAGE / name / "__init__.py"
        tree = ast.parse(init.read_text())
        doc = ast.get_docstring(tree)
        assert doc and "import" in doc, name  # its rule, in words
        assert not [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)], name


@pytest.mark.parametrize("module", [
    "neuronctl.main", "neuronctl.node.start", "neuronctl.cli.app", "neuronctl.models.gguf",
])
def test_what_must_start_fast_loads_no_aiohttp(module: str) -> None:
    probe = (f"import sys, {module}\n"
             "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'aiohttp')\n"
             "print(loaded)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"{module} loads {result.stdout.strip()}"


def test_the_gguf_child_runs_alone() -> None:
    """models/gguf.py runs in a child by path, with -I -S: it needs nothing of neuronctl."""
    imported = {n.module.split(".")[0] if n.module else "." for n in
                ast.walk(ast.parse((PACKAGE / "models" / "gguf.py").read_text()))
                if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module}
    relative = [n for n in ast.walk(ast.parse((PACKAGE / "models" / "gguf.py").read_text()))
                if isinstance(n, ast.ImportFrom) and n.level > 0]
    assert "neuronctl" not in imported and relative == []
