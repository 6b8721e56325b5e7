"""The house rules of ``utils/``: sub-packages in layers, no import circle, short modules, small folders.

Every import counts, at module level or inside a function: a lazy import is still a dependency.
"""

import ast
import os

import pytest

from ..conftest import ROOT

# The floors of utils/, lowest first (utils/__init__.py says what each holds): a sub-package imports only
# from itself and the floors below it.
LAYERS = ("system", "models", "data", "training", "reports", "export", "runs", "sweeps")
PACKAGES = ("quantization_utils", "utils")
MAX_MODULE_LINES = 400
MAX_FOLDER_MODULES = 12
MAX_TRAINER_LINES = 300
MAX_README_LINES = 220


def module_files() -> dict[str, str]:
    """Dotted module name -> file, for every module of both packages (a package is its ``__init__``)."""
    modules = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for file in files:
                if file.endswith(".py"):
                    parts = os.path.relpath(os.path.join(folder, file), ROOT)[:-3].split(os.sep)
                    modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = os.path.join(folder, file)
    return modules


def imports_of(name: str, path: str, modules: dict[str, str]) -> set[str]:
    """The modules of both packages that module ``name`` (file ``path``) imports."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # ``from package import module`` imports the module; ``from module import name`` the module.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # import a.b.c of a non-module attribute: its module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def floor(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "utils" and len(parts) > 1 else None


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One circle of ``edges`` (a list that starts and ends with the same node), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_circle_and_none_where_there_is_none():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_imports_are_resolved_to_modules(graph):
    # The test is only as good as its parsing: relative imports of modules and of names land on the module.
    assert "utils.system.distributed" in graph["utils.training.losses.finite"]  # from ...system import distributed
    assert "utils.system.files" in graph["utils.training.checkpoints"]  # from ..system.files import ...
    assert "quantization_utils" in graph["utils.training.trainer"]


def test_no_module_imports_itself_through_a_circle(graph):
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


def test_no_circle_between_packages(graph):
    packages = {}
    for module, targets in graph.items():
        source = ".".join(module.split(".")[:2])
        packages.setdefault(source, set()).update(".".join(t.split(".")[:2]) for t in targets)
    for source in packages:
        packages[source].discard(source)
    assert find_cycle(packages) is None, f"package circle: {' -> '.join(find_cycle(packages))}"


def test_each_floor_imports_only_floors_below_it(graph):
    assert set(filter(None, map(floor, graph))) <= set(LAYERS), "a sub-package of utils/ is missing from LAYERS"
    upward = [f"{module} imports {target}" for module, targets in graph.items() for target in targets
              if floor(module) and floor(target) and LAYERS.index(floor(target)) > LAYERS.index(floor(module))]
    assert not upward, "imports from a higher floor:\n" + "\n".join(sorted(upward))


def test_the_quantizer_core_imports_nothing_from_utils(graph):
    offending = sorted(f"{m} imports {t}" for m, targets in graph.items() if m.startswith("quantization_utils")
                       for t in targets if t.split(".")[0] == "utils")
    assert not offending, offending


def test_every_sub_package_says_what_it_holds_and_may_import():
    for name in sorted(os.listdir(os.path.join(ROOT, "utils"))):
        folder = os.path.join(ROOT, "utils", name)
        if os.path.isdir(folder) and name != "__pycache__":
            init = os.path.join(folder, "__init__.py")
            assert os.path.isfile(init), f"utils/{name} has no __init__.py"
            assert ast.get_docstring(ast.parse(open(init).read())), f"utils/{name}/__init__.py has no docstring"


def test_modules_are_short_and_folders_small():
    long_modules, big_folders = [], []
    for folder, _, files in os.walk(os.path.join(ROOT, "utils")):
        python = [f for f in files if f.endswith(".py")]
        if len(python) > MAX_FOLDER_MODULES:
            big_folders.append(f"{os.path.relpath(folder, ROOT)}: {len(python)} modules")
        for file in python:
            with open(os.path.join(folder, file)) as f:
                lines = sum(1 for _ in f)
            if lines > MAX_MODULE_LINES:
                long_modules.append(f"{os.path.relpath(os.path.join(folder, file), ROOT)}: {lines} lines")
    assert not long_modules, f"modules over {MAX_MODULE_LINES} lines: {long_modules}"
    assert not big_folders, f"folders over {MAX_FOLDER_MODULES} modules: {big_folders}"


@pytest.mark.parametrize("path, limit", [("utils/training/trainer.py", MAX_TRAINER_LINES),
                                         ("README.md", MAX_README_LINES)])
def test_the_trainer_and_the_readme_stay_short(path, limit):
    with open(os.path.join(ROOT, path)) as f:
        assert sum(1 for _ in f) <= limit, f"{path} is over {limit} lines"
