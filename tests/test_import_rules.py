"""The import rules of docs/architecture.md, enforced on the parsed source (ast; nothing is imported).

Every `import light_moe...` / `from light_moe... import ...` in light_moe/**/*.py counts, lazy ones
inside functions included; only imports under `if TYPE_CHECKING:` are exempt (they never run).
Rules: (1) no circle between modules; (2) no arrow from a lower layer to a higher one (LAYERS,
bottom first; a module belongs to the layer of its longest matching prefix).
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "light_moe"

# Bottom first. A module may import its own layer and the layers below it, never one above.
LAYERS: list[tuple[str, ...]] = [
    ("light_moe.config", "light_moe.sampling_params", "light_moe.assets"),
    ("light_moe.runtime",),            # host <-> device copies: no model, no engine
    ("light_moe.quant",),              # the W4A16 format, its scheme and checkpoint readers
    ("light_moe.kernels",),            # CuTe DSL kernels
    ("light_moe.ops",),                # MoEOps backends: reference and CuTe
    ("light_moe.parallel",),           # process groups, placement, dispatch, overlap, balancing
    ("light_moe.layers",),
    ("light_moe.models",),
    ("light_moe.executor",),
    ("light_moe.engine",),
    ("light_moe",),                    # the package's public API (light_moe/__init__.py)
    ("light_moe.cli_args", "light_moe.quantize"),  # shared CLI argument helpers; the quantize writer
    ("light_moe.server", "light_moe.bench"),
    ("light_moe.cli",),
]

# Edges allowed against the rules, each with its reason. The test fails when one is no longer
# in the code, so the list only shrinks.
ALLOWED: dict[tuple[str, str], str] = {}


def module_files() -> dict[str, Path]:
    mods = {}
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def import_graph() -> dict[str, set[str]]:
    """module -> the light_moe modules it imports (an import of a package's name that is itself a
    submodule points at the submodule; importing the package's own names points at the package)."""
    mods = module_files()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        skip = _type_checking_nodes(tree)
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in mods else base)
            for target in targets:
                if target == "light_moe" or target.startswith("light_moe."):
                    resolved = resolve(target)
                    if resolved and resolved != mod:
                        graph[mod].add(resolved)
    return graph


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"{module} is in no layer of LAYERS: place it"
    return best


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def upward_edges(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((src, dst) for src, dsts in graph.items() for dst in dsts if layer_of(dst) > layer_of(src))


def test_graph_sees_imports():
    # The parser must find what it polices: a top-level import, lazy ones inside functions, and must
    # skip the TYPE_CHECKING-only one of executor/batch.py.
    graph = import_graph()
    assert "light_moe.engine.engine" in graph["light_moe"]
    assert "light_moe.bench.e2e" in graph["light_moe.cli"]  # inside cmd_bench_e2e
    assert "light_moe.server.app" in graph["light_moe.server.serve"]  # inside run_server
    assert "light_moe.engine.request" not in graph["light_moe.executor.batch"]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("light_moe.executor.workers") > layer_of("light_moe.parallel.balancer")
    assert upward_edges({"light_moe.parallel.balancer": {"light_moe.executor.workers"}}) == [
        ("light_moe.parallel.balancer", "light_moe.executor.workers")]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_upward_imports():
    edges = upward_edges(import_graph())
    bad = [e for e in edges if e not in ALLOWED]
    assert not bad, "imports from a lower layer to a higher one:\n" + "\n".join(
        f"{src} (layer {layer_of(src)}) -> {dst} (layer {layer_of(dst)})" for src, dst in bad)
    stale = [e for e in ALLOWED if e not in edges]
    assert not stale, f"ALLOWED entries no longer needed, remove them: {stale}"


if __name__ == "__main__":
    g = import_graph()
    print("cycles:", *find_cycles(g), sep="\n  ")
    print("upward:", *(f"{s} -> {d}" for s, d in upward_edges(g)), sep="\n  ")
