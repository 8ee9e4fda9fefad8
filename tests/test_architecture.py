"""The seams hold by construction: the module-level import graph has no cycle, operations know
nothing of click, and formats import no other format's private names."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"surgeon": ROOT / "surgeon", "surgeon.formats": ROOT / "formats"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for file in folder.rglob("*.py"):
            parts = file.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = file
    return found


def module_level_imports(file: Path, name: str, known: set[str]) -> set[str]:
    """The surgeon modules a module imports when it is imported (not inside functions)."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.parse(file.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            submodules = {f"{base}.{alias.name}" for alias in node.names} & known
            found |= submodules or {base}  # `from package import module` imports the module, not a cycle
    return {m for m in found if m in known and m != name}


def test_module_level_import_graph_has_no_cycle():
    found = modules()
    graph = {name: module_level_imports(file, name, set(found)) for name, file in found.items()}
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in graph[name]:
            assert state.get(target) != 1, f"import cycle: {' -> '.join([*path, name, target])}"
            if target not in state:
                visit(target, [*path, name])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def imported_names(file: Path) -> set[str]:
    """Every module a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def test_only_the_cli_knows_click():
    for name, file in modules().items():
        if not name.startswith("surgeon.cli"):
            assert not any(m.split(".")[0] == "click" for m in imported_names(file)), f"{name} imports click"


def test_formats_import_no_private_name_of_another_format():
    for name, file in modules().items():
        if not name.startswith("surgeon.formats"):
            continue
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("surgeon.formats"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{name} imports {private} from {node.module}"
