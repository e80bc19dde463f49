"""The library runs one algorithm on every platform: no code in daro_jax/ asks which
backend it runs on (`jax.default_backend()`, `device.platform`) except to choose a value
listed in ALLOWED with its reason, so the path CI runs numerically on CPU is the path a TPU
runs."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "daro_jax"

# (file relative to daro_jax/, enclosing function) → the value it chooses by platform.
ALLOWED: dict[tuple[str, str], str] = {}


def platform_queries(source: str) -> list[tuple[str, int]]:
    """(enclosing function, line) of every `default_backend(...)` call and `.platform`
    attribute in `source`."""
    found = []

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            function = node.name
        called = isinstance(node, ast.Call) and (
            getattr(node.func, "attr", None) == "default_backend"
            or getattr(node.func, "id", None) == "default_backend"
        )
        if called or (isinstance(node, ast.Attribute) and node.attr == "platform"):
            found.append((function, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(ast.parse(source), "<module>")
    return found


def test_the_scan_finds_platform_queries():
    source = (
        "import jax\n"
        "def f(x):\n"
        "    if jax.default_backend() == 'cpu':\n"
        "        return x\n"
        "    return [d for d in jax.devices() if d.platform == 'tpu']\n"
        "from jax import default_backend\n"
        "KIND = default_backend()\n"
    )
    assert platform_queries(source) == [("f", 3), ("f", 5), ("<module>", 7)]


def test_library_code_does_not_branch_on_the_platform():
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = str(path.relative_to(PACKAGE))
        for function, line in platform_queries(path.read_text()):
            if (name, function) not in ALLOWED:
                hits.append(f"daro_jax/{name}:{line} in {function}")
    assert not hits, (
        "platform-dependent code (one algorithm on every platform; a value that must differ "
        f"goes into ALLOWED with its reason): {hits}"
    )
