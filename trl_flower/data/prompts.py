"""Prompts of the Flower paper (flower_reference.md §2.1, §3.3) and a chat-template mode for instruct models.

Reference mode reproduces the official text character for character (template 0 of ``D3Dataset``)::

    Below is an instruction that describes a task, paired with an input that provides further context. Write a \
response that appropriately completes the request. <- trailing space
    <blank line>
    ### Instruction:
    Given a list of musics the user recently enjoy, please write a new musics that the user may bought
    <blank line>
    ### User Input: <- trailing space
    The user has enjoyed the following musicss before: Title 1, Title 2
    <blank line>
    ### Response: <- trailing space, then a newline; the title follows directly

The category words are ``musics`` (CDs_and_Vinyl), ``video games`` (Video_Games) and ``movies and TV``
(Movies_and_TV). The official history line appends an ``s`` to words that are already plural (``musicss``,
``video gamess``, ``movies and TVs``). Published checkpoints were trained on that text, so the quirk is the default
(``reproduce_plural_quirk=True``); pass ``False`` for the corrected wording. History titles are joined with ``", "``,
oldest first, and only the last ``max_history`` (10) are kept.

Chat mode renders one user message with ``tokenizer.apply_chat_template(..., add_generation_prompt=True)``. The
message is the reference text without its final ``### Response: \\n`` header: the chat template's assistant turn
takes that role.

Whatever the template, the title must tokenise the same way after the prompt as on its own, or the prefix tree's
token paths are not what the model sees; `check_prompt_tokenization` verifies this and fails loudly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from datasets import Dataset

INSTRUCTION_BLOCK = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n\n### Instruction:\n{instruction}\n\n"
)
"""First block of the reference prompt; note the space after "request." (official text)."""

INSTRUCTION_TEMPLATE = (
    "Given a list of {category} the user recently enjoy, please write a new {category} that the user may bought"
)
"""Instruction template 0, the only one the official code uses (grammar as in the original)."""

USER_INPUT_HEADER = "### User Input: \n"
HISTORY_LINE = "The user has enjoyed the following {category}{plural} before: {history}"
RESPONSE_HEADER = "\n\n### Response: \n"

CATEGORY_WORDS: dict[str, str] = {
    "CDs_and_Vinyl": "musics",
    "Video_Games": "video games",
    "Movies_and_TV": "movies and TV",
}
"""Dataset name -> the category words of the official prompt (``category_dict`` in the official scripts)."""

HISTORY_FREE_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n"
    "### Instruction:\nPlease recommend a {item} to the user. Directly output the title of the {item}.\n"
    "### Response:{space}\n"
)

PromptMode = Literal["reference", "chat"]


def category_words(dataset_name: str) -> str:
    """The category words for a dataset name (case-insensitive), e.g. ``"CDs_and_Vinyl"`` -> ``"musics"``.

    Raises:
        ValueError: an unknown name; pass ``category=...`` to `PromptBuilder` for other datasets.
    """
    for name, words in CATEGORY_WORDS.items():
        if name.lower() == str(dataset_name).lower():
            return words
    raise ValueError(
        f"no category words for dataset {dataset_name!r}; known: {sorted(CATEGORY_WORDS)}. "
        "Pass category='...' (the plural noun used in the prompt, e.g. 'books') explicitly."
    )


def check_category(dataset: str, category: str | None, data_flag: str) -> None:
    """Before anything loads: a dataset whose prompt category words are unknown needs ``--category``.

    Args:
        dataset: the dataset option's value (a category name or a dataset directory).
        category: the ``--category`` value, or None.
        data_flag: the dataset option's flag, named in the error (``--data``, ``--dataset_name``).
    """
    if category:
        return
    name = Path(dataset).expanduser().name  # the name `load_amazon` gives the dataset (its directory's)
    if name.lower() not in {known.lower() for known in CATEGORY_WORDS}:
        raise ValueError(
            f"{data_flag} {dataset}: the prompt names the item category, and its words are known only for "
            f"{sorted(CATEGORY_WORDS)}, not for {name!r}. Pass --category with the plural noun the prompt should "
            "use, e.g. --category books."
        )


def _history_line(history_titles: Sequence[str], category: str, max_history: int, plural_quirk: bool) -> str:
    if max_history < 1:
        raise ValueError(f"max_history must be >= 1, got {max_history}")
    recent = list(history_titles)[-max_history:]  # oldest first, the last max_history items
    return HISTORY_LINE.format(category=category, plural="s" if plural_quirk else "", history=", ".join(recent))


def reference_prompt(
    history_titles: Sequence[str],
    category: str,
    *,
    max_history: int = 10,
    reproduce_plural_quirk: bool = True,
) -> str:
    """The official prompt for one user, ending in ``"### Response: \\n"`` (the title follows directly).

    Args:
        history_titles: the user's item titles, oldest first; only the last ``max_history`` are used.
        category: the category words, e.g. ``"musics"`` (see `category_words`).
        max_history: the number of most recent history items shown (10 in the paper).
        reproduce_plural_quirk: append ``s`` to the category in the history line, as the official code does
            (``musicss``).

    Example:
        >>> print(reference_prompt(["A", "B"], "musics"))  # doctest: +NORMALIZE_WHITESPACE
        Below is an instruction that describes a task, paired with an input that provides further context. Write a
        response that appropriately completes the request.
        <BLANKLINE>
        ### Instruction:
        Given a list of musics the user recently enjoy, please write a new musics that the user may bought
        <BLANKLINE>
        ### User Input:
        The user has enjoyed the following musicss before: A, B
        <BLANKLINE>
        ### Response:
    """
    instruction = INSTRUCTION_BLOCK.format(instruction=INSTRUCTION_TEMPLATE.format(category=category))
    history = _history_line(history_titles, category, max_history, reproduce_plural_quirk)
    return instruction + USER_INPUT_HEADER + history + RESPONSE_HEADER


def history_free_prompt(item: str = "movie", *, response_space: bool = False) -> str:
    """The fixed prompt of the history-free distribution-fitting experiment (RQ1, flower_reference.md §3.3).

    Args:
        item: the singular item noun (the paper: ``"movie"``).
        response_space: ``False`` gives ``"### Response:\\n"`` (the GFlowNet runs); ``True`` gives
            ``"### Response: \\n"`` (the SFT/DPO/PPO baselines of RQ1).
    """
    return HISTORY_FREE_PROMPT.format(item=item, space=" " if response_space else "")


@dataclass
class PromptBuilder:
    """Builds the prompt string for a user history, in reference or chat mode.

    Args:
        category: category words shown in the prompt (e.g. ``"musics"``); `from_dataset` fills it from a name.
        mode: ``"reference"`` (the official plain-text prompt) or ``"chat"`` (one user message through the
            tokenizer's chat template with ``add_generation_prompt=True``, for instruct models).
        tokenizer: required in chat mode; must have a chat template.
        max_history: number of most recent history titles shown.
        reproduce_plural_quirk: keep the official ``{category}s`` in the history line (``musicss``).
        system_prompt: optional system message (chat mode only).

    Example:
        >>> build = PromptBuilder.from_dataset("Movies_and_TV")
        >>> build(["Up", "Heat"]).splitlines()[-3]
        'The user has enjoyed the following movies and TVs before: Up, Heat'
    """

    category: str
    mode: PromptMode = "reference"
    tokenizer: Any = None
    max_history: int = 10
    reproduce_plural_quirk: bool = True
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("reference", "chat"):
            raise ValueError(f"mode must be 'reference' or 'chat', got {self.mode!r}")
        if self.max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {self.max_history}")
        if self.mode == "chat":
            if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
                raise ValueError(
                    "mode='chat' needs a tokenizer with a chat template (tokenizer.chat_template); pass "
                    "tokenizer=..., or use mode='reference' for base models"
                )
        elif self.system_prompt is not None:
            raise ValueError("system_prompt is only used in mode='chat'; the reference prompt has no system message")

    @classmethod
    def from_dataset(cls, dataset_name: str, **kwargs: Any) -> PromptBuilder:
        """A builder with the category words of ``dataset_name`` (e.g. ``"CDs_and_Vinyl"``)."""
        return cls(category=category_words(dataset_name), **kwargs)

    def user_message(self, history_titles: Sequence[str]) -> str:
        """The chat-mode user message: the reference text without the final ``### Response:`` header."""
        instruction = INSTRUCTION_BLOCK.format(instruction=INSTRUCTION_TEMPLATE.format(category=self.category))
        history = _history_line(history_titles, self.category, self.max_history, self.reproduce_plural_quirk)
        return instruction + USER_INPUT_HEADER + history

    def __call__(self, history_titles: Sequence[str]) -> str:
        """The prompt for one history (titles oldest first); the item title is generated right after it."""
        if self.mode == "reference":
            return reference_prompt(
                history_titles,
                self.category,
                max_history=self.max_history,
                reproduce_plural_quirk=self.reproduce_plural_quirk,
            )
        messages = [{"role": "user", "content": self.user_message(history_titles)}]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def for_row(self, row: Mapping[str, Any]) -> str:
        """The prompt for a dataset row (uses its ``history_item_title`` column)."""
        return self(row["history_item_title"])

    def add_prompts(self, dataset: Dataset, column: str = "prompt") -> Dataset:
        """Return ``dataset`` with a ``column`` of prompts built from ``history_item_title`` (row order kept)."""
        return dataset.map(
            lambda batch: {column: [self(h) for h in batch["history_item_title"]]},
            batched=True,
            desc="prompts",
        )


def _encode_batch(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def check_prompt_tokenization(
    tokenizer: Any,
    prompts: Sequence[str],
    titles: Sequence[str],
    terminator_id: int | None = None,
    *,
    max_report: int = 3,
) -> None:
    """Check that titles tokenise the same way after a prompt as on their own.

    For every prompt ``p`` in ``prompts`` (a few samples are enough) and every title ``t`` checks
    ``encode(p + t) == encode(p) + encode(t)`` with ``add_special_tokens=False``. When ``terminator_id`` is given it
    also checks that the terminator stays a separate token after every title:
    ``encode(t + decode([terminator_id])) == encode(t) + [terminator_id]``. (With ``"\\n"`` as terminator this fails
    for titles ending in punctuation, which BPE merges with the newline: flower_reference.md §0.3.)

    Args:
        tokenizer: a Hugging Face tokenizer (called as ``tokenizer(texts, add_special_tokens=False)``).
        prompts: sample prompts, as the model will see them.
        titles: all item titles (duplicates are checked once).
        terminator_id: the token that ends an item, or None to skip that check.
        max_report: how many offending titles the error message shows.

    Raises:
        ValueError: an empty title, an unknown terminator id, or any inconsistency; the message names the first
            offending titles with their token ids and how to fix the template.
    """
    if not prompts or not titles:
        raise ValueError("check_prompt_tokenization needs at least one prompt and one title")
    empty = [i for i, t in enumerate(titles) if not t.strip()]
    if empty:
        raise ValueError(f"titles at positions {empty[:max_report]} are empty or whitespace; every item needs a title")
    titles = list(dict.fromkeys(titles))  # duplicate titles share one token path; check each once
    title_ids = _encode_batch(tokenizer, titles)
    problems: list[str] = []
    n_bad = 0
    for prompt in prompts:
        prompt_ids = _encode_batch(tokenizer, [prompt])[0]
        joint = _encode_batch(tokenizer, [prompt + t for t in titles])
        for title, ids, got in zip(titles, title_ids, joint):
            want = prompt_ids + ids
            if got != want:
                n_bad += 1
                if len(problems) < max_report:
                    cut = max(0, len(prompt_ids) - 3)  # show the prompt/title boundary only
                    problems.append(
                        f"{title!r}: encode(prompt + title)[{cut}:] = {got[cut:][:16]} but "
                        f"(encode(prompt) + encode(title))[{cut}:] = {want[cut:][:16]}"
                    )
    if n_bad:
        raise ValueError(
            f"prompt and title tokenise differently together than apart for {n_bad} of "
            f"{len(prompts) * len(titles)} (prompt, title) pairs, so the prefix tree's token paths are not what the "
            "model sees. First offending titles: " + "; ".join(problems) + ". Fix: end the prompt at a token "
            "boundary (a newline, or a space the tokenizer keeps separate, as the reference template's "
            "'### Response: \\n'), or use mode='reference'."
        )
    if terminator_id is None:
        return
    vocab_size = len(tokenizer)
    if not 0 <= int(terminator_id) < vocab_size:
        raise ValueError(f"terminator_id {terminator_id} is not in the tokenizer's vocabulary (size {vocab_size})")
    term_text = tokenizer.decode([int(terminator_id)])
    with_term = _encode_batch(tokenizer, [t + term_text for t in titles])
    merged = [
        (title, ids, got) for title, ids, got in zip(titles, title_ids, with_term) if got != ids + [int(terminator_id)]
    ]
    if merged:
        shown = "; ".join(
            f"{title!r}: encode(title + terminator) = {got[-6:]} but encode(title) + [terminator] ends "
            f"{(ids + [int(terminator_id)])[-6:]}"
            for title, ids, got in merged[:max_report]
        )
        raise ValueError(
            f"the terminator {term_text!r} (id {terminator_id}) merges with the end of {len(merged)} of {len(titles)} "
            f"titles, so 'title + terminator' text does not end in the terminator token. First offending titles: "
            f"{shown}. Fix: use a special end-of-turn token as terminator (tokenizer.eos_token_id), or "
            "mode='reference' to reproduce the official split (trie: encode(title) + [terminator])."
        )
