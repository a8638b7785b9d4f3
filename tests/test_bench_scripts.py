"""The benchmark scripts import against the current package (a moved function broke one unnoticed)
and show their usage; they are not run here (they time the real model)."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.parametrize("script", sorted(p.stem for p in BENCH.glob("*.py")))
def test_a_benchmark_script_imports(script, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    module = importlib.import_module(script)
    assert module.__doc__, f"bench/{script}.py says what it measures and how to run it"
    sys.modules.pop(script, None)
