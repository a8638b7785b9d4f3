"""The package's shape (issues 16 and 39): no import cycles inside src/postlab, lazy imports included
(TYPE_CHECKING blocks aside), no module much over 400 lines, and one home for each concept that had
none: the stage (postlab/stage.py) and the analysis (postlab/report/)."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
MODULES = {".".join(f.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"): f
           for f in (SRC / "postlab").rglob("*.py")}


def imports(name: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    typing_only = {id(n) for node in ast.walk(tree)
                   if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            submodules = {f"{target}.{a.name}" for a in node.names} & set(MODULES)
            # `from . import results` needs the submodule, not the package's own names: a module that
            # imports a sibling this way does not depend on its package's __init__
            named = len(submodules) < len(node.names) or node.module is not None
            out |= submodules | ({target} & set(MODULES) if named else set())
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in MODULES}
    return out - {name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    graph = {name: imports(name, path) for name, path in MODULES.items()}
    assert sum(map(len, graph.values())) > 50  # the scan sees the package's imports
    assert cycles(graph) == []


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_is_much_over_400_lines():
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert max(sizes.values()) <= 420, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


def defined_at_top(path: Path) -> set[str]:
    return {n.name for n in ast.parse(path.read_text()).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def test_the_stage_has_one_home():
    """Its plan, data, preparation, reuse and training run are defined in postlab.stage and nowhere
    else (its reuse key is RunConfig.stage_key: the planner computes it without torch); the run
    (postlab.run) imports them."""
    concepts = {"StagePlan", "StageInputs", "stage_items", "stage_inputs", "pairs_with_signal", "register_stage",
                "reuse_stage", "run_stage", "stage_dir"}
    assert concepts <= defined_at_top(MODULES["postlab.stage"])
    elsewhere = {name: sorted(concepts & defined_at_top(path)) for name, path in MODULES.items()
                 if name != "postlab.stage"}
    assert {k: v for k, v in elsewhere.items() if v} == {}
    assert "postlab.stage" in imports("postlab.run", MODULES["postlab.run"])


def test_the_analysis_has_one_home():
    """The report's modules live in postlab/report/ (none left at the package root); the planner's
    cost estimate lives with the study; `postlab.report` still names the public entry points."""
    analysis = {"results", "comparisons", "paired", "power", "stats", "plots", "writer"}
    assert {f"postlab.report.{m}" for m in analysis} <= set(MODULES)
    assert not {f"postlab.{m}" for m in analysis | {"estimate", "footprint"}} & set(MODULES)
    assert {"postlab.study.estimate", "postlab.study.footprint"} <= set(MODULES)
    import postlab.report as report

    assert all(callable(getattr(report, name)) for name in report.__all__)
