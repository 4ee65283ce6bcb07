"""The package's import graph, read from the source with `ast` (nothing is imported): no cycle among autodeco
modules, the library never imports the CLI, argparse and `main()` live only in autodeco/cli, no module imports a
layer above its own (LAYERS), and autodeco imports sit at module top unless marked `# optional dependency` or
under `if TYPE_CHECKING:`.

    .venv/bin/python -m pytest -q tests/test_imports.py
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(os.environ.get("AUTODECO_IMPORTS_ROOT", Path(__file__).resolve().parents[1] / "autodeco"))

# Layer of each module (longest matching prefix wins); a module may import only from its own layer or below.
# Data flows config/atomic/features -> heads -> sampling, losses -> modeling -> control -> data -> training,
# evaluation -> demo -> cli. New packages (e.g. autodeco.vllm, autodeco.official) get a row here.
LAYERS = {
    "autodeco.config": 0, "autodeco.atomic": 0, "autodeco.features": 0, "autodeco.locks": 0,
    "autodeco.heads": 1,
    "autodeco.sampling": 2, "autodeco.losses": 2,
    "autodeco.validation": 2,  # model/base directory checks (uses the heads' shapes), called by modeling
    "autodeco.official": 2,  # the official AutoDeco format (layouts, key names, feature arithmetic), used by modeling
    "autodeco.modeling": 3,
    "autodeco": 3,  # the package itself: the public API re-exports config, modeling, sampling
    "autodeco.control": 4,
    "autodeco.data": 5,
    "autodeco.testing": 5,  # tiny models + char tokenizer for tests and `autodeco tiny-base`
    "autodeco.training": 6, "autodeco.evaluation": 6,
    "autodeco.vllm": 6,  # the vLLM plugin and engine: a model for vLLM, a generation engine for evaluation
    "autodeco.demo": 7,
    "autodeco.cli": 8, "autodeco.__main__": 8,
}
CLI = "autodeco.cli"
ENTRY_POINTS = {"autodeco.__main__"}  # `python -m autodeco` runs autodeco.cli.main
OPTIONAL_MARK = "# optional dependency"



@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported autodeco module
    line: int
    top_level: bool  # not inside a function or class
    type_checking: bool  # under `if TYPE_CHECKING:`
    optional: bool  # the line carries OPTIONAL_MARK


def module_name(path: Path, root: Path = PACKAGE_ROOT) -> str:
    parts = ["autodeco", *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules(root: Path = PACKAGE_ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The autodeco module `name` refers to: itself, or its longest existing parent (a name inside a module)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    source = path.read_text(encoding="utf-8")
    lines = source.splitlines()
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def visit(node, top_level: bool, type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                visit(child, False, type_checking)
                continue
            if isinstance(child, ast.If) and _is_type_checking(child):
                visit(child, top_level, True)
                continue
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    package = module if is_package else module.rpartition(".")[0]
                    for _ in range(child.level - 1):
                        package = package.rpartition(".")[0]
                    base = f"{package}.{base}" if base else package
                names = [f"{base}.{alias.name}" for alias in child.names]
            for name in names:
                if name == "autodeco" or name.startswith("autodeco."):
                    target = _resolve(name, modules)
                    if target is not None and target != module:
                        found.append(Import(module, target, child.lineno, top_level, type_checking,
                                            OPTIONAL_MARK in lines[child.lineno - 1]))
            visit(child, top_level, type_checking)

    visit(ast.parse(source, filename=str(path)), True, False)
    return list(dict.fromkeys(found))  # one entry per (target, line)


def graph(root: Path = PACKAGE_ROOT) -> tuple[dict[str, Path], list[Import]]:
    modules = all_modules(root)
    return modules, [imp for name, path in modules.items() for imp in imports_of(name, path, modules)]


def layer(module: str) -> int:
    # "autodeco" names the package's own __init__ only: a new top-level module must get its own row.
    best = max((prefix for prefix in LAYERS if module == prefix or (prefix != "autodeco" and
                                                                    module.startswith(prefix + "."))),
               key=len, default=None)
    if best is None:
        raise AssertionError(f"{module} has no layer: add it to LAYERS in tests/test_imports.py")
    return LAYERS[best]


def find_cycles(imports: list[Import]) -> list[list[str]]:
    """Import cycles among runtime imports (TYPE_CHECKING ones excluded), each as the modules of one loop."""
    edges: dict[str, set[str]] = {}
    for imp in imports:
        if not imp.type_checking:
            edges.setdefault(imp.source, set()).add(imp.target)
    cycles, state = [], {}  # state: 1 on the stack, 2 done

    def dfs(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                dfs(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            dfs(node, [])
    return cycles


def violations(root: Path = PACKAGE_ROOT) -> dict[str, list[tuple[str, str]]]:
    """{check: [(module it is charged to, description)]} for the five rules."""
    modules, imports = graph(root)
    found: dict[str, list[tuple[str, str]]] = {k: [] for k in ("cycle", "cli", "argparse_main", "layer", "top")}
    for cycle in find_cycles(imports):
        found["cycle"].append((cycle[0], " -> ".join(cycle)))
    for imp in imports:
        where = f"{imp.source}:{imp.line} imports {imp.target}"
        outside_cli = not (imp.source == CLI or imp.source.startswith(CLI + "."))
        if outside_cli and imp.source not in ENTRY_POINTS and (imp.target == CLI or imp.target.startswith(CLI + ".")):
            found["cli"].append((imp.source, where))
        if not imp.type_checking and layer(imp.target) > layer(imp.source):
            found["layer"].append((imp.source, f"{where} (layer {layer(imp.source)} -> {layer(imp.target)})"))
        if not (imp.top_level or imp.type_checking or imp.optional):
            found["top"].append((imp.source, f"{where} inside a function or class (move it to the top, or mark "
                                             f"an optional dependency with '{OPTIONAL_MARK}')"))
    for name, path in modules.items():
        if name == CLI or name.startswith(CLI + "."):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                if any(m == "argparse" or m.startswith("argparse.") for m in mods):
                    found["argparse_main"].append((name, f"{name}:{node.lineno} imports argparse"))
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "main":
                found["argparse_main"].append((name, f"{name}:{node.lineno} defines main()"))
    return found


@pytest.mark.parametrize("check", ["cycle", "cli", "argparse_main", "layer", "top"])
def test_import_rules(check):
    problems = [text for _, text in violations()[check]]
    assert not problems, f"{check}:\n" + "\n".join(problems)


def test_the_checks_can_fail(tmp_path):
    """A tiny package with one violation of each rule: every check reports it."""
    pkg = tmp_path / "autodeco"
    (pkg / "cli").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "cli" / "__init__.py").write_text("import argparse\n")
    (pkg / "config.py").write_text("from autodeco.data import X\n")  # layer 0 -> 5, and a cycle with data
    (pkg / "data.py").write_text("import argparse\nfrom autodeco.config import Y\nimport autodeco.cli\n\n"
                                 "def main():\n    from autodeco.config import Z\n")
    found = violations(pkg)
    assert [m for m, _ in found["cycle"]] and "autodeco.config" in found["cycle"][0][1]
    assert [m for m, _ in found["cli"]] == ["autodeco.data"]
    assert sorted(t.split(":")[1].split()[1] for _, t in found["argparse_main"]) == ["defines", "imports"]
    assert any("layer 0 -> 5" in t for _, t in found["layer"])
    assert [m for m, _ in found["top"]] == ["autodeco.data"]
    ok = tmp_path / "ok" / "autodeco"
    ok.mkdir(parents=True)
    (ok / "__init__.py").write_text("")
    (ok / "data.py").write_text("from typing import TYPE_CHECKING\nfrom autodeco.config import Y\n"
                                "if TYPE_CHECKING:\n    from autodeco.demo import Z\n\n"
                                "def f():\n    import autodeco.config  # optional dependency\n")
    (ok / "config.py").write_text("")
    (ok / "demo.py").write_text("")
    found = violations(ok)
    assert not any(found.values()), found
