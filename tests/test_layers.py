"""The import floors hold: stages are library code, importing neither the command line nor the demo."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fastgpt"
STAGES = sorted((PACKAGE / "stages").glob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports, at the top or inside functions."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module.rsplit(".", 1)[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[:len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            names.add(name)
            names.update(f"{name}.{a.name}" for a in node.names)  # `from .. import cli`
    return names


def test_the_import_walker_sees_relative_and_nested_imports(tmp_path):
    fake = PACKAGE / "stages" / "_probe_for_test.py"
    fake.write_text("from ..cli import main\nfrom .. import demo\ndef f():\n    import fastgpt.commands.train\n")
    try:
        names = imported_modules(fake)
    finally:
        fake.unlink()
    assert {"fastgpt.cli", "fastgpt.demo", "fastgpt.commands.train"} <= names


@pytest.mark.parametrize("path", STAGES, ids=lambda p: p.name)
def test_stages_import_neither_the_cli_nor_the_demo(path):
    assert STAGES and path.name in {p.name for p in STAGES}
    forbidden = [n for n in imported_modules(path)
                 if n.split(".")[:2] in (["fastgpt", "cli"], ["fastgpt", "commands"], ["fastgpt", "demo"])]
    assert not forbidden, f"{path.name} imports {forbidden}"
