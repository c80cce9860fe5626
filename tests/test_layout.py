"""The package layout holds: no import cycles between deita_ray's modules, sibling stages never import
each other (what two stages share lives in engines/, ingest/ or runtime/), and the runtime never imports
the testing helpers."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "deita_ray"
STAGE_PACKAGES = ("scoring", "embedding", "selection")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """module → the deita_ray modules it imports (anywhere in the file, functions included)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("deita_ray"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("deita_ray"))
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_no_import_cycles() -> None:
    graph = imports()
    # A package's __init__ importing its own submodules is how packages re-export; not a cycle.
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " → ".join(stack[stack.index(target):] + [target]))
            if target not in state:
                visit(target, stack + [target])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_sibling_stages_do_not_import_each_other() -> None:
    for module, targets in imports().items():
        parts = module.split(".")
        if len(parts) < 2 or parts[1] not in STAGE_PACKAGES:
            continue
        others = [t for t in targets if t.split(".")[1:2] != parts[1:2] and t.split(".")[1] in STAGE_PACKAGES]
        assert not others, f"{module} imports {others}"
