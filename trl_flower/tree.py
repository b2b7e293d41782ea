"""The prefix tree (trie) of all catalogue items over the LLM's tokens, with flows.

Every item is a *token path*: the tokens the model emits after the prompt, ending in exactly one terminator token
⊤ (the tokenizer's EOS by default). The tree has one node per distinct prefix of these paths; the node reached after
⊤ is a *terminal* node and holds the item ids whose path ends there (duplicate titles share a path and merge).

Flows (Flower, arXiv 2503.07377, Eq. 8): with a reward R(i) ≥ 0 per item,

    F(s) = Σ_{items i whose path passes through s} R(i),

so F(root) = Z = Σ_i R(i), F(terminal) = reward of the items ending there, and F(s) = Σ_{children c} F(c) with
termination being just another child. The *process reward* of an action a at state s is r(a | s) = F(s·a) / F(s);
over the children of s it sums to 1. Flows are stored as log F in float64 (−inf where the flow is zero).

Layout (compact integer arrays, no dicts of strings; read nanoGPT's `prepare.py` for the spirit):
nodes are numbered level by level and, inside a level, by (parent, token). Hence

* node 0 is the root, and ``parent[n] < n``;
* the children of node n are the contiguous id range ``first_child[n] : first_child[n] + num_children[n]``,
  sorted by token;
* ``key[n] = parent[n] * V + token[n]`` is strictly increasing in n, so advancing a batch of nodes by a batch of
  tokens is one ``searchsorted``.

The build is vectorised per depth (one ``np.unique`` per level), so a million items build in seconds.

Zero rewards: an item with R(i) = 0 keeps its place in the tree (it can still be an SFT target and an evaluation
candidate), but every node whose flow is 0 has log F = −inf and a process reward of −inf. Samplers that follow the
flow must exclude such nodes (``allowed_mask(..., positive_flow_only=True)``); add a smoothing constant to the rewards
(``with_rewards(rewards + eps)``) to keep them reachable instead.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = 0
INVALID = -1


@dataclass(frozen=True)
class _TreeTensors:
    """Torch views of the tree arrays on one device (built once per device and cached)."""

    parent: torch.Tensor  # [N]
    token: torch.Tensor  # [N]
    first_child: torch.Tensor  # [N]
    num_children: torch.Tensor  # [N]
    key: torch.Tensor  # [N-1] keys of nodes 1..N-1 (sorted)
    log_flow: torch.Tensor  # [N] float64
    is_terminal: torch.Tensor  # [N] bool
    terminal_item: torch.Tensor  # [N] representative (smallest) item id of a terminal node, -1 elsewhere


class PrefixTree:
    """A prefix tree over item token paths, stored as flat arrays, with per-node log flows.

    Build it with :meth:`from_token_paths` (pre-tokenised items) or :meth:`from_titles` (strings and a tokenizer).
    All query methods take and return torch tensors and are batched; they never loop in Python over items or tokens.

    Attributes:
        terminator_id: the token that ends every item path.
        num_items: number of catalogue items (item ids are ``0 .. num_items-1``).
        num_nodes: number of nodes including the root.
        parent, token, depth, first_child, num_children: int64 arrays of length ``num_nodes`` (root: parent and
            token are -1).
        item_node: int64 array ``[num_items]``: the terminal node of each item.
        item_length: int64 array ``[num_items]``: path length of each item, terminator included.
        item_rewards: float64 array ``[num_items]``.
        log_flow: float64 array ``[num_nodes]``: log F(node).

    Example:
        >>> tree = PrefixTree.from_token_paths([[5, 6, 2], [5, 2], [7, 2]], terminator_id=2, item_rewards=[3, 1, 4])
        >>> tree.num_nodes, float(tree.log_flow[0].round(4)) == float(np.log(8).round(4))
        (7, True)
        >>> tree.allowed_tokens(torch.tensor([0]))
        [[5, 7]]
        >>> node = tree.advance(torch.tensor([0]), torch.tensor([5]))
        >>> tree.log_process_reward(node, torch.tensor([2])).exp()  # terminate after [5]: R=1 of F=4
        tensor([0.2500], dtype=torch.float64)
    """

    def __init__(
        self,
        *,
        terminator_id: int,
        parent: np.ndarray,
        token: np.ndarray,
        depth: np.ndarray,
        first_child: np.ndarray,
        num_children: np.ndarray,
        item_node: np.ndarray,
        item_length: np.ndarray,
        item_rewards: np.ndarray | None = None,
    ) -> None:
        self.terminator_id = int(terminator_id)
        self.parent = parent
        self.token = token
        self.depth = depth
        self.first_child = first_child
        self.num_children = num_children
        self.item_node = item_node
        self.item_length = item_length
        self.num_nodes = int(parent.shape[0])
        self.num_items = int(item_node.shape[0])
        self.vocab_bound = int(token.max()) + 1 if self.num_nodes > 1 else 1
        # items grouped by terminal node (CSR): items_of_node(n) = terminal_items[ptr[n]:ptr[n+1]]
        order = np.argsort(item_node, kind="stable")
        self.terminal_items = order.astype(np.int64)
        self.terminal_ptr = np.searchsorted(item_node[order], np.arange(self.num_nodes + 1)).astype(np.int64)
        self.is_terminal = np.zeros(self.num_nodes, dtype=bool)
        self.is_terminal[item_node] = True
        self._cache: dict[torch.device, _TreeTensors] = {}
        self.item_rewards = np.empty(0)
        self.log_flow = np.empty(0)
        self._set_rewards(np.ones(self.num_items) if item_rewards is None else item_rewards)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_token_paths(
        cls,
        paths: Sequence[Sequence[int]],
        terminator_id: int,
        item_rewards: Sequence[float] | np.ndarray | None = None,
        item_names: Sequence[str] | None = None,
    ) -> PrefixTree:
        """Build the tree from one token path per item (item id = position in `paths`).

        Args:
            paths: token ids of each item, each ending with exactly one `terminator_id` (and containing it nowhere
                else). Identical paths (duplicate titles) are merged into one terminal node.
            terminator_id: the termination token ⊤.
            item_rewards: R(i) ≥ 0 per item (default: 1 for every item).
            item_names: optional titles, used only to make error messages name the item.

        Raises:
            ValueError: for an empty path, a path without the terminator at its end, or with a terminator inside.
        """
        flat, offsets = _flatten_paths(paths)
        _validate_paths(flat, offsets, terminator_id, item_names)
        return cls._build(flat, offsets, terminator_id, item_rewards)

    @classmethod
    def from_flat(
        cls,
        flat_tokens: np.ndarray,
        offsets: np.ndarray,
        terminator_id: int,
        item_rewards: Sequence[float] | np.ndarray | None = None,
        item_names: Sequence[str] | None = None,
    ) -> PrefixTree:
        """Like :meth:`from_token_paths` but from a flat token array and ``offsets`` [num_items + 1] (CSR).

        This is the fast path for large catalogues: no Python list per item is ever created.
        """
        flat = np.asarray(flat_tokens, dtype=np.int64)
        offsets = np.asarray(offsets, dtype=np.int64)
        _validate_paths(flat, offsets, terminator_id, item_names)
        return cls._build(flat, offsets, terminator_id, item_rewards)

    @classmethod
    def from_titles(
        cls,
        titles: Sequence[str],
        tokenizer,
        terminator_id: int | None = None,
        item_rewards: Sequence[float] | np.ndarray | None = None,
        batch_size: int = 10_000,
    ) -> PrefixTree:
        """Tokenise `titles` (no special tokens) and append the terminator; see :func:`title_token_paths`."""
        flat, offsets, term = title_token_paths(titles, tokenizer, terminator_id, batch_size=batch_size)
        return cls._build(flat, offsets, term, item_rewards)

    @classmethod
    def _build(cls, flat, offsets, terminator_id, item_rewards) -> PrefixTree:
        lengths = np.diff(offsets)  # [M]
        num_items = lengths.shape[0]
        vocab = int(flat.max()) + 1
        # node of each item's prefix, level by level; key = parent * V + token is unique per node
        current = np.zeros(num_items, dtype=np.int64)  # all items start at the root
        parents, tokens, depths = [np.array([-1])], [np.array([-1])], [np.array([0])]
        next_id = 1
        active = np.arange(num_items)
        for d in range(int(lengths.max())):
            active = active[lengths[active] > d]
            keys = current[active] * vocab + flat[offsets[active] + d]  # [A]
            uniq, inverse = np.unique(keys, return_inverse=True)  # sorted by (parent, token)
            current[active] = next_id + inverse
            parents.append(uniq // vocab)
            tokens.append(uniq % vocab)
            depths.append(np.full(uniq.shape[0], d + 1))
            next_id += uniq.shape[0]
        parent = np.concatenate(parents).astype(np.int64)
        token = np.concatenate(tokens).astype(np.int64)
        depth = np.concatenate(depths).astype(np.int64)
        num_children = np.bincount(parent[1:], minlength=next_id).astype(np.int64)
        # children of n are contiguous and ordered, so the first child is the first node whose parent is n
        first_child = np.searchsorted(parent[1:], np.arange(next_id)).astype(np.int64) + 1
        first_child[num_children == 0] = -1
        return cls(
            terminator_id=terminator_id,
            parent=parent,
            token=token,
            depth=depth,
            first_child=first_child,
            num_children=num_children,
            item_node=current,
            item_length=lengths.astype(np.int64),
            item_rewards=item_rewards,
        )

    # ------------------------------------------------------------------ rewards and flows

    def _set_rewards(self, item_rewards) -> None:
        rewards = np.asarray(item_rewards, dtype=np.float64)
        if rewards.shape != (self.num_items,):
            raise ValueError(f"item_rewards must have one value per item ({self.num_items}), got shape {rewards.shape}")
        bad = np.flatnonzero(~np.isfinite(rewards) | (rewards < 0))
        if bad.size:
            raise ValueError(
                f"item rewards must be finite and >= 0; item {int(bad[0])} has {float(rewards[bad[0]])!r} "
                f"({bad.size} bad values). Clip or drop them before building the tree."
            )
        self.item_rewards = rewards
        with np.errstate(divide="ignore"):
            # summed in log space: rewards near the float64 maximum (1e308) would overflow a plain sum to inf
            self.log_flow = self.log_aggregate_to_nodes(np.log(rewards))
        self._cache.clear()

    def with_rewards(self, item_rewards: Sequence[float] | np.ndarray) -> PrefixTree:
        """A tree with the same structure (arrays shared, not copied) and new item rewards / flows."""
        clone = object.__new__(PrefixTree)
        clone.__dict__.update(self.__dict__)
        clone._cache = {}
        clone._set_rewards(item_rewards)
        return clone

    def aggregate_to_nodes(self, item_values: np.ndarray | torch.Tensor):
        """Sum per-item values up the tree: ``out[..., n] = Σ_{items i below n} values[..., i]``.

        Works for one vector ``[num_items]`` (numpy or torch) or a batch ``[B, num_items]`` (e.g. per-user rewards
        R(i)·s(u, i) for the exact personalised flows, or auxiliary-model probabilities for guided decoding).
        Exact level-by-level sums (no prefix-sum cancellation); cost O(B · num_nodes).
        """
        is_torch = isinstance(item_values, torch.Tensor)
        values = item_values if is_torch else torch.as_tensor(np.asarray(item_values))
        squeeze = values.dim() == 1
        values = values.unsqueeze(0) if squeeze else values  # [B, M]
        parent = torch.as_tensor(self.parent, device=values.device)
        item_node = torch.as_tensor(self.item_node, device=values.device)
        node_vals = values.new_zeros(values.shape[0], self.num_nodes)  # [B, N]
        node_vals.index_add_(1, item_node, values)
        for lo, hi in reversed(self._level_bounds()[1:]):  # deepest level first; root level has no parent
            node_vals.index_add_(1, parent[lo:hi], node_vals[:, lo:hi].clone())
        node_vals = node_vals.squeeze(0) if squeeze else node_vals
        return node_vals if is_torch else node_vals.numpy()

    def log_aggregate_to_nodes(self, log_item_values: np.ndarray | torch.Tensor):
        """Log-sum-exp per-item log values up the tree: ``out[..., n] = log Σ_{items i below n} exp(values[..., i])``.

        The log-space twin of :meth:`aggregate_to_nodes`, for values whose plain sum would overflow or underflow
        (item rewards near 1e308, per-user rewards R(i)·p_u(i)^β far below 1e-308). −inf entries are zeros; a node
        with nothing below it gets −inf. Exact level by level (a max-shifted sum per parent); cost O(B · num_nodes).

        Works for one vector ``[num_items]`` (numpy or torch) or a batch ``[B, num_items]``; float64 in, float64 out.

        Example:
            >>> tree = PrefixTree.from_token_paths([[5, 6, 2], [5, 2], [7, 2]], terminator_id=2)
            >>> out = tree.log_aggregate_to_nodes(np.log([1e308, 1e308, 1.0]))
            >>> bool(np.isclose(out[0], np.log(2) + np.log(1e308)))  # the plain sum would be inf
            True
        """
        is_torch = isinstance(log_item_values, torch.Tensor)
        values = log_item_values if is_torch else torch.as_tensor(np.asarray(log_item_values, dtype=np.float64))
        if torch.isnan(values).any() or torch.isposinf(values).any():
            raise ValueError("log item values must not be NaN or +inf (−inf stands for a zero value)")
        squeeze = values.dim() == 1
        values = values.unsqueeze(0) if squeeze else values  # [B, M]
        parent = torch.as_tensor(self.parent, device=values.device)
        item_node = torch.as_tensor(self.item_node, device=values.device)
        out = values.new_full((values.shape[0], self.num_nodes), float("-inf"))  # [B, N]
        out = scatter_logsumexp(out, item_node, values)  # items -> their terminal nodes (duplicates merge)
        levels = self._level_bounds()
        for d in range(len(levels) - 1, 0, -1):  # deepest level first; each level's parents form the level above
            lo, hi = levels[d]
            plo, phi = levels[d - 1]
            out[:, plo:phi] = scatter_logsumexp(out[:, plo:phi], parent[lo:hi] - plo, out[:, lo:hi])
        out = out.squeeze(0) if squeeze else out
        return out if is_torch else out.numpy()

    def _level_bounds(self) -> list[tuple[int, int]]:
        """[(first node, end) for each depth]: nodes are numbered level by level."""
        if not hasattr(self, "_levels"):
            edges = np.searchsorted(self.depth, np.arange(int(self.depth.max()) + 2))
            self._levels = [(int(edges[d]), int(edges[d + 1])) for d in range(len(edges) - 1)]
        return self._levels

    # ------------------------------------------------------------------ batched queries

    def tensors(self, device: torch.device | str = "cpu") -> _TreeTensors:
        """Torch copies of the arrays on `device`, built once and cached."""
        device = torch.device(device)
        if device not in self._cache:
            as_t = lambda a: torch.as_tensor(a, device=device)  # noqa: E731
            terminal_item = np.full(self.num_nodes, -1, dtype=np.int64)
            first = self.terminal_ptr[:-1] < self.terminal_ptr[1:]
            terminal_item[first] = self.terminal_items[self.terminal_ptr[:-1][first]]
            self._cache[device] = _TreeTensors(
                parent=as_t(self.parent),
                token=as_t(self.token),
                first_child=as_t(self.first_child),
                num_children=as_t(self.num_children),
                key=as_t(self.parent[1:] * self.vocab_bound + self.token[1:]),
                log_flow=as_t(self.log_flow),
                is_terminal=as_t(self.is_terminal),
                terminal_item=as_t(terminal_item),
            )
        return self._cache[device]

    def advance(self, nodes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The child of each node reached by the matching token; -1 where it is not a child (or node is -1).

        Args:
            nodes: int64 tensor of node ids (any shape).
            tokens: int64 tensor of token ids, same shape.
        """
        t = self.tensors(nodes.device)
        ok = (nodes >= 0) & (tokens >= 0) & (tokens < self.vocab_bound)
        query = nodes.clamp(min=0) * self.vocab_bound + tokens.clamp(0, self.vocab_bound - 1)
        pos = torch.searchsorted(t.key, query).clamp(max=t.key.numel() - 1)  # index into nodes 1..N-1
        found = ok & (t.key[pos] == query)
        return torch.where(found, pos + 1, torch.full_like(nodes, INVALID))

    def walk(self, token_ids: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
        """Nodes visited by each row of `token_ids` [B, T]: ``out[:, k]`` is the node after the first k tokens.

        ``out[:, 0]`` is `start` (default: the root). Once a token is not a child (including any token after a
        terminal node) the row stays at -1.
        """
        B, T = token_ids.shape
        out = torch.empty(B, T + 1, dtype=torch.long, device=token_ids.device)  # [B, T+1]
        out[:, 0] = ROOT if start is None else start
        for k in range(T):  # sequential by nature: T = path length, tiny
            out[:, k + 1] = self.advance(out[:, k], token_ids[:, k])
        return out

    def children(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Children of a batch of nodes, padded to the largest fan-out among them.

        Args:
            nodes: int64 tensor [R] (entries -1 have no children).

        Returns:
            child_tokens [R, K] (-1 padding), child_nodes [R, K] (-1 padding), mask [R, K] bool.
        """
        t = self.tensors(nodes.device)
        valid = nodes >= 0
        safe = nodes.clamp(min=0)
        count = torch.where(valid, t.num_children[safe], torch.zeros_like(safe))  # [R]
        K = int(count.max()) if count.numel() else 0
        offs = torch.arange(K, device=nodes.device)  # [K]
        mask = offs.unsqueeze(0) < count.unsqueeze(1)  # [R, K]
        invalid = torch.full_like(mask, INVALID, dtype=torch.long)
        child = torch.where(mask, t.first_child[safe].unsqueeze(1) + offs, invalid)
        tok = torch.where(mask, t.token[child.clamp(min=0)], torch.full_like(child, INVALID))
        return tok, child, mask

    def allowed_tokens(self, nodes: torch.Tensor) -> list[list[int]]:
        """Allowed next tokens of each node as Python lists (for inspection and tests; use :meth:`allowed_mask`)."""
        tok, _, mask = self.children(nodes)
        return [row[m].tolist() for row, m in zip(tok, mask)]

    def allowed_mask(self, nodes: torch.Tensor, vocab_size: int, positive_flow_only: bool = False) -> torch.Tensor:
        """Boolean [R, vocab_size] mask of the tokens that keep each row on a catalogue path.

        Built by one scatter over the children of the given nodes: cost O(R + Σ children), no vocabulary loop.
        With `positive_flow_only`, children whose flow is zero are excluded.
        """
        t = self.tensors(nodes.device)
        valid = nodes >= 0
        safe = nodes.clamp(min=0)
        count = torch.where(valid, t.num_children[safe], torch.zeros_like(safe))  # [R]
        rows = torch.repeat_interleave(torch.arange(nodes.numel(), device=nodes.device), count)  # [E]
        starts = torch.repeat_interleave(t.first_child[safe], count)  # [E]
        ends_before = torch.repeat_interleave(torch.cumsum(count, 0) - count, count)  # [E]
        child = starts + torch.arange(rows.numel(), device=nodes.device) - ends_before  # [E]
        if positive_flow_only:
            keep = torch.isfinite(t.log_flow[child])
            rows, child = rows[keep], child[keep]
        mask = torch.zeros(nodes.numel(), vocab_size, dtype=torch.bool, device=nodes.device)  # [R, V]
        mask[rows, t.token[child]] = True
        return mask

    def log_flows(self, nodes: torch.Tensor) -> torch.Tensor:
        """log F(node) in float64 (−inf for zero flow and for node -1)."""
        t = self.tensors(nodes.device)
        lf = t.log_flow[nodes.clamp(min=0)]
        return torch.where(nodes >= 0, lf, torch.full_like(lf, float("-inf")))

    def log_process_reward(self, nodes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """log r(token | node) = log F(child) − log F(node), float64; −inf where `token` is not a child.

        Termination is included: with ``tokens == terminator_id`` this is log R(s)/F(s) for a complete title s.
        Below a zero-flow node (0/0) the result is −inf too: such a node has no distribution to follow.
        """
        child = self.advance(nodes, tokens)
        log_r = self.log_flows(child) - self.log_flows(nodes)  # NaN where both flows are 0 (or node is -1)
        return torch.where((child >= 0) & ~log_r.isnan(), log_r, torch.full_like(log_r, float("-inf")))

    def terminal_item(self, nodes: torch.Tensor) -> torch.Tensor:
        """The smallest item id ending at each terminal node; -1 for non-terminal nodes (see :meth:`items_of_node`)."""
        t = self.tensors(nodes.device)
        return torch.where(nodes >= 0, t.terminal_item[nodes.clamp(min=0)], torch.full_like(nodes, INVALID))

    def items_of_node(self, node: int) -> np.ndarray:
        """All item ids whose path ends at terminal `node` (several for duplicate titles)."""
        return self.terminal_items[self.terminal_ptr[node] : self.terminal_ptr[node + 1]]

    def item_paths(self, item_ids: torch.Tensor, pad_id: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
        """Token paths (terminator included) of a batch of items, read back from the tree.

        Returns:
            tokens [B, L] padded with `pad_id`, lengths [B].
        """
        device = item_ids.device
        t = self.tensors(device)
        lengths = torch.as_tensor(self.item_length, device=device)[item_ids]  # [B]
        L = int(lengths.max()) if lengths.numel() else 0
        node = torch.as_tensor(self.item_node, device=device)[item_ids]  # [B]
        out = torch.full((item_ids.numel(), L), pad_id, dtype=torch.long, device=device)  # [B, L]
        for k in range(L - 1, -1, -1):  # climb from the terminal node to the root
            here = k < lengths
            out[:, k] = torch.where(here, t.token[node.clamp(min=0)], out[:, k])
            node = torch.where(here, t.parent[node.clamp(min=0)], node)
        return out, lengths

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | Path) -> None:
        """Save the structure and rewards as a compressed ``.npz`` (loaded by :meth:`load`)."""
        np.savez_compressed(
            path,
            terminator_id=np.array(self.terminator_id),
            parent=self.parent,
            token=self.token,
            depth=self.depth,
            first_child=self.first_child,
            num_children=self.num_children,
            item_node=self.item_node,
            item_length=self.item_length,
            item_rewards=self.item_rewards,
        )

    @classmethod
    def load(cls, path: str | Path) -> PrefixTree:
        """Load a tree written by :meth:`save`.

        Raises:
            FileNotFoundError: no file at `path`.
            ValueError: the file is not a tree saved by :meth:`save` (not an ``.npz``, pickled objects, missing or
                inconsistent arrays); the message names the file.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such prefix tree file (a .npz written by PrefixTree.save)")
        fix = "rebuild the tree from the titles (PrefixTree.from_titles, `trl-flower evaluate --rebuild-tree`)"
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path} is not a prefix tree saved by PrefixTree.save: it is not an .npz archive; {fix}.")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as err:  # damaged members, pickled objects: not a tree PrefixTree.save wrote
            what = "it holds pickled Python objects" if "bject" in str(err) else f"{type(err).__name__}: {err}"
            raise ValueError(f"{path} is not a prefix tree saved by PrefixTree.save ({what}); {fix}.") from None
        missing = sorted({*_SAVED_ARRAYS, "terminator_id"} - set(arrays))
        if missing:
            raise ValueError(f"{path} is not a prefix tree saved by PrefixTree.save: it lacks {missing}; {fix}.")
        term = int(arrays.pop("terminator_id"))
        arrays = {k: v for k, v in arrays.items() if k in _SAVED_ARRAYS}
        try:
            _check_saved_arrays(arrays)
            return cls(terminator_id=term, **arrays)
        except (ValueError, IndexError) as err:
            raise ValueError(f"{path} holds an inconsistent prefix tree ({err}); {fix}.") from None

    def __repr__(self) -> str:
        return (
            f"PrefixTree(items={self.num_items}, nodes={self.num_nodes}, terminals={int(self.is_terminal.sum())}, "
            f"max_depth={int(self.depth.max())}, terminator_id={self.terminator_id})"
        )


# ---------------------------------------------------------------------- helpers

_SAVED_ARRAYS = (
    "parent",
    "token",
    "depth",
    "first_child",
    "num_children",
    "item_node",
    "item_length",
    "item_rewards",
)


def _check_saved_arrays(arrays: dict[str, np.ndarray]) -> None:
    """Shape and range checks of loaded tree arrays (cheap, O(nodes)); raises ValueError naming the array."""
    for name, array in arrays.items():
        if array.ndim != 1:
            raise ValueError(f"array {name!r} has shape {array.shape}, expected one dimension")
        if name != "item_rewards" and not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"array {name!r} has dtype {array.dtype}, expected integers")
    num_nodes, num_items = arrays["parent"].shape[0], arrays["item_node"].shape[0]
    for name in ("token", "depth", "first_child", "num_children"):
        if arrays[name].shape[0] != num_nodes:
            raise ValueError(f"array {name!r} has {arrays[name].shape[0]} entries, 'parent' has {num_nodes}")
    for name in ("item_length", "item_rewards"):
        if arrays[name].shape[0] != num_items:
            raise ValueError(f"array {name!r} has {arrays[name].shape[0]} entries, 'item_node' has {num_items}")
    if num_nodes < 2 or num_items < 1:
        raise ValueError(f"{num_nodes} nodes and {num_items} items; a tree has a root, nodes and items")
    parent, item_node = arrays["parent"], arrays["item_node"]
    if parent[0] != -1 or not (parent[1:] < np.arange(1, num_nodes)).all() or parent[1:].min() < 0:
        raise ValueError("array 'parent' is not a tree numbered level by level (parent[n] < n, root first)")
    if item_node.min() < 1 or item_node.max() >= num_nodes:
        raise ValueError(f"array 'item_node' points outside the {num_nodes} nodes")


def scatter_logsumexp(dst: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``log(exp(dst) + scatter_add(exp(src)))`` along dim 1 without overflow: dst [B, N], index [K], src [B, K].

    Every entry is shifted by the largest term that lands on it, so the result is exact in float64 whatever the
    magnitudes; −inf terms are zeros.
    """
    idx = index.unsqueeze(0).expand_as(src)  # [B, K]
    top = dst.scatter_reduce(1, idx, src, reduce="amax", include_self=True)  # [B, N] max of all terms per entry
    shift = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # all −inf: no shift, the sum stays 0
    acc = torch.exp(dst - shift).index_add(1, index, torch.exp(src - shift.gather(1, idx)))  # [B, N]
    return torch.log(acc) + shift


def _flatten_paths(paths: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(p) for p in paths), dtype=np.int64, count=len(paths))
    if lengths.size == 0:
        raise ValueError("cannot build a prefix tree from zero items")
    offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((t for p in paths for t in p), dtype=np.int64, count=int(offsets[-1]))
    return flat, offsets


def _name(i: int, item_names: Sequence[str] | None) -> str:
    return f"item {i}" + (f" ({item_names[i]!r})" if item_names is not None else "")


def _validate_paths(flat: np.ndarray, offsets: np.ndarray, terminator_id: int, item_names) -> None:
    lengths = np.diff(offsets)
    if lengths.size == 0:
        raise ValueError("cannot build a prefix tree from zero items")
    nonempty = lengths > 0
    last = np.full(lengths.size, -1, dtype=np.int64)  # last token of each path (-1 for a path of length 0)
    last[nonempty] = flat[offsets[1:][nonempty] - 1]
    # empty: no token at all, or a lone terminator (a length-1 path without the terminator is reported below)
    empty = np.flatnonzero(~nonempty | ((lengths == 1) & (last == terminator_id)))
    if empty.size:
        raise ValueError(
            f"{_name(int(empty[0]), item_names)} has an empty token path ({empty.size} such items): every item "
            "needs at least one token before the terminator. Drop or fix empty titles."
        )
    if flat.min() < 0:
        raise ValueError("token ids must be non-negative")
    bad = np.flatnonzero(last != terminator_id)
    if bad.size:
        raise ValueError(
            f"{_name(int(bad[0]), item_names)} does not end with the terminator {terminator_id} "
            f"(ends with {int(last[bad[0]])}); append it to every path."
        )
    inner = np.flatnonzero(flat == terminator_id)
    inner_items = np.searchsorted(offsets, inner, side="right") - 1
    inside = inner != offsets[inner_items + 1] - 1
    if inside.any():
        i = int(inner_items[inside][0])
        raise ValueError(
            f"{_name(i, item_names)} contains the terminator {terminator_id} before its end; a path may contain it "
            "only as its last token (choose another terminator or clean the title)."
        )


def title_token_paths(
    titles: Sequence[str], tokenizer, terminator_id: int | None = None, batch_size: int = 10_000
) -> tuple[np.ndarray, np.ndarray, int]:
    """Token paths of titles: ``encode(title, add_special_tokens=False) + [terminator]`` as flat arrays.

    Args:
        titles: item titles (item id = index).
        tokenizer: a transformers tokenizer.
        terminator_id: the terminator token; default the tokenizer's EOS.
        batch_size: titles per tokenizer call (fast tokenizers parallelise within a call).

    Returns:
        (flat token ids, offsets [num_items + 1], terminator id).

    Raises:
        TypeError: `titles` is a single string rather than a sequence of them.
        ValueError: a title is empty or whitespace (names the item), or the tokenizer has no terminator.
    """
    if terminator_id is None:
        terminator_id = getattr(tokenizer, "eos_token_id", None)
        if terminator_id is None:
            raise ValueError(
                "the tokenizer has no eos_token_id to use as terminator; pass terminator_id explicitly "
                "(e.g. tokenizer.convert_tokens_to_ids('<|im_end|>'))."
            )
    if isinstance(titles, (str, bytes)):
        raise TypeError(
            f"titles must be a sequence of item titles (one string per item), got a single {type(titles).__name__} "
            f"{titles[:60]!r}; wrap it in a list: [{titles[:60]!r}]."
        )
    vocab_size = len(tokenizer)
    if not 0 <= int(terminator_id) < vocab_size:
        raise ValueError(f"terminator_id {terminator_id} is not in the tokenizer's vocabulary (size {vocab_size})")
    for i, title in enumerate(titles):
        if not isinstance(title, str) or not title.strip():
            raise ValueError(f"item {i} has an empty or whitespace-only title {title!r}; drop it or give it a name")
    chunks, lengths = [], []
    for start in range(0, len(titles), batch_size):
        enc = tokenizer(list(titles[start : start + batch_size]), add_special_tokens=False)["input_ids"]
        for ids in enc:
            chunks.append(ids)
            chunks.append([terminator_id])
            lengths.append(len(ids) + 1)
    flat = np.fromiter((t for c in chunks for t in c), dtype=np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    _validate_paths(flat, offsets, int(terminator_id), titles)
    return flat, offsets, int(terminator_id)
