"""`trl-flower prepare`: raw Amazon Review Data (2018) -> items.tsv + train/valid/test.csv (+ stats.json, README.md).

Examples::

    trl-flower prepare --raw-dir ~/amazon2018 --category CDs_and_Vinyl --output-dir data/amazon/CDs_and_Vinyl
    trl-flower prepare --reviews Books.json.gz --meta meta_Books.json.gz --start 2017-10-01 --end 2018-11-01 \\
        --output-dir data/amazon/Books

The output directory loads with ``trl_flower.data.load_amazon(<output-dir>)``. See ``trl_flower/data/prepare.py``
for every preprocessing step.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from trl_flower.cli._parsing import HelpFormatter, report_error
from trl_flower.data.prepare import DEFAULT_WINDOWS

_WINDOWS = "; ".join(f"{c}: {s}..{e}" for c, (s, e) in DEFAULT_WINDOWS.items())


@dataclass
class PrepareArguments:
    """Options of `trl-flower prepare` (each field's ``help`` is the command-line help)."""

    output_dir: str = field(
        metadata={"help": "Directory to write items.tsv, train/valid/test.csv, stats.json and README.md into."}
    )
    category: str | None = field(
        default=None,
        metadata={
            "help": "Amazon 2018 category, e.g. CDs_and_Vinyl. Picks the default time window and, with --raw-dir, "
            "the file names. Default: the reviews file name without .json[.gz]."
        },
    )
    raw_dir: str | None = field(
        default=None,
        metadata={"help": "Directory holding <category>.json.gz and meta_<category>.json.gz (needs --category)."},
    )
    reviews: str | None = field(
        default=None,
        metadata={"help": "Review file (JSON lines with reviewerID, asin, unixReviewTime); overrides --raw-dir."},
    )
    meta: str | None = field(
        default=None, metadata={"help": "Product metadata file (JSON lines with asin, title); overrides --raw-dir."}
    )
    start: str | None = field(
        default=None,
        metadata={"help": f"First day kept, YYYY-MM-DD, 00:00 UTC, inclusive. Defaults per category: {_WINDOWS}."},
    )
    end: str | None = field(default=None, metadata={"help": "First day no longer kept, YYYY-MM-DD (exclusive)."})
    k_core: int = field(
        default=5, metadata={"help": "Minimum interactions per user and per item, filtered iteratively (paper: 5)."}
    )
    max_history: int = field(default=10, metadata={"help": "Maximum number of history items per row (paper: 10)."})
    seed: int = field(default=42, metadata={"help": "Seed of the item-id shuffle (sorted asins, random.Random)."})
    no_progress: bool = field(default=False, metadata={"help": "Hide the progress bars."})
    quiet: bool = field(default=False, metadata={"help": "Do not print the summary (stats.json is still written)."})


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    """The `TrlParser` over `PrepareArguments` (or the ``prepare`` subcommand of `subparsers`, a TrlParser's)."""
    from trl import TrlParser

    kwargs = dict(
        description=textwrap.fill(
            "Turn raw Amazon Review Data (2018) into the splits trl-flower trains and evaluates on: "
            "items.tsv + train/valid/test.csv (plus stats.json and README.md), with the Flower paper's preprocessing "
            "(title cleaning, time window, iterative k-core, at most max-history items, chronological 8:1:1 split, "
            "item ids shuffled with --seed). Malformed lines are skipped, counted and reported.",
            width=100,
        ),
        epilog="examples:\n" + __doc__.split("Examples::\n\n")[1].split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    if subparsers is not None:
        return subparsers.add_parser("prepare", help="raw Amazon 2018 reviews -> train/valid/test splits", **kwargs)
    return TrlParser(PrepareArguments, prog=prog or "trl-flower prepare", **kwargs)


def _input_paths(args: PrepareArguments) -> tuple[Path, Path]:
    reviews, meta = args.reviews, args.meta
    if reviews is None or meta is None:
        if args.raw_dir is None or args.category is None:
            raise ValueError("give --reviews and --meta, or --raw-dir with --category")
        raw = Path(args.raw_dir).expanduser()
        reviews = reviews or raw / f"{args.category}.json.gz"
        meta = meta or raw / f"meta_{args.category}.json.gz"
    return Path(reviews).expanduser(), Path(meta).expanduser()


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and run the preparation; errors are printed as one line and give exit status 2."""
    from trl_flower.data.prepare import prepare_amazon

    try:
        (args,) = make_parser().parse_args_and_config(argv)
        reviews, meta = _input_paths(args)
        prepare_amazon(
            reviews,
            meta,
            args.output_dir,
            category=args.category,
            start=args.start,
            end=args.end,
            k_core=args.k_core,
            max_history=args.max_history,
            seed=args.seed,
            progress=not args.no_progress,
            verbose=not args.quiet,
        )
    except (FileNotFoundError, ValueError) as err:
        return report_error("trl-flower prepare", err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
