"""The layout rules of issue 17, checked on the source with ``ast`` (no imports are run).

    python tools/check_layout.py                         # captioner/ and service/ of this checkout
    python tools/check_layout.py --root DIR pkg1 pkg2    # other packages under another folder

Rules, each reported as ``path:line: rule: figure``:

* ``module-size``: a module has at most 400 lines.
* ``function-size``: a function or method has at most 80 lines, decorators and signature included.
* ``private-import``: no ``_name`` is imported from another of the project's modules
  (``from .records import _first``, ``from . import _helpers``); dunders such as ``__version__`` are public.
* ``import-cycle``: the project's modules import each other without a cycle.

Only module-level imports make the import graph: those at the top of a module, in its classes and in
module-level ``if``/``try`` blocks. An import inside a function runs when the function is called, after
every module has loaded, so it is allowed and is the documented way to keep a dependency lazy (the
command line's start-up time, optional extras) or to break a cycle. Imports under ``if TYPE_CHECKING:``
never run and are left out too. Importing ``a.b`` runs ``a/__init__.py`` first, but that implicit
parent-package edge is not counted: only the modules an import statement names are.

Exit status 0 when every rule holds, 1 when one does not (the problems on stdout), 2 on a bad argument.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
DEFAULT_PACKAGES = ("captioner", "service")


@dataclass(frozen=True, order=True)
class Problem:
    """One broken rule at ``path:line``; ``detail`` carries the figure (lines, name, cycle)."""

    path: str
    line: int
    rule: str
    detail: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.rule}: {self.detail}"


@dataclass(frozen=True)
class Module:
    name: str  # dotted, e.g. captioner.datasets.records; a package is named by its __init__.py
    path: Path
    rel: str  # path relative to the root, as reported
    tree: ast.Module
    lines: int

    @property
    def package(self) -> str:
        """The package relative imports start from."""
        return self.name if self.path.name == "__init__.py" else self.name.rpartition(".")[0]


def find_modules(root: Path, packages: tuple[str, ...]) -> dict[str, Module]:
    """Every ``.py`` file of ``packages`` under ``root``, parsed, by dotted name."""
    modules: dict[str, Module] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text, filename=str(path))
            modules[name] = Module(name, path, path.relative_to(root).as_posix(), tree, len(text.splitlines()))
    return modules


def size_problems(
    module: Module, max_module: int = MAX_MODULE_LINES, max_function: int = MAX_FUNCTION_LINES
) -> list[Problem]:
    """Modules over ``max_module`` lines; functions over ``max_function`` (decorators + signature + body)."""
    problems = []
    if module.lines > max_module:
        problems.append(Problem(module.rel, 1, "module-size", f"{module.lines} lines (limit {max_module})"))
    for node in ast.walk(module.tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            length = (node.end_lineno or node.lineno) - start + 1
            if length > max_function:
                problems.append(
                    Problem(module.rel, start, "function-size", f"{node.name} is {length} lines (limit {max_function})")
                )
    return problems


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def module_level_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports that run when the module is imported: not in functions, not under ``if TYPE_CHECKING:``."""
    stack: list[ast.AST] = list(reversed(tree.body))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If):
            stack.extend(reversed(node.orelse if _is_type_checking(node.test) else node.body + node.orelse))
        elif isinstance(node, (ast.Try, ast.TryStar)):
            blocks = node.body + [s for h in node.handlers for s in h.body] + node.orelse + node.finalbody
            stack.extend(reversed(blocks))
        elif isinstance(node, (ast.With, ast.AsyncWith, ast.ClassDef)):
            stack.extend(reversed(node.body))


def all_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement, wherever it is (for the private-name rule)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node


def _base(module: Module, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` reads from."""
    if not node.level:
        return node.module or ""
    parts = module.package.split(".")
    parts = parts[: len(parts) - (node.level - 1)] if node.level > 1 else parts
    return ".".join(parts + ([node.module] if node.module else []))


def imported(module: Module, node: ast.Import | ast.ImportFrom, modules: dict[str, Module]) -> list[tuple[str, str]]:
    """(project module, name imported from it or "") for each project module the statement names."""
    if isinstance(node, ast.Import):
        return [(alias.name, "") for alias in node.names if alias.name in modules]
    base = _base(module, node)
    out = []
    for alias in node.names:
        if f"{base}.{alias.name}" in modules:  # a submodule: from . import records
            out.append((f"{base}.{alias.name}", ""))
        elif base in modules:
            out.append((base, alias.name))
    return out


def private_problems(module: Module, modules: dict[str, Module]) -> list[Problem]:
    """``_name`` imported from another project module (a private module counts as a private name)."""
    problems = []
    for node in all_imports(module.tree):
        for target, name in imported(module, node, modules):
            dotted = name or target.rpartition(".")[2]
            private = dotted.startswith("_") and not dotted.endswith("__")
            if private and target != module.name:
                problems.append(Problem(module.rel, node.lineno, "private-import", f"{dotted} imported from {target}"))
    return problems


def import_graph(modules: dict[str, Module]) -> dict[str, dict[str, int]]:
    """module -> {imported project module: line of the first such import}, module-level imports only."""
    graph: dict[str, dict[str, int]] = {name: {} for name in modules}
    for name, module in modules.items():
        for node in module_level_imports(module.tree):
            for target, _ in imported(module, node, modules):
                if target != name:
                    graph[name].setdefault(target, node.lineno)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (a, b, ..., a) per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(_cycle_in(set(component), graph))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _cycle_in(component: set[str], graph: dict[str, dict[str, int]]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first search inside the component)."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w in component and w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError("a strongly connected component has a cycle")  # pragma: no cover


def cycle_problems(modules: dict[str, Module]) -> list[Problem]:
    graph = import_graph(modules)
    problems = []
    for cycle in cycles(graph):
        first = modules[cycle[0]]
        problems.append(Problem(first.rel, graph[cycle[0]][cycle[1]], "import-cycle", " -> ".join(cycle)))
    return problems


def check(root: Path, packages: tuple[str, ...] = DEFAULT_PACKAGES) -> list[Problem]:
    """Every problem of ``packages`` under ``root``, sorted by file and line."""
    modules = find_modules(root, packages)
    problems = cycle_problems(modules)
    for module in modules.values():
        problems += size_problems(module) + private_problems(module, modules)
    return sorted(problems)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("packages", nargs="*", default=list(DEFAULT_PACKAGES), help="package folders under --root")
    parser.add_argument(
        "--root",
        type=Path,
        default=Path(__file__).resolve().parent.parent,
        help="the folder holding the packages (default: this checkout)",
    )
    args = parser.parse_args(argv)
    missing = [p for p in args.packages if not (args.root / p).is_dir()]
    if missing:
        parser.error(f"no package folder {', '.join(missing)} under {args.root}")
    try:
        problems = check(args.root, tuple(args.packages))
    except SyntaxError as exc:
        print(f"{exc.filename}:{exc.lineno}: syntax error: {exc.msg}", file=sys.stderr)
        return 1
    for problem in problems:
        print(problem)
    if problems:
        counts = {rule: sum(p.rule == rule for p in problems) for rule in sorted({p.rule for p in problems})}
        per_rule = ", ".join(f"{rule}: {n}" for rule, n in counts.items())
        print(f"layout: {len(problems)} problem{'s' * (len(problems) != 1)} ({per_rule})")
        return 1
    print(
        f"layout: {', '.join(args.packages)} hold the rules (modules <= {MAX_MODULE_LINES} lines, functions <= "
        f"{MAX_FUNCTION_LINES}, no private imports, no import cycles)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
