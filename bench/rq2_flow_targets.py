"""Do Flower's flow targets themselves favour popular items? A model-free look at one RQ2 prefix tree.

The RQ2 knob `item_uniform` (R(i) = 1 for every item) came out *more* head-heavy than the interaction-count reward on
seed 0 (on seed 1 it did not, and the two-seed means are equal). One possible cause is the tree's shape: with uniform
rewards the target probability of a prefix is the share of catalogue titles below it, so if popular titles sat under
large prefixes (a common first word, say) the targets would push the head without any popularity in the reward. This
script measures that on the tree and popularity groups an RQ2 checkpoint was trained with, for the count reward stored
in the tree and for uniform rewards:

the mean target share F(prefix)/F(root) of each item's depth-d prefix, per popularity group (group 0 = most popular,
as in DGU/MGU). (A beam search over the uniform flows alone says nothing more: every item path then has the same
probability 1/N, so which items it returns is decided by rounding.)

Usage::

    python bench/rq2_flow_targets.py --checkpoint /tmp/rq2e3/runs/Movies_and_TV/seed0/flower

It reads the tree and the item popularity groups saved with the checkpoint (`trl_flower.checkpoint.load_tree`,
`load_item_groups`) and prints a markdown report (and writes it with ``--output``). It trains and evaluates nothing
and takes seconds.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np

from trl_flower.checkpoint import load_item_groups, load_tree
from trl_flower.tree import PrefixTree


def prefix_nodes_at_depth(tree: PrefixTree, depth: int) -> np.ndarray:
    """The node on each item's path at `depth` (the item's own terminal node when its path is shorter)."""
    nodes = tree.item_node.copy()
    while True:
        deeper = tree.depth[nodes] > depth
        if not deeper.any():
            return nodes
        nodes = np.where(deeper, tree.parent[nodes], nodes)


def prefix_share_by_group(tree: PrefixTree, groups: np.ndarray, depth: int, num_groups: int) -> list[float]:
    """Mean F(prefix)/F(root) of the items' depth-`depth` prefixes, per popularity group."""
    share = np.exp(tree.log_flow[prefix_nodes_at_depth(tree, depth)] - tree.log_flow[0])
    return [float(share[groups == g].mean()) for g in range(num_groups)]


def report(tree: PrefixTree, groups: np.ndarray, depths: list[int]) -> str:
    """Markdown: per-group prefix shares, for the tree's rewards and for uniform ones."""
    num_groups = int(groups.max()) + 1
    rewards = {"count (the tree's)": tree, "uniform": tree.with_rewards(np.ones(tree.num_items))}
    header = "| reward | depth | " + " | ".join(f"group {g}" for g in range(num_groups)) + " |"
    lines = [
        f"Prefix tree: {tree.num_items} items, {tree.num_nodes} nodes; group 0 = most popular.",
        "",
        "Mean target share F(prefix)/F(root) of each item's prefix at a depth, per popularity group:",
        "",
        header,
        "|" + "---|" * (num_groups + 2),
    ]
    for name, t in rewards.items():
        for d in depths:
            shares = prefix_share_by_group(t, groups, d, num_groups)
            lines.append(f"| {name} | {d} | " + " | ".join(f"{s:.4f}" for s in shares) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint", required=True, type=Path, help="an RQ2 Flower checkpoint dir (its tree and item groups)"
    )
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3], help="prefix depths to report")
    parser.add_argument("--output", type=Path, help="also write the markdown report here")
    args = parser.parse_args(argv)
    tree, groups = load_tree(args.checkpoint), load_item_groups(args.checkpoint)
    if tree is None or groups is None:
        missing = " and ".join(what for what, x in (("no tree", tree), ("no item groups", groups)) if x is None)
        parser.error(f"{args.checkpoint} has {missing}: pass a Flower checkpoint of bench/rq2_recommend.py")
    if groups.shape != (tree.num_items,):
        parser.error(f"the item groups have {groups.shape[0]} entries, the tree {tree.num_items} items")
    command = "python bench/rq2_flow_targets.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    text = f"Command: `{command}`\n\nCheckpoint: `{args.checkpoint}`\n\n" + report(tree, groups, args.depths)
    print(text)
    if args.output:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
