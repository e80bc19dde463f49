"""The layout README's "How it fits together" describes: daro_jax/ is packages, one per role,
beside a few modules every role uses, and no module is long enough to hide two jobs."""

from __future__ import annotations

import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "daro_jax"
MAX_TOP_LEVEL_MODULES = 10  # __init__.py included
MAX_LINES = 400


def test_few_top_level_modules_and_none_over_400_lines():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long
