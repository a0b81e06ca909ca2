"""The shared package's layers (steps/common): its modules import each other one way (absolute `common.` imports),
with no cycles (imports inside functions count too), and each part reaches only the parts below it:

    common (errors, options, models, precision, rubric)  <-  io  <-  generation | training | reporting
    training -> reporting (the adapters' model cards); never training <-> generation, never reporting -> generation
"""

import ast
from pathlib import Path

COMMON = Path(__file__).resolve().parents[1] / "steps" / "common"
# What each part may reach; "base" is the package's own top-level modules.
ALLOWED = {"base": {"base"}, "io": {"base", "io"}, "generation": {"base", "io", "generation"},
           "training": {"base", "io", "training", "reporting"}, "reporting": {"base", "io", "reporting"}}
ENGINE = {"common.generation.engines", "common.generation.fastgen", "common.generation.decode_kernel",
          "common.generation.eval_engine"}


def module_name(path):
    parts = path.relative_to(COMMON.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in COMMON.rglob("*.py")}


def imports_of(path):
    """The common modules a module imports anywhere in it (`from common.x import y`, `from common.x import module`),
    and whether it uses a relative import."""
    found, relative = set(), False
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            relative = True
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "common":
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "common")
    return found, relative


GRAPH = {name: imports_of(path)[0] - {name} for name, path in MODULES.items()}


def part(name):
    """The subpackage a module lives in (common.io.jsonl and common.io: "io"), or "base" for the modules directly in
    common/: a new subpackage is a part of its own, which ALLOWED must then name."""
    folder = MODULES[name].parent
    return "base" if folder == COMMON else folder.name


def reach(module, graph=GRAPH):
    seen, todo = set(), [module]
    while todo:
        for m in graph.get(todo.pop(), ()):
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def cycles(graph):
    return sorted(m for m in graph if m in reach(m, graph))


def crossings(graph):
    """(module, imported) pairs where a part reaches a part it may not."""
    return sorted((m, i) for m, imported in graph.items() for i in imported
                  if part(i) not in ALLOWED[part(m)] and i != "common")


def test_the_package_has_the_four_parts_and_every_module_imports_absolutely():
    assert {part(m) for m in MODULES} == set(ALLOWED)
    assert [name for name, path in MODULES.items() if imports_of(path)[1]] == []


def test_no_module_of_common_imports_itself_through_others():
    assert cycles(GRAPH) == []


def test_each_part_reaches_only_the_parts_below_it():
    assert crossings(GRAPH) == []
    assert not any(reach(m) & ENGINE for m in MODULES if part(m) in ("training", "reporting", "io", "base"))


def test_recipes_and_sampling_load_without_an_engine():
    assert reach("common.generation.recipes") & ENGINE == set()
    assert reach("common.generation.sampling") <= {"common"}


def test_a_cycle_and_a_crossing_are_found():
    """The controls: a cycle through a function-level import, and training reaching the engine, are reported."""
    graph = {**GRAPH, "common.generation.fastgen": GRAPH["common.generation.fastgen"] | {"common.generation.engines"},
             "common.training.varlen": GRAPH["common.training.varlen"] | {"common.generation.fastgen"}}
    assert {"common.generation.fastgen", "common.generation.engines"} <= set(cycles(graph))
    assert ("common.training.varlen", "common.generation.fastgen") in crossings(graph)
