"""Evaluation across processes: each process decodes a share of the prompts; all gather the lists in order.

Under ``accelerate launch --num_processes N`` (or ``torchrun``), :func:`decode_across_processes` gives process r the
decoding batches r, r + N, r + 2N, ... of the single-process run: :func:`~trl_flower.evaluation.recommend.recommend`
sorts prompts longest first and cuts that order into batches of ``batch_size``; dealing out whole batches (instead
of single prompts) means every prompt is decoded in exactly the batch, with exactly the padding, that one process
would use. The gathered lists and scores are therefore the single-process ones bit for bit, not just up to float
rounding, and so are the metrics, predictions and report computed from them (tested in the distributed group with
2 CPU processes). Dealing batches round-robin also balances the work: consecutive batches have similar lengths.

Outside a multi-process launch (``WORLD_SIZE`` unset or 1) everything here is a plain function call. Sharding also
needs every process to take part, so it happens only when the evaluation owns the launch: no process group exists
yet (``trl-flower evaluate`` under ``accelerate launch``). Inside a job that already has one, e.g. a training script
that evaluates its saved model on the main process only (``examples/flower_cds.py``), the calling process decodes
every prompt itself: waiting for processes that never come would hang.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

import numpy as np

from trl_flower.tree import PrefixTree

__all__ = ["decode_across_processes", "is_main_process", "process_device", "shard_batches", "world"]


def world() -> tuple[int, int]:
    """(rank, world size) of this process from the launcher's environment; (0, 1) for a plain process."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0, 1
    return (rank, size) if size > 1 else (0, 1)


def is_main_process() -> bool:
    """True in the process that writes files (rank 0, or the only process)."""
    return world()[0] == 0


def process_device(device: str) -> str:
    """``"cuda"`` becomes this process's GPU (``cuda:LOCAL_RANK``) in a multi-process launch; anything else as is."""
    if device == "cuda" and world()[1] > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def shard_batches(lengths: Sequence[int], batch_size: int, rank: int, world_size: int) -> np.ndarray:
    """Indices of the prompts process `rank` decodes: the single-process batches ``rank, rank + world_size, ...``.

    The batches are those of ``recommend``: prompts sorted by token count, longest first (a stable sort), cut every
    `batch_size`. The returned indices are in that order, so ``recommend`` on them forms the same batches again.

    Example:
        >>> shard_batches([3, 9, 5, 9, 1], batch_size=2, rank=0, world_size=2).tolist()  # batches [1,3] [2,0] [4]
        [1, 3, 4]
        >>> shard_batches([3, 9, 5, 9, 1], batch_size=2, rank=1, world_size=2).tolist()
        [2, 0]
    """
    order = np.argsort([-int(n) for n in lengths], kind="stable")  # the order recommend decodes in
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    mine = batches[rank::world_size]
    return np.concatenate(mine) if mine else np.empty(0, dtype=np.int64)


def decode_across_processes(
    decode: Callable[[np.ndarray], object],
    lengths: Sequence[int],
    batch_size: int,
    tree: PrefixTree,
    shard: bool | None = None,
):
    """``decode(all prompt indices)`` computed by every process of the launch together; the full result on all.

    Args:
        decode: indices [n] of prompts -> :class:`~trl_flower.evaluation.recommend.Recommendations` for them, in
            that order (e.g. a closure over ``recommend`` or ``recommend_d3`` and per-prompt arrays).
        lengths: token count of every prompt (as ``recommend`` tokenises it), to rebuild its batches.
        batch_size: ``recommend``'s batch size.
        tree: the prefix tree the recommendations come from.
        shard: True: every process of the launch calls this and shares the work; False: decode everything here;
            None (default): True in a multi-process launch without a process group yet, else False (see the
            module docstring).

    Returns:
        Recommendations for all prompts, in prompt order, identical to ``decode(np.arange(len(lengths)))``.
    """
    import torch.distributed as dist

    rank, size = world()
    if shard is None:
        shard = size > 1 and not (dist.is_available() and dist.is_initialized())
    if size == 1 or not shard:
        return decode(np.arange(len(lengths)))
    from trl_flower.evaluation.recommend import Recommendations

    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend="gloo")  # env:// from the launcher (MASTER_ADDR, MASTER_PORT, ...)
    group = dist.new_group(backend="gloo")  # Python objects travel on CPU whatever the model's backend
    mine = shard_batches(lengths, batch_size, rank, size)
    print(f"[trl-flower] process {rank}/{size}: decoding {mine.size} of {len(lengths)} prompts", file=sys.stderr)
    local = decode(mine) if mine.size else None
    part = None if local is None else (mine, local.item_ids, local.nodes, local.scores, local.titles)
    parts: list = [None] * size
    dist.all_gather_object(parts, part, group=group)
    dist.destroy_process_group(group)
    if created:  # ours: nothing else will use it (files are written by rank 0 alone)
        dist.destroy_process_group()
    parts = [p for p in parts if p is not None]
    index = np.concatenate([p[0] for p in parts])  # [U] prompt of each gathered row
    where = np.empty_like(index)
    where[index] = np.arange(index.size)  # row of each prompt
    titles = None if parts[0][4] is None else [row for p in parts for row in p[4]]
    return Recommendations(
        item_ids=np.concatenate([p[1] for p in parts])[where],
        nodes=np.concatenate([p[2] for p in parts])[where],
        scores=np.concatenate([p[3] for p in parts])[where],
        titles=None if titles is None else [titles[i] for i in where],
        tree=tree,
    )
