"""The package reads top-down: math, then distribution, then runs, then the command line.
Checked on the source (every import statement, lazy ones inside functions included, type-
checking-only ones excepted)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "gppq_dist"


def runtime_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import a module can run, ``from m import a`` also as ``m.a``."""
    tree = ast.parse(path.read_text())
    type_only = {id(node) for block in ast.walk(tree) if isinstance(block, ast.If)
                 and "TYPE_CHECKING" in ast.unparse(block.test) for node in ast.walk(block)}
    found = []
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def offenders(modules: list[Path], banned: str) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line}" for path in modules for line, name in runtime_imports(path)
            if name == banned or name.startswith(banned + ".")]


def test_only_the_gateway_imports_torch_distributed():
    """Every collective goes through gppq_dist/distributed.py, where tensors are put on the
    process's device; a second door would bypass that."""
    modules = [p for p in sorted(PACKAGE.rglob("*.py")) if p != PACKAGE / "distributed.py"]
    assert not offenders(modules, "torch.distributed")


def test_the_math_knows_no_process_group():
    """gppq_dist/pq/ is handed a Reducer; it imports the distributed module for its type only."""
    assert not offenders(sorted((PACKAGE / "pq").rglob("*.py")), "gppq_dist.distributed")


def test_nothing_in_the_package_imports_the_command_line():
    """torchrun's entries (python -m gppq_dist.train / .compress) run gppq_dist.commands, not
    the CLI; the library never reaches up into it. docs.py sits above the CLI: it writes the
    README's command table from it (make docs), and nothing imports docs.py."""
    above = {PACKAGE / "cli.py", PACKAGE / "docs.py"}
    modules = [p for p in sorted(PACKAGE.rglob("*.py")) if p not in above]
    assert not offenders(modules, "gppq_dist.cli")
    assert not offenders(modules, "gppq_dist.docs")
