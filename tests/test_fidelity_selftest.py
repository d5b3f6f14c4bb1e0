"""bench/fidelity's self-test: the selection attention, and the speculation recall meter agreeing with
the selections hetero's speculative mode makes (a few seconds on a CPU)."""

import sys
from pathlib import Path

import pytest

FIDELITY = Path(__file__).resolve().parents[1] / "bench" / "fidelity"


MODULES = ("selftest", "selection", "spec_recall", "settings")  # bench/fidelity's, imported by their plain names


@pytest.fixture
def fidelity_path(monkeypatch):
    for name in MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(FIDELITY))
    yield
    for name in MODULES:
        sys.modules.pop(name, None)


def test_fidelity_selftest(fidelity_path):
    import selftest

    selftest.main()
