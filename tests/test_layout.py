"""The package layout: few top-level modules, subsystems as folders, layered imports without cycles."""

import ast
import collections
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "nxtp_jax"

# Lower layers never import higher ones; units of one layer never import each other.
LAYERS = (
    {"choices", "errors", "params", "objective", "tokenizer"},
    {"sharding", "prompts"},
    {"models", "data"},
    {"checkpoint"},
    {"experiment", "weights", "inference"},
    {"training", "evaluation", "export", "serve"},
    {"main", "infer"},
)
SUBSYSTEMS = ("models", "inference", "training", "evaluation", "data", "weights", "export", "serve")


def modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(mods: dict[str, pathlib.Path]) -> dict[str, set[str]]:
    """Every nxtp_jax module each module imports, at module level or inside a function."""
    edges = collections.defaultdict(set)
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nxtp_jax"):
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("nxtp_jax")]
            edges[name] |= {t for t in targets if t in mods and t not in (name, "nxtp_jax")}
    return edges


def unit(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def test_top_level_holds_at_most_twelve_modules_and_every_subsystem_is_a_folder():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 12, top
    for name in SUBSYSTEMS:
        assert (PACKAGE / name / "__init__.py").is_file(), name


def test_module_imports_have_no_cycle():
    edges = imports(modules())
    state: dict[str, int] = {}
    cycles = []

    def visit(u, stack):
        state[u] = 1
        stack.append(u)
        for v in sorted(edges.get(u, ())):
            if state.get(v) == 1:
                cycles.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v, stack)
        stack.pop()
        state[u] = 2

    for u in sorted(edges):
        if u not in state:
            visit(u, [])
    assert cycles == []


def test_imports_follow_the_layers():
    layer = {name: i for i, names in enumerate(LAYERS) for name in names}
    mods = modules()
    assert {unit(m) for m in mods if m != "nxtp_jax"} <= set(layer), "a new unit needs a layer in LAYERS"
    upward = [
        f"{a} -> {b}"
        for a, targets in imports(mods).items()
        for b in targets
        if unit(a) != unit(b) and layer[unit(b)] >= layer[unit(a)]
    ]
    assert upward == []
