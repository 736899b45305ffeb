"""Command lines generated from typed config dataclasses: each field becomes one `--kebab-case`
option whose type and default come from the field and whose help is the comment beside it, so no
default is ever written twice. Nested dataclass fields become option groups.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from typing import Any


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in the class source, the options' help text: the `# comment` beside
    it (or beside its value, where a formatter wrapped it in parentheses), else the comment lines
    right above it."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):  # no source (frozen app): options without help text
        return {}
    field = re.compile(r"^\s+(\w+)\s*:[^#]*?(?:#\s*(.+))?$")
    out: dict[str, str] = {}
    above: list[str] = []
    lines = source.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("#"):
            above.append(line.strip().removeprefix("#").strip())
            continue
        m = field.match(line)
        if m and not line.rstrip().endswith(":"):  # not a method or a nested block
            beside = m[2]
            if beside is None and line.rstrip().endswith("(") and i + 1 < len(lines) and "#" in lines[i + 1]:
                beside = lines[i + 1].split("#", 1)[1]
            text = beside.strip() if beside else " ".join(above)
            if text:
                out[m[1]] = text
        above = []
    return out


def _scalar_type(hint: Any) -> tuple[type, bool]:
    """-> (the parser type of a field annotation, whether None is allowed)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return inner, True
    return hint, False


def add_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    prefix: str = "",
    *,
    skip: tuple[str, ...] = (),
    choices: dict[str, tuple[str, ...]] | None = None,
) -> None:
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    defaults = cls()
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            group = parser.add_argument_group(f"{field.name} options")
            add_options(group, hint, prefix=f"{prefix}{field.name}.", skip=skip, choices=choices)
            continue
        kind, optional = _scalar_type(hint)
        default = getattr(defaults, field.name)
        kwargs: dict[str, Any] = {"dest": prefix + field.name, "default": default}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
            kwargs["metavar"] = field.name.upper()
        if choices and field.name in choices:
            kwargs["choices"] = choices[field.name]
        shown = "none" if default is None and optional else default
        help_text = comments.get(field.name, "")
        kwargs["help"] = f"{help_text} (default: {shown})" if help_text else f"(default: {shown})"
        parser.add_argument("--" + field.name.replace("_", "-"), **kwargs)


def build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Parsed option values -> an instance of `cls` (fields without an option keep their default)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            kwargs[field.name] = build(hints[field.name], values, prefix=f"{prefix}{field.name}.")
        elif prefix + field.name in values:
            kwargs[field.name] = values[prefix + field.name]
    return cls(**kwargs)
