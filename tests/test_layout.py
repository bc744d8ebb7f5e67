"""The package layout: few top-level modules, subsystems as folders, layered imports without cycles,
and one command layer (nxtp_jax/cli) that alone parses flags and exits."""

import ast
import collections
import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nxtp_jax"

# Lower layers never import higher ones; units of one layer never import each other.
LAYERS = (
    {"choices", "errors", "params", "objective", "tokenizer"},
    {"sharding", "prompts"},
    {"models", "data"},
    {"checkpoint"},
    {"experiment", "weights"},
    {"pretrained"},  # released models: downloads, then the weights converter
    {"inference"},  # Tagger.from_pretrained resolves a released model
    {"training", "evaluation", "export", "serve"},
    {"aot"},  # compiles the training step and the sampler for a target topology
    {"cli"},
    {"main", "infer"},  # `python -m` shims over the command layer
)
SUBSYSTEMS = ("models", "inference", "training", "evaluation", "data", "weights", "export", "serve", "cli")


def modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _without_main_blocks(tree: ast.Module) -> ast.Module:
    """The module less its `if __name__ == "__main__":` block: a `python -m` shim onto the command layer, not a dependency."""
    def is_main(node):
        test = getattr(node, "test", None)
        return isinstance(node, ast.If) and isinstance(test, ast.Compare) and getattr(test.left, "id", None) == "__name__"

    tree.body = [node for node in tree.body if not is_main(node)]
    return tree


def imports(mods: dict[str, pathlib.Path]) -> dict[str, set[str]]:
    """Every nxtp_jax module each module imports, at module level or inside a function."""
    edges = collections.defaultdict(set)
    for name, path in mods.items():
        for node in ast.walk(_without_main_blocks(ast.parse(path.read_text()))):
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


def test_every_console_script_resolves_into_the_command_layer():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"nxtp-tag", "nxtp-convert", "nxtp-check", "nxtp-export"} <= set(scripts)
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert module.startswith("nxtp_jax.cli."), (name, target)
        command, _, method = attr.partition(".")
        tree = ast.parse((PACKAGE / "cli" / f"{module.split('.')[-1]}.py").read_text())
        defined = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}
        assert command in defined and method == "entry", (name, target)


def _calls(tree: ast.AST, owner: str, attr: str) -> list[int]:
    return [
        node.lineno for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr == attr and isinstance(node.value, ast.Name) and node.value.id == owner
    ]


def test_no_module_below_the_command_layer_reads_absl_flags_or_exits():
    offenders = []
    for name, path in modules().items():
        if unit(name) == "cli":
            continue
        tree = ast.parse(path.read_text())
        flag_reads = [
            node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "FLAGS"
            and node.attr not in ("is_parsed", "mark_as_parsed")  # grain's workers need the flags marked parsed
        ]
        defines = [
            node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr.startswith("DEFINE_")
        ]
        for kind, lines in (("reads FLAGS", flag_reads), ("defines a flag", defines), ("calls sys.exit", _calls(tree, "sys", "exit")),
                            ("calls app.run", _calls(tree, "app", "run"))):
            offenders += [f"{path.relative_to(ROOT)}:{line} {kind}" for line in lines]
    assert offenders == []


def test_nothing_edits_sys_path():
    trees = [p for folder in ("nxtp_jax", "scripts", "convert", "benchmarks") for p in (ROOT / folder).rglob("*.py")]
    offenders = [
        f"{path.relative_to(ROOT)}:{line}"
        for path in trees
        for line in _calls(ast.parse(path.read_text()), "sys", "path")
    ]
    assert trees and offenders == []


# Modules that import an extra's package at module level, tested in their own environment (tests/export).
NEEDS_AN_EXTRA = {
    "nxtp_jax.export.onnx_export": "onnx",
    "nxtp_jax.export.ort_tagger": "onnxruntime",
    "nxtp_jax.export.savedmodel": "tensorflow",
}


def test_every_module_imports_so_the_fast_loop_reaches_it():
    import importlib

    failed = {}
    for name in sorted(modules()):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if NEEDS_AN_EXTRA.get(name) != e.name:
                failed[name] = repr(e)
    assert failed == {}
