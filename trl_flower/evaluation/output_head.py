r"""The output projection of a causal LM, evaluated only where trie-constrained decoding needs it.

A constrained beam-search step needs, for each row r (a beam's hidden state h_r) and each allowed token a,

    log p(a | r) = z_{r,a} / T − log Σ_{v ∈ V} exp(z_{r,v} / T),        z_{r,v} = w_v · h_r + b_v,

that is the logits of the few allowed tokens and **one normaliser per row**. ``generate`` materialises the whole
[rows × V] logit matrix (97 MB for 160 rows at Qwen2.5's 151,936 tokens) and several copies of it. Here the
normaliser is a running log-sum-exp over vocabulary chunks of the projection (:func:`log_normalizer`): no tensor
larger than one chunk of ``chunk_elements`` floats ever exists, and each chunk stays in cache while it is reduced.
The allowed logits are read out of the same chunks (the same matmul that ``lm_head`` would run, so the same values),
or, when no normaliser is needed (scores renormalised over the tree's children), gathered row by row from the
output embedding (:func:`edge_logits`).

:func:`split_model` finds the two halves of a causal LM (the decoder that returns hidden states, and the linear
``lm_head``); :func:`split_matches_model` checks once on a real prompt that ``lm_head(decoder(x))`` reproduces the
model's own logits, so a model with a non-standard head (logit soft-capping, scaling, a LoRA-wrapped head) is caught
and decoded with ``generate`` instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 18  # floats per [rows × vocabulary-chunk] block: 1 MiB in float32, about an L2 cache
MIN_CHUNK_COLUMNS = 256  # below this the matmul per chunk is too thin to run at speed

__all__ = [
    "CHUNK_ELEMENTS",
    "ModelParts",
    "chunk_columns",
    "edge_logits",
    "log_normalizer",
    "split_matches_model",
    "split_model",
]


@dataclass(frozen=True)
class ModelParts:
    """A causal LM as ``decoder`` (input ids, mask, positions, cache -> last hidden states) and its linear head.

    Attributes:
        decoder: the module that returns ``last_hidden_state`` (e.g. ``Qwen2Model``; LoRA layers stay inside it).
        weight: [V, H] output embedding.
        bias: [V] output bias, or None.
    """

    decoder: torch.nn.Module
    weight: torch.Tensor
    bias: torch.Tensor | None

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])


def split_model(model) -> ModelParts | None:
    """The decoder and linear head of a Hugging Face causal LM (PEFT wrappers are looked through), or None.

    None when the model has no ``get_decoder``/``get_output_embeddings`` pair or its head is not a plain
    ``torch.nn.Linear`` (e.g. a LoRA-adapted ``lm_head``): its logits cannot be rebuilt from the head's weight.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        head = base.get_output_embeddings()
        decoder = base.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    if type(head) is not torch.nn.Linear or decoder is None or decoder is base:
        return None
    if head.weight.dim() != 2 or head.weight.numel() == 0:  # e.g. a DeepSpeed ZeRO-3 partition placeholder
        return None
    return ModelParts(decoder=decoder, weight=head.weight, bias=head.bias)


@torch.no_grad()
def split_matches_model(model, parts: ModelParts, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> bool:
    """True if ``head(decoder(prompt))`` equals the model's own last-position logits on one prompt [1, P].

    Catches what :func:`split_model` cannot see from the module types: soft-capped or scaled logits (Gemma 2,
    Cohere, Granite), a forward that adds anything after the head. Tolerance: float rounding of the dtype.
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [1, P]
    try:
        ref = model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=1
        ).logits[0, -1]  # [V]
        hidden = parts.decoder(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state[0, -1]  # [H]
        mine = F.linear(hidden, parts.weight, parts.bias)  # [V]
    except (RuntimeError, TypeError, ValueError, AttributeError):  # the parts do not compose: not usable
        return False
    tol = 1e-3 if parts.weight.dtype == torch.float32 else 5e-2
    return ref.shape == mine.shape and torch.allclose(mine.float(), ref.float(), rtol=tol, atol=tol)


def chunk_columns(rows: int, vocab_size: int, chunk_elements: int = CHUNK_ELEMENTS) -> int:
    """Vocabulary columns per chunk so that a [rows × columns] block holds about `chunk_elements` floats."""
    return int(min(vocab_size, max(MIN_CHUNK_COLUMNS, chunk_elements // max(rows, 1))))


@torch.no_grad()
def log_normalizer(
    hidden: torch.Tensor,
    parts: ModelParts,
    rows: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""log Σ_v exp(z_{r,v} / T) for every row, and z_{r,a} / T at the requested (row, token) pairs, in one pass.

    The projection runs chunk by chunk over the vocabulary; each chunk's row maxima m_c and Σ exp(z/T − m_c) are
    kept ([R, n_chunks] floats) and combined at the end, log Σ_c exp(m_c) Σ_c, in float64. The requested logits are
    copied out of the chunk they fall in before it is reduced: they are the values ``lm_head`` itself computes.

    Args:
        hidden: [R, H] last hidden states.
        parts: the model's head (:func:`split_model`).
        rows, tokens: [E] pairs whose (tempered) logits are returned.
        temperature: T > 0.
        chunk_elements: size of the largest [R × chunk] block, in floats.

    Returns:
        normaliser [R] float32 and logits z/T [E] float32.
    """
    R, V = hidden.shape[0], parts.vocab_size
    columns = chunk_columns(R, V, chunk_elements)
    starts = list(range(0, V, columns))
    maxima = torch.empty(R, len(starts), dtype=torch.float32, device=hidden.device)  # [R, C]
    sums = torch.empty_like(maxima)  # [R, C]
    picked = torch.empty(tokens.shape[0], dtype=torch.float32, device=hidden.device)  # [E]
    by_token = torch.argsort(tokens)  # [E] pairs in token order: each chunk owns a contiguous run
    sorted_tokens = tokens[by_token]  # [E]
    bounds = torch.searchsorted(sorted_tokens, torch.tensor([*starts, V], device=tokens.device)).tolist()
    for c, start in enumerate(starts):  # V / columns chunks: a loop over blocks, not over tokens
        stop = min(start + columns, V)
        bias = None if parts.bias is None else parts.bias[start:stop]
        z = F.linear(hidden, parts.weight[start:stop], bias).float()  # [R, c]: the only vocabulary-sized block
        lo, hi = bounds[c], bounds[c + 1]
        if hi > lo:
            edge = by_token[lo:hi]  # [e] requested pairs in this chunk
            picked[edge] = z[rows[edge], tokens[edge] - start]
        if temperature != 1.0:
            z.div_(temperature)
        m = z.amax(dim=1)  # [R]
        maxima[:, c] = m
        sums[:, c] = z.sub_(m.unsqueeze(1)).exp_().sum(dim=1)  # in place: no second [R, c] block
    top = maxima.amax(dim=1, keepdim=True)  # [R, 1]
    total = (sums.double() * torch.exp((maxima - top).double())).sum(dim=1)  # [R]
    normaliser = (top.squeeze(1).double() + torch.log(total)).float()  # [R]
    if temperature != 1.0:
        picked = picked / temperature
    return normaliser, picked


@torch.no_grad()
def edge_logits(
    hidden: torch.Tensor,
    parts: ModelParts,
    rows: torch.Tensor,
    tokens: torch.Tensor,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """z_{r,a} = w_a · h_r + b_a at (row, token) pairs [E], from gathered output-embedding rows; float32 [E].

    Pairs are processed in blocks of ``chunk_elements // H`` so that the gathered [block, H] weights stay within one
    chunk (the root of a large catalogue has thousands of children per row).
    """
    E, H = tokens.shape[0], hidden.shape[1]
    out = torch.empty(E, dtype=torch.float32, device=hidden.device)  # [E]
    block = max(1, chunk_elements // max(H, 1))
    for lo in range(0, E, block):  # E / block blocks (usually one)
        r, t = rows[lo : lo + block], tokens[lo : lo + block]
        z = (parts.weight[t].float() * hidden[r].float()).sum(dim=1)  # [e]
        if parts.bias is not None:
            z = z + parts.bias[t].float()
        out[lo : lo + block] = z
    return out
