"""Imports inside lvsa run one way: data → mechanisms → runtime → integrations → commands.

Every ``import`` statement of every module is read with ``ast`` (function-level, lazy
imports included: a lazy import is still a dependency; only ``if TYPE_CHECKING:`` blocks
are skipped), the module graph is built, and the test asserts that it has no cycle and
that no module imports one of a later layer.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lvsa"

#: layer of every module; a listed package covers its submodules; every module must have one
LAYERS = {
    "data": ["lvsa._version", "lvsa.errors", "lvsa.events", "lvsa.geometry", "lvsa.mask", "lvsa.presets",
             "lvsa.schedule", "lvsa.config", "lvsa.devices", "lvsa.npu_smi", "lvsa.ops",
             "lvsa.hookspecs", "lvsa.backend", "lvsa.container"],
    "mechanisms": ["lvsa.backends", "lvsa.backends.reference", "lvsa.sink", "lvsa.plugins",
                   "lvsa.telemetry", "lvsa.dispatch", "lvsa.api"],
    "runtime": ["lvsa.engine", "lvsa.parallel"],
    "integrations": ["lvsa.integrations", "lvsa.integrations.base", "lvsa.integrations.wan",
                     "lvsa.integrations.hunyuan", "lvsa.integrations.cogvideox",
                     "lvsa.integrations.registry", "lvsa.tiny", "lvsa.models", "lvsa.outputs"],
    # a package name covers its submodules (lvsa.commands.*, lvsa.doctor.*, lvsa.bench.*, ...)
    "commands": ["lvsa.cli", "lvsa.__main__", "lvsa.commands", "lvsa.testing",
                 "lvsa.doctor", "lvsa.bench"],
}
ORDER = ["data", "mechanisms", "runtime", "integrations", "commands"]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(node) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports_of(path: Path, modules: set) -> set:
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            skip.update(id(n) for n in ast.walk(node))
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "lvsa":
                    out.add(_closest(a.name, modules))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "lvsa":
                continue
            for a in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{target}.{a.name}"
                out.add(sub if sub in modules else _closest(target, modules))
    out.discard(name)
    out.discard(None)
    return out


def _closest(name: str, modules: set):
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def graph():
    files = sorted(ROOT.rglob("*.py"))
    modules = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, modules) for p in files}


def cycles(g):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read():
    g = graph()
    assert "lvsa.dispatch" in g["lvsa.engine"] or "lvsa.dispatch" in str(g["lvsa.engine"])
    assert "lvsa.mask" in g["lvsa.schedule"]


def test_no_import_cycles():
    found = cycles(graph())
    assert not found, "import cycles in lvsa/: " + "; ".join(" <-> ".join(c) for c in found)


def layer_of(module: str):
    """The layer index of ``module``: its own entry, else its closest listed package."""
    listed = {m: ORDER.index(lay) for lay, mods in LAYERS.items() for m in mods}
    name = module
    while name:
        if name in listed:
            return listed[name]
        name = name.rpartition(".")[0]
    return None


def test_no_module_imports_a_later_layer():
    g = graph()
    missing = sorted(m for mods in LAYERS.values() for m in mods if m not in g)
    assert not missing, f"LAYERS names modules that do not exist: {missing}"
    # the package root is the public facade: its lazy ``__getattr__`` reaches every layer
    layer = {m: layer_of(m) for m in g if m != "lvsa"}
    unplaced = sorted(m for m, lay in layer.items() if lay is None)
    assert not unplaced, f"modules with no layer in LAYERS (add them): {unplaced}"
    bad = []
    for mod, deps in g.items():
        for d in deps:
            if mod in layer and d in layer and layer[d] > layer[mod]:
                bad.append(f"{mod} ({ORDER[layer[mod]]}) imports {d} ({ORDER[layer[d]]})")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


@pytest.mark.parametrize("core", ["lvsa.dispatch", "lvsa.plugins", "lvsa.telemetry", "lvsa.api",
                                  "lvsa.config"])
def test_core_modules_name_no_backend_distribution(core):
    """The core names no backend but the built-in reference."""
    src = (ROOT / (core.split(".", 1)[1] + ".py")).read_text()
    for other in ("flashinfer", "triton", "ascend", "lvsa-cuda", "lvsa_cuda", "lvsa-flex"):
        assert other not in src.lower(), f"{core} names {other!r}"


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
