"""The layering of docs/architecture.md, enforced: who may import whom.

Every import counts, including those under ``TYPE_CHECKING``: a reader has to hold a
module's imports in their head either way. A module imports only modules of its own layer
or of layers below, and no import circle exists anywhere in ``hub/``.
"""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: hub/'s layers, lowest first (docs/architecture.md draws the same).
LAYERS: list[tuple[str, set[str]]] = [
    ("protocol", {"hub.protocol"}),
    ("records", {"hub.model", "hub.config", "hub.logs"}),
    ("store", {"hub.store"}),
    (
        "parts",
        {
            "hub.bus",
            "hub.metrics",
            "hub.audit",
            "hub.budget",
            "hub.admission",
            "hub.auth",
            "hub.identity",
            "hub.registry",
            "hub.ledger_rules",
        },
    ),
    (
        "services",
        {
            "hub.ledger",
            "hub.alerts",
            "hub.fleet",
            "hub.gate",
            "hub.queries",
            "hub.cluster",
            "hub.probe",
        },
    ),
    ("sessions", {"hub.channel", "hub.agent_session", "hub.admin", "hub.server"}),
    ("wiring", {"hub.app", "hub.cluster_hub"}),
    ("programs", {"hub.cli", "hub.__main__", "hub.workers"}),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Modules of this repository that ``path`` imports (resolved, relative or not)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            # ``from . import x`` and ``from .store import sqlite`` may name modules.
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {m for m in found if m.split(".")[0] in ("hub", "agent", "console")}


def modules(package: str) -> dict[str, set[str]]:
    graph = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        graph[module_name(path)] = imports_of(path)
    return graph


def existing(graph: dict[str, set[str]], name: str) -> str | None:
    """The module a dotted name refers to (``hub.store.base.Store`` → ``hub.store.base``)."""
    while name:
        if name in graph:
            return name
        name = name.rpartition(".")[0]
    return None


def layer_of(name: str) -> int:
    for index, (_, members) in enumerate(LAYERS):
        if any(name == m or name.startswith(m + ".") for m in members):
            return index
    raise AssertionError(f"{name} belongs to no layer: add it to LAYERS and architecture.md")


def test_hub_has_no_import_circle() -> None:
    graph = modules("hub")
    edges = {
        name: {t for i in imported if (t := existing(graph, i)) and t != name and t != "hub"}
        for name, imported in graph.items()
    }
    try:
        tuple(TopologicalSorter(edges).static_order())
    except CycleError as exc:
        raise AssertionError(f"import circle in hub/: {' -> '.join(exc.args[1])}") from None


def test_each_hub_module_imports_only_its_layer_and_below() -> None:
    graph = modules("hub")
    wrong = set()
    for name, imported in graph.items():
        if name == "hub":
            continue
        mine = layer_of(name)
        for target in imported:
            resolved = existing(graph, target)
            if resolved is None or resolved in ("hub", name):
                continue
            if layer_of(resolved) > mine:
                wrong.add(
                    f"{name} ({LAYERS[mine][0]}) imports {resolved} "
                    f"({LAYERS[layer_of(resolved)][0]})"
                )
    assert not wrong, "\n".join(sorted(wrong))


def test_agent_and_console_use_only_the_protocol_of_the_hub() -> None:
    wrong = []
    for package in ("agent", "console"):
        for name, imported in modules(package).items():
            for target in imported:
                if target.startswith("hub") and not target.startswith("hub.protocol"):
                    wrong.append(f"{name} imports {target}")
            if package == "agent":
                wrong += [f"{name} imports {t}" for t in imported if t.startswith("console")]
    assert not wrong, "\n".join(wrong)
