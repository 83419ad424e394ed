"""The shape docs/architecture.md promises, read from the source: no import cycle among mcdist's modules (imports
inside functions count), no method replaced at run time, and only the layer and the token-loop oracle branch on
the aggregation."""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = {"mcdist": ROOT / "mcdist", "mcdist.kernels": ROOT / "kernels"}


def modules() -> dict:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def owner(name: str, known: dict):
    """The module of ``known`` that ``name`` (a module or a name inside one) belongs to."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(known: dict) -> dict:
    graph = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets |= {owner(alias.name, known) for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets |= {owner(f"{base}.{alias.name}", known) or owner(base, known) for alias in node.names}
        # a package importing its own submodules (or a module its package) is not a cycle of the architecture
        graph[name] = {t for t in targets if t and t != name and not t.startswith(name + ".")
                       and not name.startswith(t + ".")}
    return graph


def cycles(graph: dict) -> list:
    """Every strongly connected group of more than one module (iterative Tarjan)."""
    index, low, on_stack, stack, groups, counter = {}, {}, set(), [], [], [0]
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
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
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return groups


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycle_among_mcdist_modules():
    known = modules()
    assert "mcdist.layer" in known and "mcdist.readers" in known
    assert cycles(import_graph(known)) == []


def test_no_method_is_replaced_at_run_time():
    replaced = []
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Attribute) and t.attr == "forward"
                                                    for t in node.targets):
                replaced.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "MethodType":
                replaced.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert replaced == []


def test_only_the_layer_and_the_token_loop_branch_on_the_aggregation():
    branching = sorted(str(path.relative_to(ROOT)) for name, path in modules().items()
                       if name != "mcdist.config"
                       and re.search(r"\.aggregation (==|!=|in|not in) ", path.read_text()))
    assert branching == ["mcdist/layer.py", "mcdist/reference.py"]
