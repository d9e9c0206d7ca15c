"""The package's shape: every import inside fasttricks points down the layers each package's
``__init__`` names, and no module imports, even lazily, one that imports it back."""

import ast
from pathlib import Path

import fasttricks

PACKAGE = Path(fasttricks.__file__).parent

# Lowest first. A module may import its own package and those listed before it; cli.py sits on top.
LAYERS = [
    ("fasttricks.errors", "fasttricks.atomic", "fasttricks.progress"),
    ("fasttricks.runtime",),
    ("fasttricks.recipes",),
    ("fasttricks.data",),
    ("fasttricks.models",),
    ("fasttricks.augment",),
    ("fasttricks.robust",),
    ("fasttricks.runs",),
    ("fasttricks.brainscore",),
    ("fasttricks.evaluation",),
    ("fasttricks.training",),
    ("fasttricks.cli", "fasttricks.__main__"),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every fasttricks module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fasttricks") and not node.level:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").is_file()
                          or (PACKAGE.parent / sub.replace(".", "/")).is_dir() else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("fasttricks"))
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py") if "pipelines" not in p.parts}


def _layer(module: str) -> int:
    for i, members in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in members):
            return i
    raise AssertionError(f"{module} belongs to no layer of tests/test_architecture.py")


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return [f"{m} imports {t}" for m, targets in sorted(graph.items()) if m != "fasttricks"
            for t in sorted(targets) if _layer(t) > _layer(m)]


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    cycles = []

    def visit(node, stack):
        for nxt in sorted(graph.get(node, ())):
            if nxt in stack:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in done:
                visit(nxt, stack + [nxt])
        done.add(node)

    done: set[str] = set()
    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    return cycles


def test_every_import_points_down_the_layers():
    assert _upward(_graph()) == []


def test_no_module_imports_one_that_imports_it_back():
    assert _cycles(_graph()) == []


def test_the_checks_see_the_circles_the_package_had():
    # the three circles of f38f2b2, as they were: each check must fail on them
    before = {"fasttricks.adversarial": {"fasttricks.n_fgsm"}, "fasttricks.n_fgsm": {"fasttricks.adversarial"},
              "fasttricks.data.beton": {"fasttricks.data.checksums"},
              "fasttricks.data.checksums": {"fasttricks.data.beton"}}
    assert _cycles(before) == ["fasttricks.adversarial -> fasttricks.n_fgsm -> fasttricks.adversarial",
                               "fasttricks.data.beton -> fasttricks.data.checksums -> fasttricks.data.beton"]
    assert _upward({"fasttricks.brainscore.follow": {"fasttricks.runs.status"},
                    "fasttricks.augment.preview": {"fasttricks.training.loop"}}) == [
        "fasttricks.augment.preview imports fasttricks.training.loop"]


def test_every_package_says_what_it_holds_and_what_it_may_import():
    for init in PACKAGE.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "import" in doc.lower(), f"{init}: its docstring names what the package may import"
