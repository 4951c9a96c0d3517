"""The package layering of HOUSE_STYLE: node -> scp, analysis, reports, storage; scp -> storage;
reports -> storage; analysis and storage import nothing else of ours. Every import statement is read
(module level and inside functions), so a lazy upward import is caught too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = {"node", "scp", "analysis", "reports", "storage"}
ALLOWED = {
    "scp": {"scp", "storage"},
    "reports": {"reports", "storage"},
    "analysis": {"analysis"},
    "storage": {"storage"},
}


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import of one of our packages in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, n.split(".")[0]) for n in names if n.split(".")[0] in OURS]
    return found


def test_reader_sees_function_level_imports(tmp_path):
    p = tmp_path / "m.py"
    p.write_text("import os\n\ndef f():\n    from node.cli import main\n    import storage.db\n")
    assert imported_packages(p) == [(4, "node"), (5, "storage")]


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_one_way(package):
    bad = [f"{f.relative_to(ROOT)}:{line} imports {pkg}"
           for f in sorted((ROOT / package).rglob("*.py"))
           for line, pkg in imported_packages(f) if pkg not in ALLOWED[package]]
    assert not bad, "upward imports (see HOUSE_STYLE layout):\n" + "\n".join(bad)
