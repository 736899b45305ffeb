"""Every pinned dependency is used: each of `[project] dependencies` is imported by graph/, models/
or serving/, each of the `[test]` extra by those or tests/ and scripts/; ruff, run as a command
(`make lint`), is the one exception."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {"ruff"}  # run, never imported


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported(*dirs: str) -> set[str]:
    """Top-level modules imported anywhere in `dirs` (function-level imports too)."""
    found: set[str] = set()
    for d in dirs:
        for path in (ROOT / d).rglob("*.py"):
            found |= set(re.findall(r"^\s*(?:import|from)\s+(\w+)", path.read_text(), re.MULTILINE))
    return found


def _unused(requirements: list[str], imported: set[str]) -> list[str]:
    modules: dict[str, set[str]] = {}  # distribution -> the top-level modules it installs
    for module, dists in importlib.metadata.packages_distributions().items():
        for dist in dists:
            modules.setdefault(_normal(dist), set()).add(module)
    names = [_normal(re.match(r"[\w.-]+", r).group(0)) for r in requirements]
    return [n for n in names if n not in COMMANDS and not modules.get(n, set()) & imported]


def test_every_pinned_dependency_is_imported():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    code = _imported("graph", "models", "serving")
    assert _unused(project["dependencies"], code) == []
    assert _unused(project["optional-dependencies"]["test"], code | _imported("tests", "scripts")) == []
