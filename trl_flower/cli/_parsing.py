"""What the subcommands share around TRL's `TrlParser`: the help layout and the one-line error report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ERROR_EXIT = 2  # argparse's exit status for usage errors; the subcommands use it for every reported error


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's and epilog's line breaks (the examples) and shows each option's default."""


def report_error(prog: str, err: BaseException) -> int:
    """Print `err` as one line (``<prog>: error: <message>``) on stderr and return the error exit status."""
    print(f"{prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
    return ERROR_EXIT


def check_category(dataset: str, category: str | None, data_flag: str) -> None:
    """Before anything loads: a dataset whose prompt category words are unknown needs ``--category``.

    Args:
        dataset: the dataset option's value (a category name or a dataset directory).
        category: the ``--category`` value, or None.
        data_flag: the dataset option's flag, named in the error (``--data``, ``--dataset_name``).
    """
    if category:
        return
    from trl_flower.data.prompts import CATEGORY_WORDS

    name = Path(dataset).expanduser().name  # the name `load_amazon` gives the dataset (its directory's)
    if name.lower() not in {known.lower() for known in CATEGORY_WORDS}:
        raise ValueError(
            f"{data_flag} {dataset}: the prompt names the item category, and its words are known only for "
            f"{sorted(CATEGORY_WORDS)}, not for {name!r}. Pass --category with the plural noun the prompt should "
            "use, e.g. --category books."
        )
