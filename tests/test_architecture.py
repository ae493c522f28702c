"""The layers of README.md's "Architecture" table hold: every module of the package is in
exactly one layer, every import points to its own layer or one the table lets it use
(transitively), and no modules import each other in a circle."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "refattn"


def read_layers() -> list[tuple[str, list[str], list[str]]]:
    """``(layer, modules, imports from)`` per row of the README's table, bottom to top."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Architecture", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| layer")]
    layers = []
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        layers.append((cells[0], re.findall(r"`([^`]+)`", cells[1]), re.findall(r"\b[a-z]+\b", cells[3])))
    return layers


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def layer_of(name: str, layers) -> str:
    matches = []
    for layer, entries, _ in layers:
        for entry in entries:
            if entry == "refattn":
                hit = name == "refattn"
            elif entry.endswith("/"):
                hit = name == f"refattn.{entry[:-1]}" or name.startswith(f"refattn.{entry[:-1]}.")
            else:
                hit = name == f"refattn.{entry}"
            if hit:
                matches.append(layer)
    assert len(matches) == 1, f"{name} is in {len(matches)} layers of the README's table: {matches}"
    return matches[0]


def imports(name: str, path: Path, known: dict) -> set[str]:
    """The package's modules that ``name`` imports, at module or function level."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [f"{target}.{a.name}" for a in node.names]
            candidates = [c if c in known else target for c in candidates]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        for c in candidates:
            while c and c not in known and "." in c:
                c = c.rsplit(".", 1)[0]
            if c in known and c != name:
                out.add(c)
    return out


LAYERS = read_layers()
MODULES = modules()


def test_the_table_names_the_layers_of_design():
    names = [layer for layer, _, _ in LAYERS]
    assert names[0] == "core" and names[-1] == "cli"
    for needed in ("patterns", "backends", "golden", "verify", "study", "train", "bench"):
        assert needed in names


def test_every_module_is_in_exactly_one_layer():
    for name in MODULES:
        layer_of(name, LAYERS)


def test_every_listed_module_exists():
    for layer, entries, _ in LAYERS:
        for entry in entries:
            name = "refattn" if entry == "refattn" else f"refattn.{entry.rstrip('/')}"
            assert name in MODULES, f"the README's {layer!r} layer lists {entry!r}, which does not exist"


def allowed_layers() -> dict[str, set[str]]:
    """Each layer, its own and every layer it may import from, transitively."""
    direct = {layer: set(deps) for layer, _, deps in LAYERS}
    for layer, deps in direct.items():
        unknown = deps - set(direct)
        assert not unknown, f"layer {layer!r} imports from unknown layers {unknown}"
    closure = {}
    for layer in direct:
        seen, todo = {layer}, list(direct[layer])
        while todo:
            d = todo.pop()
            if d not in seen:
                seen.add(d)
                todo.extend(direct[d])
        closure[layer] = seen
    return closure


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down(name):
    allowed = allowed_layers()
    mine = layer_of(name, LAYERS)
    for target in imports(name, MODULES[name], MODULES):
        theirs = layer_of(target, LAYERS)
        assert theirs in allowed[mine], f"{name} ({mine}) imports {target} ({theirs}): an import up the layers"


def test_no_import_circles():
    graph = {name: {t for t in imports(name, path, MODULES)
                    if not t.startswith(name + ".") and not name.startswith(t + ".")}
             for name, path in MODULES.items()}
    state: dict[str, int] = {}            # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_checks_catch_an_upward_import(tmp_path):
    """The check itself can fail: a core module importing the verifier is caught."""
    fake = tmp_path / "mask.py"
    fake.write_text("from .verify import runner\n")
    targets = imports("refattn.mask", fake, MODULES)
    assert "refattn.verify.runner" in targets
    assert layer_of("refattn.verify.runner", LAYERS) not in allowed_layers()[layer_of("refattn.mask", LAYERS)]
