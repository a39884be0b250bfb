"""The package's layers, read from the source: every module imports only from its own layer or below,
`distmaml.meta` imports nothing of the trainer (its errors and counter-based random numbers only), and no two modules import each other, however indirectly
(function-level imports included, and the benchmarks too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Bottom to top. A module belongs to the first layer with a prefix of its dotted name.
LAYERS = [
    ("foundations", ["distmaml.errors", "distmaml.rng", "distmaml.files", "distmaml.imports",
                     "distmaml.machine_memory"]),
    ("the math", ["distmaml.meta"]),
    ("settings, task families, models", ["distmaml.config", "distmaml.tasks", "distmaml.models"]),
    ("the learner", ["distmaml.problems", "distmaml.build", "distmaml.evaluate"]),
    ("one iteration across processes", ["distmaml.engine"]),
    ("a run on disk", ["distmaml.run"]),
    ("the commands", ["distmaml.commands", "distmaml.__main__"]),
]
# The package's own facade names its public objects lazily (PEP 562), whatever their layer.
FACADE = "distmaml"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(*folders: str) -> dict[str, Path]:
    return {module_name(path): path for folder in folders for path in (REPO / folder).rglob("*.py")}


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` imports, anywhere in its body, resolved to modules (not attributes)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names]
            found.update(target if target in known else base for target in targets)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {target for target in found if target in known and target != name}


def layer_of(name: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes):
            return index
    raise AssertionError(f"{name} is in no layer: add it to LAYERS in {Path(__file__).name}")


def test_every_module_imports_only_from_its_layer_or_below():
    known = modules("distmaml")
    upward = []
    for name, path in sorted(known.items()):
        if name == FACADE:
            continue
        for target in imported(name, path, known):
            if target != FACADE and layer_of(target) > layer_of(name):
                upward.append(f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} "
                              f"({LAYERS[layer_of(target)][0]})")
    assert not upward, "\n".join(upward)


# What the math may use besides itself: pure modules that touch no file, process or device.
MATH_USES = ("distmaml.meta", "distmaml.errors", "distmaml.rng")


def test_the_math_imports_nothing_of_the_trainer():
    known = modules("distmaml")
    outside = {f"{name} imports {target}" for name, path in known.items() if name.startswith("distmaml.meta")
               for target in imported(name, path, known)
               if not any(target == use or target.startswith(use + ".") for use in MATH_USES)}
    assert not outside, "\n".join(sorted(outside))


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components with more than one module (or a module importing itself)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.mark.parametrize("folders", [("distmaml",), ("distmaml", "benchmarks", "examples", "launch")])
def test_no_import_cycle(folders):
    known = modules(*folders)
    graph = {name: imported(name, path, known) for name, path in known.items()}
    # A package's __init__ re-exporting its own submodules is how packages are built, not a cycle.
    for name in graph:
        graph[name] = {target for target in graph[name] if not name.startswith(target + ".")}
    assert not strongly_connected(graph)


def test_the_cycle_finder_finds_a_cycle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []
