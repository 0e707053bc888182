"""The import contracts of the tree (docs/architecture.md), read from the source with grimp.

For cycles and subsystem boundaries every import counts, including those inside functions and
under ``TYPE_CHECKING``: a lazy or type-only import is still a dependency a reader follows. For
"serve never imports torch" the type-only imports are left out (they never run), but imports
inside functions count: a function serve may call must not reach the ML stack.
"""

from __future__ import annotations

import grimp
import pytest

from patchd.daemon import COMPONENTS

SUBSYSTEMS = ("api", "ingest", "store", "monitor", "runs", "promotion", "notify", "ui")
# what other parts of patchd may import of each subsystem (the composition root, patchd.daemon,
# may import anything: it is what wires the subsystems together)
PUBLIC = {
    "api": {"auth", "client"},
    "ingest": {"records", "pipeline", "tailer"},
    "store": {"backend", "db", "predictions", "blobs", "pg_local"},
    "monitor": {"engine", "window", "component", "estimate", "sequential", "mined"},
    "runs": {"artifacts", "component", "jobqueue", "recipe", "records", "regions"},
    "promotion": {"audit", "component", "registry"},
    "notify": {"component"},
    "ui": {"component"},
}
HEAVY = ("torch", "torchvision", "diffusers", "sklearn", "open_clip", "transformers")
ML_PLUGINS = tuple(f"patchd.plugins.{kind}" for kind in ("miners", "augmenters", "trainers"))
SERVE_FORBIDDEN = (*HEAVY, "patchd.workers", "patchd.ml", *ML_PLUGINS, "patchd.plugins.datasets")
CAPTURE_PLUGINS = ("patchd.plugins.sources", "patchd.plugins.serving")


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("patchd", include_external_packages=True)


@pytest.fixture(scope="module")
def runtime_graph() -> grimp.ImportGraph:
    """Imports that execute: those under ``if TYPE_CHECKING`` are left out."""
    return grimp.build_graph(
        "patchd", include_external_packages=True, exclude_type_checking_imports=True
    )


def internal(graph: grimp.ImportGraph) -> set[str]:
    return {m for m in graph.modules if m == "patchd" or m.startswith("patchd.")}


def cycles(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root) & modules)))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        component.append(top)
                        if top == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                imported = graph.find_modules_directly_imported_by(child) & modules
                work.append((child, iter(sorted(imported))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_no_import_cycles(graph: grimp.ImportGraph) -> None:
    assert cycles(graph, internal(graph)) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = grimp.build_graph("patchd")
    graph.add_import(importer="patchd.store.db", imported="patchd.daemon")
    found = cycles(graph, internal(graph))
    assert any("patchd.daemon" in c and "patchd.store.db" in c for c in found)


def _chain(graph: grimp.ImportGraph, importer: str, forbidden: str) -> tuple[str, ...] | None:
    modules = {forbidden} if forbidden in graph.modules else set()
    modules |= {m for m in graph.modules if m.startswith(forbidden + ".")}
    for target in sorted(modules):
        chain = graph.find_shortest_chain(importer=importer, imported=target)
        if chain:
            return chain
    return None


def serve_roots() -> list[str]:
    return ["patchd.daemon", "patchd.cli.serve", *(c.partition(":")[0] for c in COMPONENTS)]


@pytest.mark.parametrize("forbidden", SERVE_FORBIDDEN)
def test_serve_never_imports_torch_workers_or_ml_plugins(
    runtime_graph: grimp.ImportGraph, forbidden: str
) -> None:
    for root in serve_roots():
        chain = _chain(runtime_graph, root, forbidden)
        assert chain is None, f"{root} reaches {forbidden}"


@pytest.mark.parametrize("capture", CAPTURE_PLUGINS)
def test_capture_plugins_never_import_ml_plugins_or_workers(
    runtime_graph: grimp.ImportGraph, capture: str
) -> None:
    graph = runtime_graph
    importers = [m for m in graph.modules if m == capture or m.startswith(capture + ".")]
    for importer in importers:
        for forbidden in (*ML_PLUGINS, "patchd.workers", "patchd.plugins.datasets"):
            assert _chain(graph, importer, forbidden) is None, f"{importer} reaches {forbidden}"


def test_the_contract_sees_a_lazy_import_of_torch() -> None:
    graph = grimp.build_graph(
        "patchd", include_external_packages=True, exclude_type_checking_imports=True
    )
    graph.add_import(importer="patchd.promotion.gate", imported="torch")
    assert _chain(graph, "patchd.promotion.component", "torch") is not None


def _subsystem(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in SUBSYSTEMS else None


def test_subsystems_are_imported_only_through_their_public_modules(
    graph: grimp.ImportGraph,
) -> None:
    bad = []
    for importer in sorted(internal(graph)):
        if importer == "patchd.daemon":
            continue
        for imported in graph.find_modules_directly_imported_by(importer):
            owner = _subsystem(imported)
            if owner is None or owner == _subsystem(importer) or imported == f"patchd.{owner}":
                continue
            if imported.split(".")[2] not in PUBLIC[owner]:
                bad.append(f"{importer} -> {imported}")
    assert bad == []


def test_top_level_of_patchd_stays_small(graph: grimp.ImportGraph) -> None:
    top = [m for m in internal(graph) if m.count(".") == 1 and not graph.find_children(m)]
    assert len(top) <= 12, sorted(top)
