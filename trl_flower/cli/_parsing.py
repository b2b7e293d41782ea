"""What the subcommands share around TRL's `TrlParser`: the help layout and the one-line error report."""

from __future__ import annotations

import argparse
import sys

ERROR_EXIT = 2  # argparse's exit status for usage errors; the subcommands use it for every reported error


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's and epilog's line breaks (the examples) and shows each option's default."""


def report_error(prog: str, err: BaseException) -> int:
    """Print `err` as one line (``<prog>: error: <message>``) on stderr and return the error exit status."""
    print(f"{prog}: error: {' '.join(str(err).split())}", file=sys.stderr)
    return ERROR_EXIT
