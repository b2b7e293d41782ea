"""Lazy package exports (PEP 562): a package lists ``name -> module`` and gets ``__getattr__``/``__all__``.

Importing a package then stays cheap: heavy dependencies (TRL, datasets) are imported only when a name that needs
them is first used.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from typing import Any


def lazy_exports(package: str, names: dict[str, str]) -> tuple[Callable[[str], Any], list[str]]:
    """``(__getattr__, __all__)`` for `package`, importing ``names[name]`` (a module path) on first access."""

    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(import_module(names[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__, list(names)
