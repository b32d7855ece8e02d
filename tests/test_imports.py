"""The import graph of the project's own packages: one direction, no cycles, every imported name exists.

The graph is read from the source (ast), not by importing: every `import` / `from ... import` statement of a module
under eda/, baselines/ and bench/, at any depth (imports inside functions count: they run too). An edge goes from a
module to the project module it names; `from pkg import sub` names the submodule `pkg.sub` when there is one.
Registries that import their built-in plugin modules by name on first lookup (`BUILTIN_MODULES` of eda.registry and
bench.models.registry, through importlib) add no edge: that is how a registry stays below what it registers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("eda", "baselines", "bench")
LIBRARY = ("eda", "baselines")  # the method library: imports nothing from the application (bench)
# The command-line modules (`python -m bench.X`): thin, and nothing but tests imports them.
CLIS = {f"bench.{n}" for n in ("run", "report", "check", "quantize", "sample", "evaluate", "train", "convert",
                               "perf", "export")}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


MODULES = project_modules()


def _resolve(importer: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module of a `from X import ...` (relative imports resolved against the importer's package)."""
    if not node.level:
        return node.module or ""
    is_pkg = path.name == "__init__.py"
    base = importer.split(".")[: len(importer.split(".")) - node.level + (1 if is_pkg else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: Path | None = None) -> list[tuple[str, int, str | None]]:
    """(imported project module, line, imported name or None) for every import statement of module `name`."""
    path = path or MODULES[name]
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, None) for a in node.names if a.name.split(".")[0] in PACKAGES]
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(name, path, node)
            if mod.split(".")[0] not in PACKAGES:
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.append((sub, node.lineno, None) if sub in MODULES else (mod, node.lineno, a.name))
    return out


def graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in imports_of(m) if t != m} for m in MODULES}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for start in sorted(g):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(g[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt) and nxt in g:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(g[nxt])))
    return None


def test_the_walker_sees_the_packages_and_function_level_imports():
    assert {"eda.registry", "baselines.rtn", "bench.run", "bench.harness.cell", "bench.models.zoo"} <= set(MODULES)
    # bench.harness.cell imports eda.trajectories inside functions only
    assert "eda.trajectories" in graph()["bench.harness.cell"]


def test_find_cycle_reports_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("pkg", LIBRARY)
def test_the_method_library_imports_nothing_from_bench(pkg):
    bad = [f"{m}:{line} imports {t}" for m in MODULES if m.split(".")[0] == pkg
           for t, line, _ in imports_of(m) if t.split(".")[0] == "bench"]
    assert not bad, "\n".join(bad)


def test_nothing_imports_a_cli():
    """The CLIs are leaves: library code lives in subpackages, so no module of the packages imports a CLI module."""
    bad = [f"{m}:{line} imports {t}" for m in MODULES for t, line, _ in imports_of(m) if t in CLIS and t != m]
    assert not bad, "\n".join(bad)


def test_subpackages_form_no_cycle():
    """One direction between bench's parts too: models, metrics, harness, reporting, studies (and the CLIs above
    them) import each other without a loop."""

    def part(m: str) -> str:
        bits = m.split(".")
        return ".".join(bits[:2]) if bits[0] == "bench" else bits[0]

    g: dict[str, set[str]] = {}
    for m, targets in graph().items():
        g.setdefault(part(m), set()).update(part(t) for t in targets if part(t) != part(m))
    cycle = find_cycle(g)
    assert cycle is None, "cycle between parts: " + " -> ".join(cycle)


def test_every_imported_name_exists():
    """`from pkg.mod import name` names something pkg/mod.py defines or imports at its top level (catches imports
    left pointing at a module a function moved out of, which only fail when that line runs)."""

    def top_level_names(mod: str) -> set[str]:
        tree = ast.parse(MODULES[mod].read_text())
        names = set()
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names |= {(a.asname or a.name).split(".")[0] for a in node.names}
            elif isinstance(node, ast.Assign):
                names |= {n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)}
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
        return names

    defined = {m: top_level_names(m) for m in MODULES}
    bad = []
    for path in [*MODULES.values(), *sorted((ROOT / "tests").glob("*.py"))]:
        m = module_name(path)
        for t, line, name in imports_of(m, path):
            if t not in MODULES:
                bad.append(f"{m}:{line} imports {t}, which does not exist")
            elif name is not None and name != "*" and name not in defined[t]:
                bad.append(f"{m}:{line} imports {name} from {t}, which does not define it")
    assert not bad, "\n".join(bad)


def test_results_hold_outputs_only():
    """results/ holds pages, rows and plots; the code that renders them lives in bench/studies/."""
    code = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "results").rglob("*.py"))
    assert not code, f"code under results/: {code}"
