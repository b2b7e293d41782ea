"""The `trl-flower` command line: one module per subcommand, each a TRL-style script.

Each subcommand module ``trl_flower.cli.<name>`` exposes ``make_parser(subparsers=None)`` (a `TrlParser` over its
argument dataclasses, so ``--config file.yaml`` works everywhere) and ``main(argv=None) -> int``; torch and
transformers are imported inside the functions that need them, so ``trl-flower --help`` is instant. The top level
only dispatches: ``trl-flower <subcommand> <arguments>`` runs ``trl_flower.cli.<subcommand>.main(<arguments>)``.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

SUBCOMMANDS = {
    "demo": "SFT vs Flower on a built-in synthetic catalogue (CPU, minutes)",
    "prepare": "raw Amazon 2018 reviews -> items.tsv + train/valid/test.csv",
    "sasrec": "train the SASRec baseline and export its logits",
    "train": "fine-tune with Flower or a baseline (a TRL script: --config recipe.yaml)",
    "evaluate": "top-K recommendation metrics (or distribution fitting) of a saved run",
}
"""Subcommand name -> one-line help; the module is ``trl_flower.cli.<name>``."""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: ``trl-flower <subcommand> ...`` (each subcommand parses its own arguments)."""
    parser = argparse.ArgumentParser(
        prog="trl-flower",
        description="Flow-guided (GFlowNet) fine-tuning of LLM recommenders: prepare data, train, evaluate, demo. "
        "`trl-flower <subcommand> --help` lists a subcommand's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `trl-flower` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0].startswith("-"):
        parser.parse_args(argv)  # --help exits; any other option is an error
        parser.print_help()
        return 0
    if argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv[:1])  # exits with "invalid choice", listing the subcommands
    module = import_module(f"trl_flower.cli.{argv[0]}")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
