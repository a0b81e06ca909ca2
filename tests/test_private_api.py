"""Library internals stay where they are declared: a module of steps/ or bench/ that uses a private name of another
library (an attribute `_name` the project does not define itself, or a module listed in INTERNAL_MODULES) names it
in its docstring's "Library internals" paragraph, with the versions it was measured on; so does one that reads another
module's underscore attribute (the project's own included: ask the object through its interface). Any other use
fails here."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*ROOT.glob("steps/**/*.py"), *ROOT.glob("bench/**/*.py")])
# Public-looking modules that hold a library's internals (no underscore in their name, no stability promise).
INTERNAL_MODULES = {"accelerate.utils.other", "transformers.masking_utils", "transformers.integrations.sdpa_attention"}
HEADING = re.compile(r"Library internals \(([^)]*\d[^)]*)\)")  # "Library internals (transformers 5.17, ...):"


def private(name):
    return name.startswith("_") and not name.startswith("__")


def defined_by_the_project(trees):
    """Every underscore name the project defines itself: functions, classes, variables, attributes it assigns."""
    names = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
                  and isinstance(node.value, ast.Name) and node.value.id == "self"):
                names.add(node.attr)  # set on another library's object, an underscore name is still its private
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
    return {n for n in names if private(n)}


def from_super(node):
    """`super()._name`: a base class's private method, even where the project overrides it."""
    call = node.value
    return isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "super"


def internals_used(tree, ours):
    """The library-private attributes and internal modules a module's code reaches."""
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr) and (node.attr not in ours or from_super(node)):
            used.add(node.attr)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in INTERNAL_MODULES or any(private(part) for part in node.module.split(".")):
                used.add(node.module)
            used.update(a.name for a in node.names if private(a.name) and a.name not in ours)
        elif isinstance(node, ast.Import):
            used.update(a.name for a in node.names
                        if a.name in INTERNAL_MODULES or any(private(p) for p in a.name.split(".")))
    return used


def declared(docstring):
    """The paragraph of a module docstring that names its library internals (empty where there is none)."""
    match = HEADING.search(docstring or "")
    if not match:
        return ""
    return docstring[match.start():].split("\n\n")[0]


def reached_across(tree):
    """Underscore attributes this module reads on another object (not self or cls) that it does not define: another
    module's private state, even the project's own."""
    here = defined_by_the_project([tree])
    return {node.attr for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and private(node.attr) and node.attr not in here
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))}


def undeclared_uses(sources, root=ROOT):
    """{module: [internals its docstring does not declare]}; the project's own names come from `sources`."""
    trees = {path: ast.parse(path.read_text(), str(path)) for path in sources}
    ours = defined_by_the_project(trees.values())
    found = {}
    for path, tree in trees.items():
        paragraph = declared(ast.get_docstring(tree))
        used = internals_used(tree, ours) | reached_across(tree)
        missing = sorted(name for name in used if name not in paragraph)
        if missing:
            found[str(path.relative_to(root))] = missing
    return found


def test_library_internals_are_used_only_where_a_docstring_declares_them():
    assert undeclared_uses(SOURCES) == {}


def test_an_undeclared_private_name_is_found(tmp_path):
    """The control: a module reaching a library's private attribute or internal module without declaring it is
    reported; declared, it is not; an underscore name the project defines itself is its own."""
    (tmp_path / "quiet.py").write_text('"""A step."""\nimport torch\nx = torch._dynamo\n')
    (tmp_path / "told.py").write_text(
        '"""A step.\n\nLibrary internals (torch 2.11): `torch._dynamo`, to reset it.\n"""\n'
        "import torch\nfrom accelerate.utils.other import thing\nx = torch._dynamo\n")
    (tmp_path / "own.py").write_text('"""A step."""\nclass A:\n    def _mine(self):\n        return self._mine\n')
    (tmp_path / "peek.py").write_text('"""A step."""\ndef look(engine):\n    return engine._mine\n')
    (tmp_path / "base.py").write_text('"""A step."""\nclass T(Trainer):\n    def _sampler(self):\n'
                                      "        return super()._sampler()\nmodule._hook = None\n")
    found = undeclared_uses(sorted(tmp_path.glob("*.py")), root=tmp_path)
    assert found == {"quiet.py": ["_dynamo"], "told.py": ["accelerate.utils.other"], "base.py": ["_hook", "_sampler"],
                     "peek.py": ["_mine"]}
