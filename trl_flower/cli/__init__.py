"""The `trl-flower` command line: one module per subcommand.

Each subcommand module exposes ``make_parser(subparsers)`` (registers its arguments, with help text) and
``main(args)`` (imports torch / transformers inside the function, so ``trl-flower --help`` is instant).
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

# subcommand name -> module under trl_flower.cli
SUBCOMMANDS = {
    "demo": "demo",
    "prepare": "prepare",
    "train": "train",
    "evaluate": "evaluate",
    "sasrec": "sasrec",
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every available subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="trl-flower",
        description="Flow-guided (GFlowNet) fine-tuning of LLM recommenders: prepare data, train, evaluate, demo.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        try:
            mod = import_module(f"trl_flower.cli.{module}")
        except ModuleNotFoundError as err:  # subcommand not shipped in this build
            if err.name == f"trl_flower.cli.{module}":
                continue
            raise
        mod.make_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `trl-flower` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
