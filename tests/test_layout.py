"""The package's shape, checked statically: no private name imported across modules, no import
cycle between modules, and the runtime and format layers never import the converter."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"formats": "llmpack.formats", "runtime": "llmpack.runtime", "converter": "llmpack.converter",
            "cli": "llmpack"}


def modules() -> dict:
    """module name -> parsed source, for every .py file of the package's folders."""
    out = {}
    for folder, pkg in PACKAGES.items():
        for f in (ROOT / folder).rglob("*.py"):
            rel = f.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = (ast.parse(f.read_text(encoding="utf-8")), f.name == "__init__.py")
    return out


def imports(name: str, tree, is_pkg: bool, known: set):
    """(imported module, imported names) pairs, relative imports resolved."""
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                mod = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:
                sub = f"{mod}.{a.name}"
                yield (sub, None) if sub in known else (mod, a.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, None


def test_no_private_names_across_modules():
    mods = modules()
    bad = [(m, target, n) for m, (tree, pkg) in mods.items() for target, n in imports(m, tree, pkg, set(mods))
           if n and n.startswith("_") and not n.startswith("__") and target in mods and target != m]
    assert not bad, bad


def find_cycle(graph: dict) -> list | None:
    """One cycle of a directed graph (module -> modules it imports), or None."""
    state = {}

    def visit(m, path):
        state[m] = "open"
        for t in sorted(graph.get(m, ())):
            if state.get(t) == "open":
                return path[path.index(t):] + [t]
            if t not in state:
                found = visit(t, path + [t])
                if found:
                    return found
        state[m] = "done"
        return None
    for m in sorted(graph):
        if m not in state:
            found = visit(m, [m])
            if found:
                return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles_at_module_level():
    """Module-level imports only (a function-level import is the documented way to defer one); a
    submodule importing its own package's __init__ is not a cycle worth flagging."""
    mods = modules()
    graph = {}
    for m, (tree, pkg) in mods.items():
        top = ast.Module(body=[n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], type_ignores=[])
        graph[m] = {t for t, _ in imports(m, top, pkg, set(mods))
                    if t in mods and t != m and not m.startswith(t + ".")}
    assert find_cycle(graph) is None, find_cycle(graph)


def test_runtime_and_formats_never_import_the_converter():
    mods = modules()
    bad = [(m, t) for m, (tree, pkg) in mods.items() if m.startswith(("llmpack.runtime", "llmpack.formats"))
           for t, _ in imports(m, tree, pkg, set(mods)) if t.startswith("llmpack.converter")]
    assert not bad, bad


def test_every_package_folder_is_installed():
    """pyproject's explicit package list names every folder that has an __init__.py: a subpackage
    missing there is absent from a wheel (`pip install llmpack`) though an editable install finds it."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for folder, pkg in PACKAGES.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            found.add(".".join([pkg, *init.parent.relative_to(ROOT / folder).parts]))
    assert found == listed, (sorted(found - listed), sorted(listed - found))
