"""Command-line parsers built from option dataclasses: one source of truth for names, types, defaults and help.

An options class declares its fields with :func:`option` (help text, group, choices on the field, as peft's
configs carry theirs); :func:`add_arguments` turns them into ``argparse`` flags and :func:`from_args` turns the
parsed flags back into the dataclass::

    @dataclass
    class PrepareOptions:
        out: Path = option(help="prepared dataset folder", required=True)
        height: int = option(480, help="frame height", group="size")

    parser = argparse.ArgumentParser()
    add_arguments(parser, PrepareOptions)
    options = from_args(PrepareOptions, parser.parse_args(argv))

Flags are the field names with dashes (``num_frames`` -> ``--num-frames``). A ``bool`` field that defaults to
False is a switch (``--force``); one that defaults to True, or to None (``Optional[bool]``: automatic), gets
``--x / --no-x``. ``list[...]`` fields take one or more values. ``Optional[X]`` fields default to None, which
the options class reads as "automatic" and says so in the help.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["option", "add_arguments", "from_args", "cli_fields"]

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, *, help: str, default_factory: Any = _MISSING, group: Optional[str] = None,
           choices: Optional[Sequence[Any]] = None, flag: Optional[str] = None, metavar: Optional[str] = None,
           required: bool = False, cli: bool = True):
    """A dataclass field with its command-line description.

    Args:
        help: what the option does (shown by ``--help``; the default is appended automatically).
        group: the ``--help`` section it is listed under.
        choices: the allowed values (checked by the parser; the options class validates them again).
        flag: the flag name when it is not the field name with dashes.
        required: the parser demands the flag (the dataclass field still needs a value: pass a placeholder).
        cli: False for fields that only the Python API sets.
    """
    metadata = {"help": help, "group": group, "choices": tuple(choices) if choices is not None else None,
                "flag": flag, "metavar": metavar, "required": required, "cli": cli}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def cli_fields(cls) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are command-line options."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", False)]


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _unwrap(tp) -> tuple[Any, bool, Optional[tuple]]:
    """(element type, is a list, Literal choices) of an annotation, Optional[...] removed."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _unwrap(args[0])
        return str, False, None
    if origin in (list, tuple, Sequence):
        inner, _, choices = _unwrap(typing.get_args(tp)[0])
        return inner, True, choices
    if origin is typing.Literal:
        values = typing.get_args(tp)
        return type(values[0]), False, values
    return tp, False, None


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _describe(default: Any) -> str:
    if isinstance(default, Path):
        return str(default)
    if isinstance(default, (list, tuple)):
        return " ".join(str(v) for v in default) or "none"
    return str(default)


def add_arguments(parser: argparse.ArgumentParser, cls, titles: Optional[dict[str, str]] = None) -> None:
    """Add a flag for each command-line field of the dataclass ``cls`` to ``parser``, in declaration order,
    under argument groups named by the fields' ``group`` (``titles`` may rename them)."""
    hints = typing.get_type_hints(cls)
    groups: dict[Optional[str], Any] = {None: parser}
    for f in cli_fields(cls):
        meta = f.metadata
        group_name = meta.get("group")
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group((titles or {}).get(group_name, group_name))
        target = groups[group_name]
        kind, is_list, literal = _unwrap(hints[f.name])
        default = _default_of(f)
        help_text = meta["help"]
        kwargs: dict[str, Any] = {"dest": f.name, "default": default}
        if kind is bool and not is_list:
            # None: automatic unless told either way, so both flags are needed.
            kwargs["action"] = argparse.BooleanOptionalAction if default or default is None else "store_true"
        else:
            kwargs["type"] = kind if kind in (int, float, Path) else str
            choices = meta.get("choices") or literal
            if choices:
                kwargs["choices"] = list(choices)
            if is_list:
                kwargs["nargs"] = "+"
            if meta.get("metavar"):
                kwargs["metavar"] = meta["metavar"]
            if default is not None and default != [] and not meta.get("required"):
                help_text = f"{help_text} (default: {_describe(default)})"
        if meta.get("required"):
            kwargs["required"] = True
        kwargs["help"] = help_text.replace("%", "%%")
        target.add_argument(_flag(f), **kwargs)


def from_args(cls, args: argparse.Namespace, **overrides):
    """An instance of ``cls`` from parsed flags (fields the parser does not know keep their defaults);
    ``overrides`` win over the flags."""
    values = {f.name: getattr(args, f.name) for f in cli_fields(cls) if hasattr(args, f.name)}
    values.update(overrides)
    return cls(**values)
