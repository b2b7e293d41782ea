"""Dataclass → argparse plumbing shared by the subcommands (one option per field, help from the field metadata).

Each subcommand describes its options as a dataclass whose fields carry ``metadata={"help": ..., "choices": ...,
"type": ...}``; the flag is ``--field-name``. A field without a default is required, a ``bool`` field defaulting to
False is a switch, and ``X | None`` fields take values of type X.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, fields
from typing import Any, TypeVar

T = TypeVar("T")


def _value_type(hint: Any) -> type:
    """The argparse `type` of a field annotation: int/float/str, unwrapping ``X | None``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        non_none = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = non_none[0] if len(non_none) == 1 else str
    return hint if hint in (int, float, str) else str


def subcommand_parser(
    subparsers: argparse._SubParsersAction | None, name: str, help: str, **kwargs: Any
) -> argparse.ArgumentParser:
    """Register `name` on `subparsers` (the `trl-flower` CLI), or build a standalone parser when it is None."""
    if subparsers is None:
        return argparse.ArgumentParser(prog=f"trl-flower {name}", **kwargs)
    return subparsers.add_parser(name, help=help, **kwargs)


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> argparse.ArgumentParser:
    """Add one ``--field-name`` option per field of dataclass `cls`, with the field's help, default and choices."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        meta = f.metadata
        choices = meta.get("choices")
        if f.default is MISSING:
            kind = meta.get("type") or _value_type(hints[f.name])
            parser.add_argument(flag, dest=f.name, type=kind, required=True, choices=choices, help=meta["help"])
        elif hints[f.name] is bool:
            if f.default:
                raise TypeError(f"{cls.__name__}.{f.name}: a bool option must default to False (it is a switch)")
            parser.add_argument(flag, dest=f.name, action="store_true", help=meta["help"])
        else:
            kind = meta.get("type") or _value_type(hints[f.name])
            shown = "" if f.default is None else f" (default: {f.default})"
            parser.add_argument(
                flag,
                dest=f.name,
                type=kind,
                default=f.default,
                choices=choices,
                metavar=f.name.upper() if choices is None else None,
                help=meta["help"] + shown,
            )
    return parser


def to_dataclass(args: argparse.Namespace | T, cls: type[T]) -> T:
    """The `cls` instance behind parsed `args` (returned unchanged if it already is one)."""
    if isinstance(args, argparse.Namespace):
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})
    return args
