"""The package's layout, read from its own imports: dependencies run one way, and the lab of the
tiny backbones is used by nothing in the core (only the command line sees both)."""

import ast
from pathlib import Path

import llava_lite

PACKAGE = Path(llava_lite.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, ast.stmt]]:
    """(imported module of the package, the import statement) for every import in the file, at
    any depth (imports inside functions included)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found += [(c, node) for c in candidates if c in known and c != name]
    return found


def test_the_core_never_imports_the_lab():
    modules = _modules()
    core = {n: p for n, p in modules.items() if not n.startswith("llava_lite.lab") and n != "llava_lite.cli"}
    wrong = [(n, t) for n, p in core.items() for t, _ in _imports(n, p, set(modules)) if t.startswith("llava_lite.lab")]
    assert not wrong, f"core modules importing the lab: {wrong}"


def test_no_import_cycle_among_the_packages_modules():
    modules = _modules()
    graph = {n: {t for t, _ in _imports(n, p, set(modules))} for n, p in modules.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(n, stack):
        state[n] = 1
        for t in graph[n]:
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t) :] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [n])
    assert not cycles, f"import cycles: {cycles[:3]}"


def test_imports_inside_functions_only_defer_a_heavy_dependency_and_say_so():
    """An import inside a function hides a dependency; it is allowed only for a heavy library that
    a code path may never need, with a comment on its line saying why."""
    hidden = []
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and node.col_offset > 0:
                line = lines[node.lineno - 1]
                if "#" not in line:
                    hidden.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {line.strip()}")
    assert not hidden, "imports inside functions without a reason:\n" + "\n".join(hidden)
