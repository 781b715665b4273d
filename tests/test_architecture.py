"""The package structure as a specification: no import cycles between budwood's packages, and every
import goes down the layers that docs/architecture.md draws (stages never import the HTTP surfaces or
the CLI; the database package imports neither the registry nor the service)."""
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "architecture_report.py"


def _report():
    spec = importlib.util.spec_from_file_location("architecture_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_cycles_between_packages():
    report = _report()
    assert report.cycles(report.package_graph()) == []


def test_every_import_goes_down_the_layers():
    report = _report()
    assert report.layering_violations(report.package_graph()) == []


def test_the_checker_sees_a_cycle_and_an_upward_import():
    report = _report()
    graph = {"serve": {"engine"}, "engine": {"serve"}, "db": {"registry"}, "registry": {"db"}}
    assert sorted(map(tuple, report.cycles(graph))) == [("db", "registry"), ("engine", "serve")]
    assert "engine imports serve (layer 4 -> 11: only lower layers)" in report.layering_violations(graph)
    assert "db imports registry (layer 1 -> 9: only lower layers)" in report.layering_violations(graph)
