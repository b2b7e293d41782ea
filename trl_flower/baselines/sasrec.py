r"""SASRec, the auxiliary sequential recommender of the Flower paper (arXiv 2503.07377, flower_reference.md §4).

SASRec (Kang & McAuley, ICDM 2018, "Self-Attentive Sequential Recommendation") reads a user's last L items and
scores every catalogue item as the next one. In Flower it is trained once per dataset on the same splits as the LLM,
and its logits for every (training row, item) pair personalise the GFlowNet reward (``div_s``, ``add_logs``,
``exact``); its test logits guide D3's decoding, and its scores are the PPO reward.

Architecture, as in the official code (``SASRecModules_ori.py``), with :math:`d` = ``hidden_size`` and a history
:math:`i_1 \dots i_n` (oldest first, :math:`n \le L`) right-padded to L with the padding id ``num_items``:

.. math::
    x_t &= m_t \cdot \mathrm{Dropout}(E_{i_t} + P_t), \qquad m_t = \mathbb{1}[t \le n] \\
    a &= \mathrm{Attn}(q = \mathrm{LN}_1(x), k = v = x) + \mathrm{LN}_1(x) \qquad
        \text{(causal, padded keys masked)} \\
    f &= \mathrm{LN}\big(\mathrm{LN}_2(a) + \mathrm{Dropout}(W_2\,\mathrm{ReLU}(W_1 \mathrm{LN}_2(a)))\big) \\
    h &= \mathrm{LN}_3(m \cdot f)_n, \qquad \mathrm{logits} = W_o h + b_o \in \mathbb{R}^{\text{num\_items}}

with learned absolute positions :math:`P` (no :math:`\sqrt d` scaling of the embeddings) and an output layer that is
*not* tied to the item embeddings. Training: binary cross-entropy on the logit of the next item (label 1) and of one
item drawn uniformly from the other items (label 0),

.. math:: \mathcal{L} = -\frac{1}{2B}\sum_{b=1}^{B}\big[\log\sigma(s_{b,y_b}) + \log(1-\sigma(s_{b,y^-_b}))\big],

Adam (lr 1e-3, L2 weight decay 1e-5), batch 1024, early stopping on validation NDCG@20 by full ranking over all items
(patience 20), keeping the best epoch's weights.

The method contract follows RecBole's sequential recommenders: `SASRec.forward` (sequence representation),
`SASRec.calculate_loss`, `SASRec.predict` (scores of given items) and `SASRec.full_sort_predict` (scores of all
items), plus `SASRec.score_rows` for raw history lists.

NOTE (departures from the authors' code, each also marked where it happens):
    * Batches are a shuffled pass over all training rows (the last one smaller); the official loop draws
      floor(N / 1024) independent random batches per epoch, so some rows are seen twice and some not at all.
    * The query padding mask zeroes the attention rows of padded positions from the item ids; the official code
      derives it from ``sign(sum(LN_1(x)))``, which is almost never zero. Either way padded positions never reach the
      output, which is read at the last real position.
    * Attention scores are scaled by :math:`1/\sqrt{d/\text{heads}}`; the official code uses :math:`1/\sqrt{d}`
      (identical for the single head used here).
    * The loss gathers only the positive and negative rows of the output layer instead of computing all logits and
      gathering two of them (same value and gradient, less work).
    * Negatives come from a seeded `torch.Generator`, dropout from the seeded global generator: a run is
      reproducible from ``seed`` (the official negatives use the unseeded ``numpy`` global state).

Example:
    >>> import torch
    >>> from trl_flower.baselines.sasrec import SASRec, SASRecConfig
    >>> _ = torch.manual_seed(0)
    >>> model = SASRec(SASRecConfig(num_items=5))
    >>> model.score_rows([[0, 1], [2]]).shape
    torch.Size([2, 5])
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from datasets import Dataset

    from trl_flower.data.amazon import AmazonData
    from trl_flower.data.popularity import PopularityGroups

CONFIG_NAME = "sasrec_config.json"
WEIGHTS_NAME = "sasrec_model.pt"
EVAL_KS = (1, 3, 5, 10, 20)


@dataclass
class SASRecConfig:
    """Shape of a SASRec model (the paper's values are the defaults).

    Attributes:
        num_items: catalogue size N; item ids are ``0..N-1`` and ``N`` is the padding id.
        max_len: L, the number of most recent history items read (older ones are dropped).
        hidden_size: d, the embedding and hidden size.
        num_heads: attention heads (must divide ``hidden_size``).
        num_blocks: self-attention blocks.
        dropout: dropout on the embeddings, the attention weights and the feed-forward output.
    """

    num_items: int
    max_len: int = 10
    hidden_size: int = 64
    num_heads: int = 1
    num_blocks: int = 1
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.num_items < 2:
            raise ValueError(
                f"num_items must be >= 2 (a negative needs an item other than the target), got {self.num_items}"
            )
        if self.max_len < 1 or self.num_blocks < 1 or self.num_heads < 1:
            raise ValueError(
                "max_len, num_blocks and num_heads must be >= 1, got "
                f"{self.max_len}, {self.num_blocks}, {self.num_heads}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads}); change either"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def pad_id(self) -> int:
        """The padding item id (``num_items``)."""
        return self.num_items


def encode_histories(
    histories: Iterable[Sequence[int]], num_items: int, max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded id matrix and lengths from history lists (oldest first).

    Histories longer than ``max_len`` keep their ``max_len`` most recent items.

    Returns:
        ``(seq, lengths)``: int64 ``[R, max_len]`` padded with ``num_items``, and int64 ``[R]`` in ``1..max_len``.

    Raises:
        ValueError: an empty history (SASRec has nothing to read) or an id outside ``[0, num_items)``.
    """
    rows = [list(h)[-max_len:] for h in histories]
    seq = np.full((len(rows), max_len), num_items, dtype=np.int64)  # [R, L]
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))  # [R]
    if rows and lengths.min() == 0:
        raise ValueError(f"history {int(np.argmin(lengths))} is empty; SASRec needs at least one history item per row")
    for i, r in enumerate(rows):
        seq[i, : len(r)] = r
    real = np.arange(max_len)[None, :] < lengths[:, None]  # [R, L]
    bad = real & ((seq < 0) | (seq >= num_items))
    if bad.any():
        row = int(bad.any(axis=1).argmax())
        raise ValueError(f"history {row} has an item id outside [0, {num_items}): {rows[row]}")
    return torch.from_numpy(seq), torch.from_numpy(lengths)


@dataclass
class SequenceSplit:
    """One split as tensors: ``seq`` [R, L] (right-padded), ``lengths`` [R], ``targets`` [R] (next item ids)."""

    seq: torch.Tensor
    lengths: torch.Tensor
    targets: torch.Tensor

    @classmethod
    def from_dataset(
        cls, dataset: Dataset, num_items: int, max_len: int, require_row_order: bool = True
    ) -> SequenceSplit:
        """From a split of `load_amazon` (columns ``history_item_id``, ``item_id``, ``row_index``), in row order.

        Args:
            require_row_order: check that ``row_index`` is ``0..R-1`` (training and logit export, where row i must
                stay CSV row i). Evaluation passes False: it scores any subset of rows, e.g. a random sample.

        Raises:
            ValueError: ``require_row_order`` and ``row_index`` is not ``0..R-1`` in order.
        """
        if require_row_order and "row_index" in dataset.column_names:
            row_index = np.asarray(dataset["row_index"])
            if not np.array_equal(row_index, np.arange(len(row_index))):
                raise ValueError("the split's row_index is not 0..R-1 in order; do not shuffle or filter the split")
        seq, lengths = encode_histories(dataset["history_item_id"], num_items, max_len)
        targets = torch.as_tensor(np.asarray(dataset["item_id"], dtype=np.int64))
        if targets.numel() and (targets.min() < 0 or targets.max() >= num_items):
            raise ValueError(f"a target item id is outside [0, {num_items})")
        return cls(seq, lengths, targets)

    def __len__(self) -> int:
        return int(self.targets.shape[0])


class _CausalSelfAttention(nn.Module):
    """Attention with query = LN(x), key = value = x, a causal and key-padding mask, and a residual on the query."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(hidden_size, hidden_size)
        self.k = nn.Linear(hidden_size, hidden_size)
        self.v = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)

    def forward(self, query: torch.Tensor, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        B, L, d = x.shape
        h, dh = self.num_heads, d // self.num_heads
        q = self.q(query).view(B, L, h, dh).transpose(1, 2)  # [B, h, L, dh]
        k = self.k(x).view(B, L, h, dh).transpose(1, 2)  # [B, h, L, dh]
        v = self.v(x).view(B, L, h, dh).transpose(1, 2)  # [B, h, L, dh]
        # NOTE: scaled by 1/sqrt(d/h); the official code uses 1/sqrt(d) (same for one head).
        scores = q @ k.transpose(-1, -2) / math.sqrt(dh)  # [B, h, L, L]
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()  # [L, L]
        allowed = causal[None, None] & valid[:, None, None, :]  # [B, 1, L, L]; key 0 is always real, no empty row
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)  # [B, h, L, L]
        # NOTE: the query mask comes from the ids; the official code uses sign(sum(LN_1(x))), almost never zero.
        weights = weights * valid[:, None, :, None]  # [B, h, L, L] padded queries attend to nothing
        out = self.dropout(weights) @ v  # [B, h, L, dh]
        return out.transpose(1, 2).reshape(B, L, d) + query  # [B, L, d]


class _FeedForward(nn.Module):
    """Point-wise feed-forward (the official 1x1 convolutions are linear layers) with an inner residual and LN."""

    def __init__(self, hidden_size: int, dropout: float):
        super().__init__()
        self.w1 = nn.Linear(hidden_size, hidden_size)
        self.w2 = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dropout(self.w2(F.relu(self.w1(x)))))  # [B, L, d]


class _Block(nn.Module):
    """LN_1 -> attention (residual on the normalised query) -> LN_2 -> feed-forward -> times the padding mask."""

    def __init__(self, config: SASRecConfig):
        super().__init__()
        d = config.hidden_size
        self.norm_q = nn.LayerNorm(d)
        self.attn = _CausalSelfAttention(d, config.num_heads, config.dropout)
        self.norm_ff = nn.LayerNorm(d)
        self.ff = _FeedForward(d, config.dropout)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        a = self.attn(self.norm_q(x), x, valid)  # [B, L, d]
        return self.ff(self.norm_ff(a)) * valid[..., None]  # [B, L, d]


class SASRec(nn.Module):
    """SASRec as in the Flower paper's code; see the module docstring for the equations and the NOTEs.

    Args:
        config: the model shape; ``SASRecConfig(num_items=N)`` gives the paper's model.

    Inputs of every method: ``seq`` int64 [B, L] right-padded with ``config.pad_id``, ``lengths`` int64 [B] in
    ``1..L`` (`encode_histories` builds both from lists).
    """

    def __init__(self, config: SASRecConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        # N(0, 1) initialisation of items and positions, as the official code (torch's nn.Embedding default).
        self.item_emb = nn.Embedding(config.num_items + 1, d, padding_idx=config.pad_id)
        self.pos_emb = nn.Embedding(config.max_len, d)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.num_blocks))
        self.norm_out = nn.LayerNorm(d)
        self.out = nn.Linear(d, config.num_items)  # not tied to item_emb, as in the official code

    @property
    def device(self) -> torch.device:
        return self.out.weight.device

    def forward(self, seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The sequence representation h at the last real position, [B, d]."""
        B, L = seq.shape
        valid = seq != self.config.pad_id  # [B, L]
        pos = torch.arange(L, device=seq.device)  # [L]
        x = self.emb_dropout(self.item_emb(seq) + self.pos_emb(pos)[None]) * valid[..., None]  # [B, L, d]
        for block in self.blocks:
            x = block(x, valid)  # [B, L, d]
        x = self.norm_out(x)  # [B, L, d]
        return x[torch.arange(B, device=seq.device), lengths - 1]  # [B, d]

    def full_sort_predict(self, seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits of every item, [B, num_items] (RecBole's ``full_sort_predict``)."""
        return self.out(self.forward(seq, lengths))  # [B, N]

    def _item_logits(self, h: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Logit of item ``items[b]`` for row b from its representation ``h[b]``: [B]."""
        return (h * self.out.weight[items]).sum(-1) + self.out.bias[items]  # [B]

    def predict(self, seq: torch.Tensor, lengths: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Logit of one given item per row, [B] (RecBole's ``predict``)."""
        return self._item_logits(self.forward(seq, lengths), items)

    def calculate_loss(
        self, seq: torch.Tensor, lengths: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor
    ) -> torch.Tensor:
        r"""BCE with one positive (label 1) and one negative (label 0) logit per row, averaged over the 2B logits.

        .. math:: \mathcal{L} = -\frac{1}{2B}\sum_b \big[\log\sigma(s_{b,y_b}) + \log(1 - \sigma(s_{b,y^-_b}))\big]
        """
        h = self.forward(seq, lengths)  # [B, d]
        # NOTE: gathers the two output rows instead of computing all N logits (the official code); same value.
        logits = torch.cat([self._item_logits(h, positives), self._item_logits(h, negatives)])  # [2B]
        labels = torch.cat([torch.ones_like(positives), torch.zeros_like(negatives)]).to(logits.dtype)  # [2B]
        return F.binary_cross_entropy_with_logits(logits, labels)

    @torch.no_grad()
    def score_rows(self, histories: Iterable[Sequence[int]], batch_size: int = 4096) -> torch.Tensor:
        """Raw logits of every item for each history (oldest first), in eval mode: float32 [R, num_items] on CPU.

        These are the ``preference_scores`` of Flower's personalised rewards, D3's guidance and the PPO reward
        (consumers apply their own softmax or normalisation, as in the paper).
        """
        seq, lengths = encode_histories(histories, self.config.num_items, self.config.max_len)
        return self._score(seq, lengths, batch_size)

    @torch.no_grad()
    def _score(self, seq: torch.Tensor, lengths: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        was_training = self.training
        self.eval()
        device = self.device
        try:
            chunks = [
                self.full_sort_predict(seq[i : i + batch_size].to(device), lengths[i : i + batch_size].to(device))
                .float()
                .cpu()
                for i in range(0, seq.shape[0], batch_size)
            ]
        finally:
            self.train(was_training)
        return torch.cat(chunks) if chunks else torch.empty(0, self.config.num_items)

    def save_pretrained(self, output_dir: str | os.PathLike) -> Path:
        """Write ``sasrec_config.json`` and ``sasrec_model.pt`` (the state dict) into ``output_dir``."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_NAME).write_text(json.dumps({"model_type": "sasrec", **asdict(self.config)}, indent=2) + "\n")
        torch.save({k: v.detach().cpu() for k, v in self.state_dict().items()}, out / WEIGHTS_NAME)
        return out

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> SASRec:
        """Load a model written by `save_pretrained` (in eval mode)."""
        path = Path(model_dir)
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(
                f"{path / CONFIG_NAME} not found; pass a directory written by SASRec.save_pretrained"
            )
        raw = json.loads((path / CONFIG_NAME).read_text())
        if raw.pop("model_type", "sasrec") != "sasrec":
            raise ValueError(f"{path / CONFIG_NAME} is not a SASRec config")
        model = cls(SASRecConfig(**raw))
        model.load_state_dict(torch.load(path / WEIGHTS_NAME, map_location=map_location, weights_only=True))
        return model.to(map_location).eval()


def sample_negatives(targets: torch.Tensor, num_items: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """One item per row drawn uniformly from the ``num_items - 1`` items other than the row's target: int64 [B]."""
    draw = torch.randint(0, num_items - 1, targets.shape, generator=generator, device=targets.device)  # [B]
    return draw + (draw >= targets).long()  # skip the target: uniform over the others


def full_ranking_metrics(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = EVAL_KS) -> dict[str, float]:
    r"""Item-level HR@K and NDCG@K by full ranking of all items (the official SASRec protocol).

    The 0-based rank of the target is the number of items with a higher logit, plus those with an equal logit and a
    smaller id (a stable descending sort). With one relevant item,
    :math:`\mathrm{HR@K} = \frac1U\sum_u \mathbb 1[r_u < K]` and
    :math:`\mathrm{NDCG@K} = \frac1U\sum_u \mathbb 1[r_u < K]/\log_2(r_u + 2)`.
    """
    ranks = _target_ranks(logits, targets)  # [U]
    return _metrics_from_ranks(ranks, ks)


def _target_ranks(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    t = logits.gather(1, targets[:, None])  # [U, 1]
    ids = torch.arange(logits.shape[1], device=logits.device)[None]  # [1, N]
    return ((logits > t) | ((logits == t) & (ids < targets[:, None]))).sum(1)  # [U]


def _metrics_from_ranks(ranks: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    ranks = ranks.double()
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks < k  # [U]
        out[f"HR@{k}"] = hit.double().mean().item()
        out[f"NDCG@{k}"] = (hit / torch.log2(ranks + 2)).mean().item()
    return out


@dataclass
class SASRecTrainingArguments:
    """Training settings (the paper's values, except ``epochs``: see the field).

    Attributes:
        epochs: maximum number of epochs (official 200; early stopping normally ends well before).
        patience: stop after this many epochs without a better validation NDCG@``eval_k``.
        lr: Adam learning rate.
        weight_decay: Adam's (coupled, L2) weight decay.
        batch_size: training rows per step.
        eval_k: the K of the early-stopping metric NDCG@K (full ranking over all items).
        eval_batch_size: rows per forward pass when scoring.
        seed: seeds model initialisation (in `fit_sasrec`), dropout, shuffling and negatives.
        device: torch device string.
        progress: show a tqdm bar over epochs with the loss and the validation metric.
        log_every: without the bar (``progress=False``), print one line with the loss and the validation metric
            every this many epochs and at the last one (0: silent).
    """

    epochs: int = 200
    patience: int = 20
    lr: float = 1e-3
    weight_decay: float = 1e-5
    batch_size: int = 1024
    eval_k: int = 20
    eval_batch_size: int = 4096
    seed: int = 1
    device: str = "cpu"
    progress: bool = True
    log_every: int = 1

    def __post_init__(self) -> None:
        if self.log_every < 0:
            raise ValueError(f"log_every must be >= 0 (0 = silent), got {self.log_every}")
        for name in ("epochs", "patience", "batch_size", "eval_k", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"lr must be > 0 and weight_decay >= 0, got {self.lr} and {self.weight_decay}")


@dataclass
class SASRecTrainResult:
    """Outcome of `train_sasrec`: the best epoch (1-based), its validation NDCG@K, epochs run, per-epoch log."""

    best_epoch: int
    best_valid_ndcg: float
    epochs_run: int
    stopped_early: bool
    wall_time_s: float
    history: list[dict[str, float]] = field(default_factory=list)


def train_sasrec(
    model: SASRec, train: SequenceSplit, valid: SequenceSplit, args: SASRecTrainingArguments | None = None
) -> SASRecTrainResult:
    """Train ``model`` in place with BCE and one uniform negative; early stopping on validation NDCG@``eval_k``.

    After training the model holds the weights of the best validation epoch and is in eval mode.
    """
    args = args or SASRecTrainingArguments()
    if len(train) == 0 or len(valid) == 0:
        raise ValueError(f"train and valid must be non-empty, got {len(train)} and {len(valid)} rows")
    from tqdm.auto import tqdm

    start = time.perf_counter()
    device = torch.device(args.device)
    model.to(device)
    torch.manual_seed(args.seed)  # dropout
    gen = torch.Generator().manual_seed(args.seed)  # shuffling and negatives, on CPU so runs match across devices
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    num_items = model.config.num_items
    best_ndcg, best_epoch, best_state, bad_epochs = -1.0, 0, None, 0
    history: list[dict[str, float]] = []
    bar = tqdm(range(1, args.epochs + 1), desc="SASRec", unit="epoch", disable=not args.progress)
    epoch = 0
    for epoch in bar:
        model.train()
        # NOTE: one shuffled pass over all rows; the official loop draws floor(N/B) independent random batches.
        order = torch.randperm(len(train), generator=gen)  # [R]
        negatives = sample_negatives(train.targets[order], num_items, gen)  # [R]
        total, count = 0.0, 0
        for i in range(0, len(order), args.batch_size):
            idx = order[i : i + args.batch_size]  # [B]
            loss = model.calculate_loss(
                train.seq[idx].to(device),
                train.lengths[idx].to(device),
                train.targets[idx].to(device),
                negatives[i : i + args.batch_size].to(device),
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * idx.numel()
            count += idx.numel()
        logits = model._score(valid.seq, valid.lengths, args.eval_batch_size)  # [Rv, N]
        metrics = full_ranking_metrics(logits, valid.targets, (args.eval_k,))
        ndcg = metrics[f"NDCG@{args.eval_k}"]
        history.append({"epoch": epoch, "loss": total / count, **{f"valid_{k}": v for k, v in metrics.items()}})
        if ndcg > best_ndcg:
            best_ndcg, best_epoch, bad_epochs = ndcg, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad_epochs += 1
        bar.set_postfix(loss=f"{total / count:.4f}", ndcg=f"{ndcg:.4f}", best=f"{best_ndcg:.4f}@{best_epoch}")
        if not args.progress and args.log_every and (epoch % args.log_every == 0 or bad_epochs >= args.patience):
            # without the bar a long run would print nothing at all; one line per `log_every` epochs instead
            print(
                f"SASRec epoch {epoch}/{args.epochs}: loss {total / count:.4f}, valid NDCG@{args.eval_k} {ndcg:.4f} "
                f"(best {best_ndcg:.4f} at epoch {best_epoch})",
                flush=True,
            )
        if bad_epochs >= args.patience:
            break
    bar.close()
    if best_state is None:
        raise FloatingPointError(
            f"validation NDCG@{args.eval_k} was never a number (last: {ndcg}); the loss diverged, try a smaller lr"
        )
    model.load_state_dict(best_state)
    model.eval()
    return SASRecTrainResult(
        best_epoch=best_epoch,
        best_valid_ndcg=best_ndcg,
        epochs_run=epoch,
        stopped_early=bad_epochs >= args.patience,
        wall_time_s=time.perf_counter() - start,
        history=history,
    )


def fit_sasrec(
    data: AmazonData,
    args: SASRecTrainingArguments | None = None,
    **config_overrides: Any,
) -> tuple[SASRec, SASRecTrainResult]:
    """Seed, build and train a SASRec on ``data``'s train split with early stopping on its valid split.

    Args:
        data: from `trl_flower.data.load_amazon` (or `make_synthetic`), with ``train`` and ``valid`` splits.
        args: training settings; default `SASRecTrainingArguments()`.
        **config_overrides: `SASRecConfig` fields other than ``num_items`` (e.g. ``hidden_size=32``).
    """
    args = args or SASRecTrainingArguments()
    config = SASRecConfig(num_items=data.num_items, **config_overrides)
    train = SequenceSplit.from_dataset(data.splits["train"], config.num_items, config.max_len)
    valid = SequenceSplit.from_dataset(data.splits["valid"], config.num_items, config.max_len)
    torch.manual_seed(args.seed)  # initialisation
    model = SASRec(config)
    return model, train_sasrec(model, train, valid, args)


def out_of_fold_logits(
    data: AmazonData,
    path: str | os.PathLike,
    folds: int = 5,
    args: SASRecTrainingArguments | None = None,
    fold_seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Out-of-fold logits of the training rows: float32 ``.npy`` [R, num_items], row i = CSV row i.

    The training rows are split into `folds` random folds (`fold_seed`); for each fold a fresh SASRec (same
    settings and seed as `fit_sasrec`, early stopping on the valid split) is trained on the other folds and scores
    the held-out rows. Why: SASRec's logits on its own training rows are in-sample (it was fit on those very
    targets and ranks them in its top 10 about nine times as often as on unseen rows), so rewards built from them
    mostly repeat the target SFT already teaches; out-of-fold logits carry what the model generalises to.
    SASRec is trained on the last position of each row only, so a held-out row's (history, target) pair is never
    a training example of its fold's model.

    Costs `folds` SASRec trainings. Written fold by fold into a memory map.

    Args:
        data: from `trl_flower.data.load_amazon`, with ``train`` and ``valid`` splits (train in CSV order).
        path: the ``.npy`` file to write.
        folds: number of folds K >= 2.
        args: training settings of every fold model (default `SASRecTrainingArguments()`).
        fold_seed: seed of the row-to-fold assignment.
        **config_overrides: `SASRecConfig` fields other than ``num_items``.
    """
    if folds < 2:
        raise ValueError(f"folds must be >= 2 (each model leaves one fold out), got {folds}")
    args = args or SASRecTrainingArguments()
    config = SASRecConfig(num_items=data.num_items, **config_overrides)
    train = SequenceSplit.from_dataset(data.splits["train"], config.num_items, config.max_len)
    valid = SequenceSplit.from_dataset(data.splits["valid"], config.num_items, config.max_len)
    if len(train) < folds:
        raise ValueError(f"{len(train)} training rows cannot fill {folds} folds; lower folds")
    fold_of_row = np.random.default_rng(fold_seed).permutation(len(train)) % folds  # [R] balanced folds
    path = Path(path)
    # folds are written as they finish: an interrupted run must not leave a file whose unfinished rows read as zeros
    with _npy_written_whole(path, (len(train), config.num_items)) as out:
        for fold in range(folds):
            held = torch.from_numpy(np.flatnonzero(fold_of_row == fold))  # [R_f]
            kept = torch.from_numpy(np.flatnonzero(fold_of_row != fold))  # [R - R_f]
            fit_rows = SequenceSplit(train.seq[kept], train.lengths[kept], train.targets[kept])
            torch.manual_seed(args.seed)  # initialisation, as fit_sasrec
            model = SASRec(config)
            result = train_sasrec(model, fit_rows, valid, args)
            print(
                f"SASRec fold {fold + 1}/{folds}: best epoch {result.best_epoch}, valid NDCG@{args.eval_k} "
                f"{result.best_valid_ndcg:.4f}, {result.wall_time_s:.0f} s",
                flush=True,
            )
            out[held.numpy()] = model._score(train.seq[held], train.lengths[held], args.eval_batch_size).numpy()
    return path


def target_probability_stats(
    logits: np.ndarray, targets: Sequence[int], rows: int = 2000, seed: int = 0
) -> dict[str, float]:
    """How strongly per-row logits point at each row's own target (the check of in-sample vs out-of-fold logits).

    On a random sample of `rows` rows (`seed`; all if fewer), with p = softmax over the catalogue of each row:
    mean and median p(target), the share of rows whose target is in the top 10 and first, the mean top-1 mass and
    the mean entropy (nats).

    Args:
        logits: [R, num_items] (a memory map is fine: only the sampled rows are read).
        targets: the target item id of each of the R rows.
    """
    targets = np.asarray(targets, dtype=np.int64)
    if logits.shape[0] != len(targets):
        raise ValueError(f"{logits.shape[0]} logit rows but {len(targets)} targets")
    pick = np.arange(len(targets))
    if len(targets) > rows:
        pick = np.sort(np.random.default_rng(seed).choice(len(targets), rows, replace=False))
    log_p = torch.log_softmax(torch.as_tensor(np.asarray(logits[pick], dtype=np.float64)), dim=-1)  # [n, M]
    t = torch.as_tensor(targets[pick])  # [n]
    p_target = log_p.gather(1, t[:, None]).squeeze(1).exp()  # [n]
    rank = (log_p > log_p.gather(1, t[:, None])).sum(1)  # [n] 0-based rank of the target
    return {
        "rows": int(len(pick)),
        "mean_p_target": float(p_target.mean()),
        "median_p_target": float(p_target.median()),
        "target_in_top10": float((rank < 10).double().mean()),
        "target_first": float((rank == 0).double().mean()),
        "mean_top1_mass": float(log_p.max(1).values.exp().mean()),
        "entropy_nats": float(-torch.special.xlogy(log_p.exp(), log_p.exp()).sum(1).mean()),  # 0·log 0 = 0
    }


def save_row_logits(
    model: SASRec, histories: Sequence[Sequence[int]], path: str | os.PathLike, batch_size: int = 4096
) -> Path:
    """Write the logits of every history as a float32 ``.npy`` of shape [R, num_items]; row i = ``histories[i]``.

    Written chunk by chunk into a memory-mapped file, so a large split (CDs train: 49k x 5.8k) never sits in memory.
    """
    path = Path(path)
    seq, lengths = encode_histories(histories, model.config.num_items, model.config.max_len)
    with _npy_written_whole(path, (seq.shape[0], model.config.num_items)) as out:
        for i in range(0, seq.shape[0], batch_size):
            scores = model._score(seq[i : i + batch_size], lengths[i : i + batch_size], batch_size)
            out[i : i + batch_size] = scores.numpy()
    return path


@contextlib.contextmanager
def _npy_written_whole(path: Path, shape: tuple[int, int]):
    """A float32 ``.npy`` memory map to fill, written as ``<name>.partial`` and renamed to `path` only when the block
    ends without an error: an interrupted write never leaves a file under the name readers look for."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=shape)
    yield out
    out.flush()
    del out
    partial.replace(path)


def export_split_logits(
    model: SASRec,
    data: AmazonData,
    output_dir: str | os.PathLike,
    splits: Sequence[str] = ("train", "valid", "test"),
    batch_size: int = 4096,
) -> dict[str, Path]:
    """Save ``<output_dir>/<split>_logits.npy`` for each split (row i = CSV row i); returns split -> path.

    These files are the ``preference_scores`` read by the personalised rewards, D3 and the PPO reward.
    """
    paths = {}
    for split in splits:
        dataset = data.splits[split]
        row_index = np.asarray(dataset["row_index"])
        if not np.array_equal(row_index, np.arange(len(row_index))):
            raise ValueError(f"split {split!r}: row_index is not 0..R-1 in order; export from the unshuffled split")
        path = Path(output_dir) / f"{split}_logits.npy"
        paths[split] = save_row_logits(model, dataset["history_item_id"], path, batch_size)
    return paths


def evaluate_sasrec(
    model: SASRec,
    dataset: Dataset,
    items: Sequence[str],
    popularity: PopularityGroups,
    ks: Sequence[int] = EVAL_KS,
    list_k: int = 10,
    batch_size: int = 4096,
) -> dict[str, float | int]:
    """HR/NDCG by full ranking, and fairness/diversity of the top-``list_k`` lists, with the shared metric code.

    Keys:
        * ``HR@K``, ``NDCG@K`` for ``ks``: title level, from the top-max(ks) item lists mapped to titles, computed by
          `trl_flower.evaluation.metrics` exactly as for the LLM methods (a hit = the target's title).
        * ``DGU@{list_k}``, ``MGU@{list_k}``, ``H``, ``TTR``, ``invalid``, ``distinct_titles``: from the top-``list_k``
          titles of every row. NOTE: the official code computes SASRec's DGU/MGU/H/TTR from the top-1 item only.
        * ``item_HR@K``, ``item_NDCG@K``: item-id level, the official SASRec protocol (what Table 4 reports).
          They differ from the title level only when the catalogue has duplicate titles.

    NOTE: items are ranked by id; when two ids share a title both can appear in one list (an LLM's trie-constrained
    beams cannot repeat a title). History items are not excluded from the ranking (as in the official code).
    """
    from trl_flower.evaluation.metrics import hit_matrix, hr_ndcg_at_k, recommendation_metrics

    ks = tuple(ks)
    top_k = max(max(ks), list_k)
    if top_k > model.config.num_items:
        raise ValueError(
            f"cut-offs up to {top_k} need at least {top_k} items, the model has {model.config.num_items}; "
            "lower ks / list_k"
        )
    # any subset of rows can be evaluated (row_index only ties rows to exported logits)
    split = SequenceSplit.from_dataset(dataset, model.config.num_items, model.config.max_len, require_row_order=False)
    tops, ranks = [], []
    for i in range(0, len(split), batch_size):
        logits = model._score(split.seq[i : i + batch_size], split.lengths[i : i + batch_size], batch_size)  # [b, N]
        ranks.append(_target_ranks(logits, split.targets[i : i + batch_size]))  # [b]
        # a stable descending sort, so the lists agree with the ranks of full_ranking_metrics on ties
        tops.append(torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :top_k])  # [b, top_k]
    top = torch.cat(tops).numpy()  # [U, top_k]
    titles = np.asarray(items, dtype=object)[top].astype(str)  # [U, top_k]
    targets = list(dataset["item_title"])
    out: dict[str, float | int] = {}
    listed = recommendation_metrics(
        titles[:, :list_k], targets, popularity, items, ks=[k for k in ks if k <= list_k], fairness_ks=(list_k,)
    )
    beyond = [k for k in ks if k > list_k]
    if beyond:
        listed.update(hr_ndcg_at_k(hit_matrix(titles[:, : max(beyond)], targets), beyond))
    for k in ks:
        out[f"HR@{k}"], out[f"NDCG@{k}"] = listed[f"HR@{k}"], listed[f"NDCG@{k}"]
    for key in (f"DGU@{list_k}", f"MGU@{list_k}", "H", "TTR", "invalid", "distinct_titles", "num_users"):
        out[key] = listed[key]
    out.update({f"item_{k}": v for k, v in _metrics_from_ranks(torch.cat(ranks), ks).items()})
    return out
