"""The package's shape, checked from its source: imports point one way, private names stay private, functions
stay readable. These read the code with `ast` (nothing is imported), so they fail on the commit that breaks
the rule, naming the file and line."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "clt"
MAX_FUNCTION_LINES = 120


def modules() -> dict[str, ast.Module]:
    """`clt.x.y` -> its parsed source, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), filename=str(path))
    return out


def clt_imports(name: str, tree: ast.Module, known: set[str]) -> list[tuple[str, int, list[str]]]:
    """(module imported, line, names taken from it) for every import of a clt module, at any depth (an import
    inside a function is still a dependency)."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, []) for a in node.names if a.name.startswith("clt")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("clt"):
            for a in node.names:  # `from clt import plan` imports the module clt.plan
                sub = f"{node.module}.{a.name}"
                out.append((sub, node.lineno, []) if sub in known else (node.module, node.lineno, [a.name]))
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    graph = {}
    for name, tree in mods.items():
        deps = {target for target, _, _ in clt_imports(name, tree, known)}
        # a module depends on the module it names; `clt.config` (a package's face) stands for its re-exports
        graph[name] = {d for d in deps if d in known and d != name and d != "clt"}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph, as the list of modules around it, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_find_cycle_finds_a_cycle_and_only_a_cycle():
    # the checker itself: a test that could never see a cycle would pass forever
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_among_clt_modules():
    graph = import_graph()
    assert "clt.train" in graph and "clt.plan" in graph["clt.train"]  # the graph is really read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_a_private_name_of_another():
    mods = modules()
    known = set(mods)
    found = []
    for name, tree in mods.items():
        aliases = {}  # local name -> clt module, for `module._private` attribute uses
        for target, line, names in clt_imports(name, tree, known):
            found += [f"{name}:{line} imports {target}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("clt"):
                for a in node.names:
                    if f"{node.module}.{a.name}" in known:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in known and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append(f"{name}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not found, "\n".join(found)


def test_no_function_is_longer_than_the_limit():
    long = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{name}:{node.lineno} {node.name} is {n} lines")
    assert not long, "\n".join(long)
