"""The import graph of rlp_cli: cli.py imports the command modules, and nothing imports cli.py back.

Every import statement counts, function-level ones included (ast, so nothing is imported to check).
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "rlp_cli"


def import_graph() -> dict[str, set[str]]:
    mods = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = ".".join(anchor[:len(anchor) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges[name].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module."""
    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in edges[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    reachable = {m: reach(m) for m in edges}
    found = []
    for m in edges:
        comp = {m} | {o for o in reachable[m] if m in reachable[o]}
        if len(comp) > 1 and comp not in found:
            found.append(comp)
    return found


def test_nothing_imports_the_cli_back():
    edges = import_graph()
    assert "rlp_cli.ablate" in edges["rlp_cli.cli"]  # the graph sees function-level imports
    assert [m for m, targets in edges.items() if "rlp_cli.cli" in targets] == []


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph()) == []
