"""The package's import graph: no circle between modules, every import between concerns points
downward (tests/layering.py holds the layers)."""
from layering import concern_graph, cycles, graph, violations


def test_no_import_circle():
    assert cycles(graph()) == []


def test_imports_point_downward():
    assert violations(graph()) == []


def test_the_check_sees_a_circle():
    # The checker itself must be able to fail: a made-up graph with a circle and an upward import.
    g = {"dhumor.model.a": {"dhumor.inference.b"}, "dhumor.inference.b": {"dhumor.model.a"}}
    assert cycles(g) == [["dhumor.inference.b", "dhumor.model.a"]]
    assert any("may not import" in v for v in violations(g))
    assert concern_graph(g) == {"model": {"inference"}, "inference": {"model"}}
