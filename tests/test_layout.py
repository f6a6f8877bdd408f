"""The package's layers, read from the source: no module imports a module of a higher layer
(nor of another layer of the same rank), no imports go round in a circle, and the package's top
level holds only its few leaf modules (one import path per thing: no re-exporting modules)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Each layer and its rank: a module may import modules of its own layer and of layers of a
# lower rank only. ``core`` is kava's top-level leaf modules (config, names, io, answers,
# losses, logs) and the package itself; distillation and evaluation are independent.
RANKS = {
    "core": 0,
    "data": 1,
    "model": 2,
    "distill": 3,
    "evaluation": 3,
    "training": 4,
    "experiments": 5,
    "cli": 6,
}
# kava's core: its top-level modules and the ``config`` package, which every layer may use.
CORE = {"kava.answers", "kava.io", "kava.logs", "kava.losses", "kava.names"}
CORE_PACKAGES = {"config"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted((SRC / "kava").rglob("*.py"))}


def layer(module: str) -> str:
    """``core`` for kava, its top-level modules and its core packages, else the sub-package under kava."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in CORE_PACKAGES or (len(parts) == 2 and not (SRC / "kava" / parts[1]).is_dir()):
        return "core"
    return parts[1]


def imports(module: str) -> set[str]:
    """The kava modules ``module`` imports anywhere in its body (inside functions too)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "kava")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "kava":
                continue
            subs = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES}
            # ``from pkg import submodule`` imports the submodule; ``from mod import name`` the module.
            found.update(subs if subs and len(subs) == len(node.names) else {target, *subs})
    unknown = found - MODULES.keys()
    assert not unknown, f"{module} imports {sorted(unknown)}, which do not exist"
    return found


LIBRARY = sorted(MODULES)


def test_every_module_is_in_a_known_layer():
    assert {layer(m) for m in MODULES} <= RANKS.keys()


def test_the_top_level_holds_only_the_core_leaves():
    top = {m for m in MODULES if m.count(".") == 1 and not (SRC / "kava" / m.split(".")[1]).is_dir()}
    assert top == CORE, f"top-level modules beyond the core leaves: {sorted(top - CORE)}; missing: {sorted(CORE - top)}"
    assert len(top) + len(CORE_PACKAGES) <= 6


def test_no_module_is_over_600_lines():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 600}
    assert not long, f"modules over 600 lines (split them by what they own): {long}"


@pytest.mark.parametrize("module", LIBRARY)
def test_no_module_imports_a_higher_layer(module):
    mine = layer(module)
    for target in imports(module):
        theirs = layer(target)
        assert theirs == mine or RANKS[theirs] < RANKS[mine], (
            f"{module} (layer {mine}, rank {RANKS[mine]}) imports {target} (layer {theirs}, rank {RANKS[theirs]})"
        )


def test_imports_go_round_in_no_circle():
    graph = {m: imports(m) & set(LIBRARY) for m in LIBRARY}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                cycle = path[path.index(t) :] + [t]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in LIBRARY:
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize("package", [f"kava.{name}" for name in RANKS if name != "core"])
def test_each_layer_says_what_it_owns_and_may_import(package):
    doc = ast.get_docstring(ast.parse(MODULES[package].read_text()))
    assert doc and "import" in doc.lower(), f"{package}/__init__.py: say what the layer owns and what it may import"


def test_a_function_over_60_lines_says_why_it_is_kept_whole():
    long = []
    for module, path in MODULES.items():
        text = path.read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                head = lines[node.lineno - 1 : node.body[0].end_lineno + 2]
                if not any("Kept whole" in line for line in head):
                    long.append(f"{module}.{node.name}")
    assert not long, f"functions over 60 lines without a '# Kept whole (over 60 lines): why' comment: {long}"
