"""The package layout is the architecture: imports point one way, with no cycle between modules
or between the packages at any level (imports inside functions count; ``if TYPE_CHECKING:``
blocks, which only feed annotations, do not)."""

import ast
from collections import defaultdict
from pathlib import Path

import autocomp

PACKAGE = Path(autocomp.__file__).parent
# Lowest first: a package may import from those before it, never from those after it.
LAYERS = ("core", "intake", "methods", "training", "hardware", "search", "export", "cli")


def _module_name(path: Path) -> str:
    parts = ("autocomp", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _type_checking_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The autocomp modules ``name`` imports (a name imported from a package that is a
    submodule counts as that submodule)."""
    tree = ast.parse(path.read_text())
    skipped = _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {module for module in found if module in modules and module != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that returns to its start, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _child(package: str, module: str) -> str | None:
    """The direct child of ``package`` that holds ``module`` (None when outside it)."""
    if not module.startswith(package + "."):
        return None
    return package + "." + module[len(package) + 1:].split(".")[0]


def test_no_cycle_between_modules() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_cycle_between_packages_at_any_level() -> None:
    graph = _graph()
    packages = {name for name, path in _modules().items() if path.name == "__init__.py"}
    for package in sorted(packages):
        children: dict[str, set[str]] = defaultdict(set)
        for module, imported in graph.items():
            source = _child(package, module)
            for target in imported:
                destination = _child(package, target)
                if source and destination and source != destination:
                    children[source].add(destination)
        cycle = _cycle(children)
        assert cycle is None, f"import cycle between the parts of {package}: " + " -> ".join(cycle)


def test_layers_import_downwards_only() -> None:
    rank = {f"autocomp.{layer}": index for index, layer in enumerate(LAYERS)}
    wrong = []
    for module, imported in _graph().items():
        source = _child("autocomp", module)
        if source not in rank:
            continue
        for target in imported:
            destination = _child("autocomp", target)
            if destination in rank and rank[destination] > rank[source]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "a lower layer imports a higher one:\n" + "\n".join(sorted(wrong))


def test_every_top_level_entry_is_a_layer_or_the_api() -> None:
    entries = {path.stem if path.suffix == ".py" else path.name for path in PACKAGE.iterdir()
               if path.suffix == ".py" or (path / "__init__.py").is_file()}
    assert entries == {*LAYERS, "__init__", "__main__"}


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
