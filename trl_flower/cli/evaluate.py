"""`trl-flower evaluate`: top-K recommendation (or distribution fitting) of a local model, with the paper's metrics.

Examples::

    trl-flower evaluate --model out/flower --data Movies_and_TV --max-rows 500 --output-dir eval/flower
    trl-flower evaluate --model out/flower --data CDs_and_Vinyl --prompt-mode chat --export-official-json
    trl-flower evaluate --model out/rq1 --task distribution --target movies_100.json --num-samples 2000

Task ``recommend`` (default; flower_reference.md §3.1-3.2): the paper's prompt for every row of ``--split`` (its
history), trie-constrained beam search over ALL catalogue items (K beams, K results), HR/NDCG@1,3,5,10, DGU/MGU@K
against the training-history popularity groups, word entropy H, TTR, invalid and distinct titles.

Task ``distribution`` (§3.3): the history-free prompt, ``--num-samples`` constrained samples over the target's
titles, title- and token-level KL(T‖R), KL(R‖T), JS, and the item-frequency plot.

The prefix tree is the one saved beside the weights (`trl_flower.checkpoint`: every run `trl-flower train` saves
has one) and must be built for this catalogue; a model without one is refused unless ``--rebuild-tree`` asks for one
built from the titles with the tokenizer (terminator: its EOS) or ``--tree`` names a file. The arguments are parsed
by TRL's ``TrlParser`` (``--config file.yaml`` works; flags take ``--max_rows`` or
``--max-rows``). Outputs in ``--output-dir``: ``metrics.json`` (metrics, command, settings, versions, seed,
wall times), ``metrics.md``, ``group_shares.png`` or ``item_frequency.png``, and ``predictions.json`` (official
form) with ``--export-official-json``. The metrics table is printed on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import textwrap

from trl_flower.cli._parsing import HelpFormatter, report_error
from trl_flower.evaluation.pipeline import EvaluateArguments, check_arguments, run_evaluation

__all__ = ["main", "make_parser"]  # the evaluation itself: `trl_flower.evaluation.pipeline`


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    """The `TrlParser` over `EvaluateArguments` (or the ``evaluate`` subcommand of `subparsers`, a TrlParser's)."""
    from trl import TrlParser

    kwargs = dict(
        description=textwrap.fill(
            "Evaluate a local causal LM as a recommender with the Flower paper's protocol: trie-constrained beam "
            "search over every catalogue item and the paper's metrics (NDCG@5, HR@5, DGU@10, MGU@10, H, TTR and "
            "more), or history-free distribution fitting against a target item distribution. Writes metrics.json, "
            "metrics.md and PNG plots, and prints the metrics table.",
            width=100,
        ),
        epilog="examples:\n" + __doc__.split("Examples::\n\n")[1].split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    if subparsers is not None:
        return subparsers.add_parser("evaluate", help="top-K recommendation metrics of a model", **kwargs)
    return TrlParser(EvaluateArguments, prog=prog or "trl-flower evaluate", **kwargs)


def main(argv: list[str] | EvaluateArguments | None = None) -> int:
    """Parse (or take) the arguments and run the evaluation; errors are printed as one line and give exit status 2."""
    try:
        if isinstance(argv, EvaluateArguments):
            args = argv
        else:
            (args,) = make_parser().parse_args_and_config(argv)
        check_arguments(args)
        report = run_evaluation(args)
    except (FileNotFoundError, ValueError, OSError) as err:
        return report_error("trl-flower evaluate", err)
    if report["files"]:  # not on the non-writing processes of a multi-process launch
        print(report["table"])
        print("\nwrote " + ", ".join(str(p) for p in report["files"].values()))
    return 0


if __name__ == "__main__":
    sys.exit(main(make_parser().parse_args()))
