"""Constrained decoding over the item prefix tree: a `LogitsProcessor` for `model.generate`.

:class:`TrieLogitsProcessor` sets the score of every token that would leave the catalogue to −inf, so greedy
decoding, sampling (with ``num_return_sequences``) and beam search only ever produce item token paths of a
:class:`~trl_flower.tree.PrefixTree`. It is self-contained: pass it to any ``generate`` call as
``logits_processor=LogitsProcessorList([TrieLogitsProcessor(tree)])``.

The per-row state is the tree node reached by the row's generated tokens. A row that has emitted the terminator sits
on a *terminal* node and stays there whatever follows (HF pads finished rows); it may then only emit
`finished_token_id`. The state is a pure function of the generated tokens (:func:`generated_nodes`); the processor
computes it incrementally (see :meth:`TrieLogitsProcessor._nodes` for why that stays correct under beam search).

:class:`LogProbTemperatureProcessor` is the decoding temperature of the "Temp" baseline for beam search, where
transformers applies no temperature (warpers run only when ``do_sample=True``).
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from trl_flower.tree import INVALID, ROOT, PrefixTree


def _step(tree: PrefixTree, nodes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """One transition of the decoding state: advance by `tokens`, except that terminal nodes absorb any token.

    Args:
        nodes: [R] current nodes (-1 = already off the tree).
        tokens: [R] next tokens.

    Returns:
        [R] next nodes; -1 where a non-terminal node has no child for the token (or the row was already off).
    """
    t = tree.tensors(nodes.device)
    finished = (nodes >= 0) & t.is_terminal[nodes.clamp(min=0)]  # [R]
    return torch.where(finished, nodes, tree.advance(nodes, tokens))


def generated_nodes(tree: PrefixTree, generated: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoding state of each row after its generated tokens (prompt excluded), by a full walk from the root.

    Tokens after the terminator are ignored (the row stays on its terminal node), so sequences padded by
    ``generate`` map to their item. Cost: one batched ``searchsorted`` per column (T = longest path, small).

    Args:
        tree: the prefix tree.
        generated: [R, T] generated token ids.

    Returns:
        nodes [R] (terminal node for a complete item, inner node for a cut-off path, -1 if the row left the tree)
        and off_at [R]: the position of the first token that left the tree, -1 if none.
    """
    R, T = generated.shape
    nodes = torch.full((R,), ROOT, dtype=torch.long, device=generated.device)  # [R]
    off_at = torch.full((R,), INVALID, dtype=torch.long, device=generated.device)  # [R]
    for k in range(T):  # sequential by nature: T is a path length
        nxt = _step(tree, nodes, generated[:, k])  # [R]
        off_at = torch.where((nxt < 0) & (nodes >= 0), torch.full_like(off_at, k), off_at)
        nodes = nxt
    return nodes, off_at


def allowed_edges(
    tree: PrefixTree, nodes: torch.Tensor, finished_token_id: int, positive_flow_only: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every allowed (row, token) pair of rows at tree `nodes` [R] (all ≥ 0), with the node each one leads to.

    A non-terminal row allows its children (with `positive_flow_only`, those of positive flow), in token order; a
    terminal row (a finished item) allows only `finished_token_id` and stays on its node. Pairs are ordered by row,
    then token: the order of the flat index ``row * V + token`` that ``generate``'s beam search ranks ties by.
    Built from the compact child arrays with one ``repeat_interleave``: O(R + E), independent of the vocabulary.

    Returns:
        rows [E], tokens [E], next nodes [E] (int64).
    """
    t = tree.tensors(nodes.device)
    R = nodes.shape[0]
    terminal = t.is_terminal[nodes]  # [R]
    # a terminal row gets one edge (the finished token), the others one per child
    count = torch.where(terminal, torch.ones_like(nodes), t.num_children[nodes])  # [R]
    E = int(count.sum())
    rows = torch.repeat_interleave(torch.arange(R, device=nodes.device), count, output_size=E)  # [E]
    # child of edge e = first_child[row] + (e - index of the row's first edge)
    offset = torch.arange(E, device=nodes.device) - (torch.cumsum(count, 0) - count)[rows]  # [E]
    child = torch.where(terminal[rows], nodes[rows], t.first_child[nodes][rows] + offset)  # [E]
    tokens = torch.where(terminal[rows], torch.full_like(child, finished_token_id), t.token[child])  # [E]
    if positive_flow_only:
        keep = terminal[rows] | torch.isfinite(t.log_flow[child])  # [E]
        rows, tokens, child = rows[keep], tokens[keep], child[keep]
    return rows, tokens, child


class TrieLogitsProcessor(LogitsProcessor):
    r"""[`LogitsProcessor`] that restricts generation to the item token paths of a [`PrefixTree`].

    At each step, every token that is not a child of the row's current tree node gets score −inf. Rows that completed
    an item (their node is terminal) may only emit `finished_token_id`. Works for greedy decoding, sampling (any
    ``num_return_sequences``) and beam search (rows = batch × beams, reordered by ``generate`` between steps),
    with left-padded prompts. Place it *before* temperature/top-k/top-p (``generate`` does so for processors
    passed in ``logits_processor``), so that warpers never empty the allowed set.

    One instance serves one ``generate`` call: the prompt length is fixed at the first call (unless given) and the
    previous step's state is cached. A call whose sequences are not longer than the previous call's starts a new
    generation automatically; otherwise call :meth:`reset` (or make a new instance) before reusing it.

    Args:
        tree (`PrefixTree`):
            The catalogue's prefix tree; token paths end with ``tree.terminator_id``.
        prompt_length (`int`, *optional*):
            The padded prompt length P: generated tokens are ``input_ids[:, P:]``. Default: ``input_ids.shape[1]``
            at the first call, which is the padded prompt length inside ``generate`` for decoder-only models.
        finished_token_id (`int`, *optional*):
            The only token allowed after a row reached a terminal node. Default: ``tree.terminator_id``, which in the
            default tree mode is the EOS that ``generate`` stops on and pads with.
        positive_flow_only (`bool`, *optional*, defaults to `False`):
            Also forbid children whose flow is zero (items with reward 0), e.g. for samplers that follow the flow.
        device (`str` or `torch.device`, *optional*):
            Build the tree's tensors on this device now instead of at the first call (they are always taken on the
            scores' device).

    Raises:
        ValueError: at construction for invalid arguments; at a call if the vocabulary is smaller than the tree's
            tokens, if the scores are NaN on an allowed token, or if a row's generated tokens left the tree (names the
            row, position and token).

    Examples:
    >>> import torch
    >>> from trl_flower.tree import PrefixTree
    >>> from trl_flower.decoding import TrieLogitsProcessor
    >>> tree = PrefixTree.from_token_paths([[5, 6, 2], [5, 2], [7, 2]], terminator_id=2)
    >>> processor = TrieLogitsProcessor(tree)
    >>> prompt = torch.tensor([[9, 9], [0, 9]])  # two left-padded prompts, P = 2
    >>> processor(prompt, torch.zeros(2, 8)).isfinite().int()  # first step: the first tokens of items
    tensor([[0, 0, 0, 0, 0, 1, 0, 1],
            [0, 0, 0, 0, 0, 1, 0, 1]], dtype=torch.int32)
    >>> step = torch.cat([prompt, torch.tensor([[5], [7]])], dim=1)  # row 0 chose 5, row 1 chose 7
    >>> processor(step, torch.zeros(2, 8)).isfinite().int()  # after 5: 6 or end; after 7: end
    tensor([[0, 0, 1, 0, 0, 0, 1, 0],
            [0, 0, 1, 0, 0, 0, 0, 0]], dtype=torch.int32)
    """

    # The processor keeps per-generation state, so it cannot be shared by continuous batching.
    supports_continuous_batching: bool = False

    def __init__(
        self,
        tree: PrefixTree,
        prompt_length: int | None = None,
        finished_token_id: int | None = None,
        positive_flow_only: bool = False,
        device: str | torch.device | None = None,
    ) -> None:
        if not isinstance(tree, PrefixTree):
            raise ValueError(f"`tree` must be a trl_flower PrefixTree, got {type(tree).__name__}")
        if prompt_length is not None and (not isinstance(prompt_length, int) or prompt_length < 0):
            raise ValueError(f"`prompt_length` must be a non-negative int or None (inferred), got {prompt_length!r}")
        if finished_token_id is None:
            finished_token_id = tree.terminator_id
        if not isinstance(finished_token_id, int) or finished_token_id < 0:
            raise ValueError(f"`finished_token_id` must be a non-negative token id, got {finished_token_id!r}")
        if positive_flow_only and not tree.log_flow[ROOT] > float("-inf"):
            raise ValueError(
                "`positive_flow_only=True` but every item reward is 0, so no item is allowed; give some items a "
                "positive reward or smooth the rewards (tree.with_rewards(rewards + eps))."
            )
        self.tree = tree
        self.finished_token_id = finished_token_id
        self.positive_flow_only = bool(positive_flow_only)
        self._given_prompt_length = prompt_length
        if device is not None:
            tree.tensors(device)  # cached by the tree
        self.reset()

    def reset(self) -> None:
        """Forget the cached state (and an inferred prompt length) so the instance can serve a new ``generate``."""
        self.prompt_length = self._given_prompt_length
        self._prev_len: int = -1  # input_ids.shape[1] at the previous call
        self._prev_tokens: torch.Tensor | None = None  # [R', t-1] generated tokens at the previous call
        self._prev_nodes: torch.Tensor | None = None  # [R'] state after them
        self.last_allowed: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, tokens) of the last call

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        """Mask the scores of tokens that leave the tree.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Prompt plus generated tokens; for beam search ``batch_size`` is batch × num_beams.
            scores (`torch.Tensor` of shape `(batch_size, vocab_size)`):
                Logits (sampling, greedy) or log-probabilities (beam search) of the next token.

        Return:
            `torch.Tensor` of shape `(batch_size, vocab_size)`: a new tensor, equal to `scores` on allowed tokens and
            −inf elsewhere.
        """
        R, V = scores.shape
        if input_ids.shape[0] != R:
            raise ValueError(f"input_ids has {input_ids.shape[0]} rows but scores has {R}")
        if V < self.tree.vocab_bound:
            raise ValueError(
                f"the scores have {V} columns but the tree uses token ids up to {self.tree.vocab_bound - 1}; "
                "build the tree with the model's tokenizer."
            )
        if not 0 <= self.finished_token_id < V:
            raise ValueError(f"finished_token_id {self.finished_token_id} is outside the vocabulary of size {V}")
        length = input_ids.shape[1]
        if length <= self._prev_len:  # sequences never shrink inside one generate call: this is a new call
            self.reset()
        if self.prompt_length is None:
            self.prompt_length = length
        if length < self.prompt_length:
            raise ValueError(
                f"input_ids has {length} columns, fewer than prompt_length={self.prompt_length}; pass the padded "
                "prompt length of this generate call or call reset() between calls."
            )
        generated = input_ids[:, self.prompt_length :].to(scores.device)  # [R, t]
        nodes = self._nodes(generated)  # [R]
        self._prev_len = length

        rows, tokens = self.allowed_entries(nodes)  # [E], [E]
        values = scores[rows, tokens]  # [E]
        if bool(torch.isnan(values).any()):  # NaN would survive the mask and derail beam search
            row = int(rows[torch.isnan(values)][0])
            raise ValueError(
                f"the scores of row {row} are NaN on allowed tokens: the model produced NaN logits (e.g. eager "
                "attention in float64 with left padding); fix the model inputs."
            )
        # One [R, V] write (the fill) plus O(E) scattered copies: the cheapest mask there is. A new tensor: the
        # caller's scores are never modified.
        out = torch.full_like(scores, float("-inf"))  # [R, V]
        out[rows, tokens] = values
        self.last_allowed = (rows, tokens)
        return out

    def allowed_entries(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The allowed (row, token) pairs of rows at `nodes` [R] (all ≥ 0), as two flat int64 tensors [E].

        Non-terminal rows allow their children (with `positive_flow_only`, those of positive flow), sorted by token;
        terminal rows allow only `finished_token_id` (see :func:`allowed_edges`).
        """
        rows, tokens, _ = allowed_edges(self.tree, nodes, self.finished_token_id, self.positive_flow_only)
        return rows, tokens

    # ------------------------------------------------------------------ state tracking

    def _nodes(self, generated: torch.Tensor) -> torch.Tensor:
        """The node of each row after `generated` [R, t], reusing the previous call's state.

        Why this is correct under beam search: the state is a pure function of the row's generated tokens
        (:func:`generated_nodes`). At step t, row i's tokens are (prefix_i, last_i) with prefix_i of length t-1. Beam
        search reorders and duplicates rows between steps, but every prefix_i is the full token sequence of *some*
        row at the previous step. So the state of prefix_i is the cached state of any previous row with exactly
        the same tokens, and one `advance` by last_i finishes the job. Rows are matched by exact token equality
        (never by a hash), so a match is always right:

        * sampling / greedy: rows keep their order, checked with one ``torch.equal`` on [R, t-1];
        * beam search: ``torch.unique(dim=0)`` over the previous and the current prefixes gives equal rows equal
          ids; a scatter then maps each current row to a previous row with the same id;
        * rows without a match (never the case inside ``generate``) are walked from the root.

        Each step is O(R·t) element-wise work in a constant number of kernels, with no loop over rows or vocabulary.
        """
        R, T = generated.shape
        device = generated.device
        if T == 0:
            nodes = torch.full((R,), ROOT, dtype=torch.long, device=device)  # [R]
        else:
            prefix, last = generated[:, :-1], generated[:, -1]  # [R, t-1], [R]
            parents = self._match_previous(prefix)  # [R], -1 where unknown
            unknown = parents < 0
            if bool(unknown.any()):
                parents = parents.clone()
                parents[unknown] = generated_nodes(self.tree, prefix[unknown])[0]
            nodes = _step(self.tree, parents, last)  # [R]
        self._check_on_tree(generated, nodes)
        self._prev_tokens, self._prev_nodes = generated.clone(), nodes  # clone: generate may reuse its buffers
        return nodes

    def _match_previous(self, prefix: torch.Tensor) -> torch.Tensor:
        """State of each row's prefix [R, t-1] looked up among the previous call's rows; -1 where no row matches."""
        R, L = prefix.shape
        device = prefix.device
        if L == 0:  # empty prefix: the root
            return torch.full((R,), ROOT, dtype=torch.long, device=device)
        prev, prev_nodes = self._prev_tokens, self._prev_nodes
        if prev is None or prev.shape[1] != L or prev.device != device:
            return torch.full((R,), INVALID, dtype=torch.long, device=device)
        if prev.shape[0] == R and torch.equal(prev, prefix):  # sampling: same rows, same order
            return prev_nodes
        # beam search: equal token rows get equal ids from one lexicographic sort of [R' + R, L]
        _, ids = torch.unique(torch.cat([prev, prefix]), dim=0, return_inverse=True)  # [R' + R]
        prev_ids, cur_ids = ids[: prev.shape[0]], ids[prev.shape[0] :]  # [R'], [R]
        row_of_id = torch.full((int(ids.max()) + 1,), INVALID, dtype=torch.long, device=device)  # [U]
        row_of_id[prev_ids] = torch.arange(prev.shape[0], device=device)  # any previous row with those tokens
        src = row_of_id[cur_ids]  # [R]
        return torch.where(src >= 0, prev_nodes[src.clamp(min=0)], torch.full_like(src, INVALID))

    def _check_on_tree(self, generated: torch.Tensor, nodes: torch.Tensor) -> None:
        """Raise if a row left the tree (or, with `positive_flow_only`, entered a zero-flow node): a bug upstream."""
        bad = nodes < 0
        if self.positive_flow_only:
            bad = bad | ~torch.isfinite(self.tree.log_flows(nodes))
        if not bool(bad.any()):
            return
        row = int(torch.nonzero(bad)[0, 0])
        node = torch.tensor([ROOT], device=nodes.device)
        for pos in range(generated.shape[1]):  # error path only: find the first bad token of that one row
            node = _step(self.tree, node, generated[row, pos : pos + 1])
            if int(node[0]) < 0 or not bool(torch.isfinite(self.tree.log_flows(node))[0]):
                break
        token = int(generated[row, pos])
        reason = "is not a child of its trie node" if int(node[0]) < 0 else "leads to a node with zero flow"
        raise ValueError(
            f"row {row} left the item tree: generated token {token} at position {pos} after the prompt {reason} "
            f"({int(bad.sum())} such rows). Something changed the scores after TrieLogitsProcessor (it must be the "
            "last processor that can un-mask tokens), or prompt_length is wrong (it is "
            f"{self.prompt_length}), or the instance is reused across generate calls without reset()."
        )


class LogProbTemperatureProcessor(LogitsProcessor):
    r"""[`LogitsProcessor`] returning ``log_softmax(scores / temperature)``: decoding temperature for beam search.

    ``generate`` applies `TemperatureLogitsWarper` only when sampling. Beam search scores log-probabilities, so the
    Flower reference's "Temp" baseline re-normalises the tempered log-probs at every step; put this processor before
    :class:`TrieLogitsProcessor`. With temperature 1 it returns the log-softmax of its input (the log-probs, again).

    Args:
        temperature (`float`): strictly positive; > 1 flattens, < 1 sharpens the per-step distribution.

    Examples:
    >>> import torch
    >>> from trl_flower.decoding import LogProbTemperatureProcessor
    >>> logp = torch.tensor([[0.5, 0.25, 0.25]]).log()
    >>> LogProbTemperatureProcessor(2.0)(torch.zeros(1, 1, dtype=torch.long), logp).exp()
    tensor([[0.4142, 0.2929, 0.2929]])
    """

    def __init__(self, temperature: float) -> None:
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"`temperature` must be a float > 0, got {temperature!r}")
        self.temperature = float(temperature)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        """Tempered, re-normalised log-probabilities of shape `(batch_size, vocab_size)`."""
        return torch.log_softmax(scores / self.temperature, dim=-1)
