"""docs/statistics.md's worked example is what `python docs/worked_example.py` computes from the
committed demo (results/demo): no number in it is typed by hand. Pure numpy/scipy on committed
per-example files: no model, no precision involved."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_script():
    spec = importlib.util.spec_from_file_location("worked_example", ROOT / "docs" / "worked_example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_worked_example_is_the_scripts_output():
    script = load_script()
    doc = (ROOT / "docs" / "statistics.md").read_text(encoding="utf-8")
    generated = script.worked_example()
    assert script.doc_block(doc) == generated, "run `python docs/worked_example.py --write`"
    # and it is the committed report's finding, computed again
    report = (ROOT / "results" / "demo" / "report" / "report.md").read_text(encoding="utf-8")
    finding = report.split("## Finding\n\n")[1].splitlines()[0]
    assert f'*"{finding}"*' in generated
