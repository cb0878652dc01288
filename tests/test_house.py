"""The house rules of the import structure, read from the source by ``scripts/import_graph.py`` (which prints
the whole picture): no module cycle (beyond the one the design names), the engine imports no method family,
and every internal import inside a function body has a stated reason."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "import_graph.py"
_spec = importlib.util.spec_from_file_location("import_graph", SCRIPT)
graph_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(graph_tool)

KNOWN = graph_tool.modules()
GRAPH, LATE = graph_tool.imports(KNOWN)


def test_the_reader_sees_the_package():
    assert "peftkit.tuner" in KNOWN and "peftkit.methods.lora.layer" in KNOWN
    assert "peftkit.layers" in GRAPH["peftkit.tuner"]  # a module-level import is an edge
    assert ("peftkit.registry", "peftkit.methods") in {(m, t) for m, t, _ in LATE}  # and a late one is listed


def test_no_import_cycle():
    assert [c for c in graph_tool.cycles(GRAPH) if c not in graph_tool.ALLOWED_CYCLES] == []


def test_no_cycle_closed_by_a_late_import():
    with_late = {m: set(ts) for m, ts in GRAPH.items()}
    for m, t, _ in LATE:
        with_late[m].add(t)
    assert [c for c in graph_tool.cycles(with_late) if c not in graph_tool.ALLOWED_CYCLES] == []


def test_the_engine_imports_no_method_family():
    assert graph_tool.engine_to_methods(GRAPH) == []


def test_every_late_import_has_a_reason():
    assert graph_tool.unexplained_late(LATE) == []


def test_cycle_finder_finds_a_cycle():
    assert graph_tool.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_suites_spread_over_workers_have_no_module_fixtures():
    """``make test`` hands the cases of these files to both workers (tests/conftest.py): a module- or
    session-scoped fixture would be built on each and could be torn down and rebuilt between cases."""
    from .conftest import SPREAD

    tests = Path(__file__).resolve().parent
    for name in SPREAD:
        assert "scope=" not in (tests / name).read_text(), name
