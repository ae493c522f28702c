"""Every ```python block of README.md, spec/ and docs/ imports what it uses: a reader can
paste one alone. (The `>>>` examples are executed by test_spec_examples and test_tour.)"""

import ast
import builtins
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "spec").glob("*.md")), *sorted((ROOT / "docs").glob("*.md"))]


def blocks():
    for page in PAGES:
        for i, code in enumerate(re.findall(r"^```python\n(.*?)^```", page.read_text(), re.M | re.S)):
            if not code.lstrip().startswith(">>>"):
                yield pytest.param(code, id=f"{page.relative_to(ROOT)}#{i}")


def free_names(code: str) -> set[str]:
    """Names a snippet reads but neither imports, assigns, defines nor gets from builtins."""
    tree = ast.parse(code)
    bound = set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
            bound |= {a.arg for a in node.args.args + node.args.kwonlyargs} if isinstance(node, ast.FunctionDef) else set()
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
        elif isinstance(node, ast.comprehension):
            bound |= {n.id for n in ast.walk(node.target) if isinstance(n, ast.Name)}
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} - bound


@pytest.mark.parametrize("code", list(blocks()))
def test_a_snippet_imports_what_it_uses(code):
    assert free_names(code) == set()


def test_the_check_finds_a_missing_import():
    assert free_names("@pytest.mark.parametrize('x', [1])\ndef f(x):\n    return np.sin(x)\n") == {"pytest", "np"}
