"""The import rule of README "Layout" and docs/architecture.md: cli/ -> service/ -> (model/,
index/), and model/ reads index/ in one place only (a published version takes over the item
edits its predecessor's index recorded)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
# (importer package, imported package) -> the modules allowed to, with what they import
ALLOWED = {("model", "index"): {"model/checkpoint_meta.py": {"index.persist", "index.journal"}}}
FORBIDDEN = {"model": {"service", "cli", "index"}, "index": {"model", "service", "cli"}, "service": {"cli"}}


def imports(path: Path) -> set[str]:
    """Every module an import statement in `path` names, at any depth (lazy imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_imports_go_one_way():
    broken = []
    for package, forbidden in FORBIDDEN.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for name in sorted(imports(path)):
                top = name.split(".")[0]
                if top not in forbidden:
                    continue
                if name in ALLOWED.get((package, top), {}).get(rel, set()):
                    continue
                broken.append(f"{rel} imports {name}")
    assert not broken, broken


def test_the_one_exception_is_still_there():
    """An allowance nothing uses any more is a rule the docs describe wrongly."""
    for modules in ALLOWED.values():
        for rel, names in modules.items():
            assert names <= imports(ROOT / rel), f"{rel} no longer imports {names}: update ALLOWED, docs"


def test_the_architecture_maps_name_every_command_of_r2ec():
    """docs/architecture.md's text map and its module table list the `r2ec` commands; the text
    map lacked `recommend` and `user` (journey 40, F9)."""
    import re

    from typer.main import get_command

    from cli import app

    commands = set(get_command(app).commands)
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    text_map = re.search(r"one module per command group\n[ │]+\(([^)]*)\)", doc)
    table = re.search(r"\| `cli/` \| the `r2ec` command, one module per group \(([^)]*)\) \|", doc)
    assert text_map and table
    assert set(text_map[1].split(", ")) == commands
    assert set(table[1].replace("`", "").split(", ")) == commands
