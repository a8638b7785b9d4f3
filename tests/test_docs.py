"""The documentation stays a guide and stays true to the tree: the README is short, bench/README.md
names every committed benchmark result, no relative link in README.md or docs/*.md points to a file
that does not exist, and docs/statistics.md's worked example is what `python docs/worked_example.py`
computes from the committed demo (no number in it typed by hand). Text and numpy/scipy on committed
per-example files only; no model, no torch."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target) or [text](target "title")


def relative_links(path: Path) -> list[str]:
    """The link targets of a Markdown file that are paths in this repository (not URLs, not mail, not
    in-page anchors), with any #anchor dropped. Links inside fenced code blocks do not count."""
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    targets = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def test_the_readme_is_a_guide_of_at_most_320_lines():
    lines = len(README.read_text(encoding="utf-8").splitlines())
    assert lines <= 320, f"README.md has {lines} lines; move reference material into docs/"


def test_bench_readme_names_every_result_file():
    readme = (ROOT / "bench" / "README.md").read_text(encoding="utf-8")
    results = sorted(p for p in (ROOT / "bench" / "results").rglob("*") if p.is_file())
    assert results, "no files under bench/results/"
    names = [str(p.relative_to(ROOT / "bench" / "results")) for p in results]
    # named as a whole word: mfu_bf16_amx.json is not named by mfu_bf16_amx_batch64.json, nor x.json by vs_x.json
    missing = [n for n in names if not re.search(r"(?<![\w.-])" + re.escape(n) + r"(?![\w-])", readme)]
    assert not missing, f"bench/README.md does not name: {missing}"


@pytest.mark.parametrize("doc", [README, *DOCS, ROOT / "bench" / "README.md", ROOT / "results" / "README.md"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_files_that_exist(doc):
    broken = [t for t in relative_links(doc) if not (doc.parent / t).exists()]
    assert not broken, f"{doc.relative_to(ROOT)} links to missing files: {broken}"


def test_the_link_check_sees_links_and_skips_urls_anchors_and_code(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[a](docs/x.md#part) [b](https://example.org) [c](#here) [d](y.json \"title\")\n"
                    "```\n[e](not/a/link.md)\n```\n", encoding="utf-8")
    assert relative_links(page) == ["docs/x.md", "y.json"]


def test_the_statistics_worked_example_is_the_scripts_output():
    spec = importlib.util.spec_from_file_location("worked_example", ROOT / "docs" / "worked_example.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    doc = (ROOT / "docs" / "statistics.md").read_text(encoding="utf-8")
    generated = script.worked_example()
    assert script.doc_block(doc) == generated, "run `python docs/worked_example.py --write`"
    # and its finding is the committed report's, computed again
    report = (ROOT / "results" / "demo" / "report" / "report.md").read_text(encoding="utf-8")
    finding = report.split("## Finding\n\n")[1].splitlines()[0]
    assert f'*"{finding}"*' in generated
