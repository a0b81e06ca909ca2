"""The shared package's layers: no import cycles among steps/common's modules (imports inside functions count too),
training never reaches the inference engine, and recipes and sampling settings load without an engine."""

import ast
from pathlib import Path

COMMON = Path(__file__).resolve().parents[1] / "steps" / "common"
ENGINE = {"generation", "fastgen", "decode_kernel", "eval_engine"}


def imports_of(path):
    """The steps/common modules a module imports, anywhere in it (relative imports: `from . import x`, `from .x`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(a.name for a in node.names if (COMMON / f"{a.name}.py").exists())
    return found


GRAPH = {p.stem: imports_of(p) for p in COMMON.glob("*.py") if p.stem != "__init__"}


def reach(module):
    seen, todo = set(), [module]
    while todo:
        for m in GRAPH.get(todo.pop(), ()):
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def test_no_module_of_common_imports_itself_through_others():
    assert [m for m in GRAPH if m in reach(m)] == []


def test_training_never_reaches_the_inference_engine():
    assert reach("training") & ENGINE == set() and reach("varlen") & ENGINE == set()


def test_recipes_and_sampling_load_without_an_engine():
    assert reach("recipes") & ENGINE == set() and reach("sampling") == set()


def test_a_cycle_is_found(monkeypatch):
    """The control: a graph with a cycle through a function-level import is reported."""
    monkeypatch.setitem(GRAPH, "fastgen", GRAPH["fastgen"] | {"generation"})
    monkeypatch.setitem(GRAPH, "generation", GRAPH["generation"] | {"fastgen"})
    assert {"fastgen", "generation"} <= {m for m in GRAPH if m in reach(m)}
