"""The layout's size rule (docs/architecture.md): no module of proxy/, planner/ or cache/ grows
past about 500 lines (generated code aside). The import rules are import-linter's contracts
(pyproject.toml), run by scripts/test."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 550  # "about 500": room for a docstring or two, not for another seam


def _modules() -> list[Path]:
    return sorted(p for package in ("proxy", "planner", "cache") for p in (ROOT / package).rglob("*.py"))


def test_there_are_modules_to_check() -> None:
    assert len(_modules()) > 50


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_module_is_small_enough_to_read_in_one_sitting(path: Path) -> None:
    lines = path.read_text().count("\n")
    assert lines <= LIMIT, f"{path.relative_to(ROOT)} has {lines} lines: cut it along its own seams"
