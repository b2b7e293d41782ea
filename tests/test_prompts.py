"""Prompts: the exact reference text, the plural quirk option, chat mode, and the tokenisation-consistency check."""

from __future__ import annotations

import pytest

from trl_flower.data.prompts import (
    CATEGORY_WORDS,
    PromptBuilder,
    category_words,
    check_prompt_tokenization,
    history_free_prompt,
    reference_prompt,
)

# Written out by hand from flower_reference.md §2.1 (note the spaces before "\n" after "request.", "Input:" and
# "Response:").
EXPECTED_CDS = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request. \n\n"
    "### Instruction:\n"
    "Given a list of musics the user recently enjoy, please write a new musics that the user may bought\n\n"
    "### User Input: \n"
    "The user has enjoyed the following musicss before: Hot Rocks, Kind of Blue\n\n"
    "### Response: \n"
)


def test_reference_prompt_exact_text():
    assert reference_prompt(["Hot Rocks", "Kind of Blue"], "musics") == EXPECTED_CDS
    assert PromptBuilder.from_dataset("CDs_and_Vinyl")(["Hot Rocks", "Kind of Blue"]) == EXPECTED_CDS


@pytest.mark.parametrize(
    "name, quirk_line, fixed_line",
    [
        ("CDs_and_Vinyl", "following musicss before", "following musics before"),
        ("Video_Games", "following video gamess before", "following video games before"),
        ("Movies_and_TV", "following movies and TVs before", "following movies and TV before"),
    ],
)
def test_category_words_and_plural_quirk(name, quirk_line, fixed_line):
    assert category_words(name) == CATEGORY_WORDS[name]
    assert category_words(name.lower()) == CATEGORY_WORDS[name]
    with_quirk = PromptBuilder.from_dataset(name)(["A"])
    without = PromptBuilder.from_dataset(name, reproduce_plural_quirk=False)(["A"])
    assert quirk_line in with_quirk and fixed_line not in with_quirk
    assert fixed_line in without
    assert f"a new {CATEGORY_WORDS[name]} that" in with_quirk


def test_unknown_category_raises():
    with pytest.raises(ValueError, match="no category words for dataset 'Books'.*category="):
        category_words("Books")


def test_history_truncated_to_last_ten_oldest_first():
    history = [f"T{i}" for i in range(13)]
    prompt = PromptBuilder("musics")(history)
    assert "before: T3, T4, T5, T6, T7, T8, T9, T10, T11, T12\n\n### Response: \n" in prompt
    assert "T2," not in prompt
    assert "before: T11, T12\n" in PromptBuilder("musics", max_history=2)(history)


def test_for_row_and_add_prompts():
    from datasets import Dataset

    ds = Dataset.from_dict({"history_item_title": [["A"], ["A", "B"]], "item_title": ["B", "C"]})
    build = PromptBuilder("musics")
    out = build.add_prompts(ds)
    assert out["prompt"] == [build(["A"]), build(["A", "B"])]
    assert build.for_row(ds[1]) == build(["A", "B"])


def test_history_free_prompts():
    assert history_free_prompt() == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n"
        "### Instruction:\nPlease recommend a movie to the user. Directly output the title of the movie.\n"
        "### Response:\n"
    )
    assert history_free_prompt(response_space=True).endswith("### Response: \n")


def test_chat_mode(tiny_tokenizer):
    build = PromptBuilder("musics", mode="chat", tokenizer=tiny_tokenizer)
    prompt = build(["Hot Rocks"])
    user = EXPECTED_CDS.replace("Hot Rocks, Kind of Blue", "Hot Rocks").removesuffix("\n\n### Response: \n")
    assert prompt == f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    with_system = PromptBuilder("musics", mode="chat", tokenizer=tiny_tokenizer, system_prompt="Be brief.")(["A"])
    assert with_system.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")


def test_builder_validation(tiny_tokenizer):
    with pytest.raises(ValueError, match="mode='chat' needs a tokenizer with a chat template"):
        PromptBuilder("musics", mode="chat")
    with pytest.raises(ValueError, match="mode must be"):
        PromptBuilder("musics", mode="fancy")
    with pytest.raises(ValueError, match="system_prompt is only used in mode='chat'"):
        PromptBuilder("musics", system_prompt="x")
    with pytest.raises(ValueError, match="max_history"):
        PromptBuilder("musics", max_history=0)


def test_tokenization_check_passes_for_reference_and_chat(tiny_tokenizer, tiny_titles):
    prompts = [PromptBuilder("musics")(tiny_titles[:3]), PromptBuilder("musics")(tiny_titles[5:])]
    assert check_prompt_tokenization(tiny_tokenizer, prompts, tiny_titles) is None
    chat = PromptBuilder("musics", mode="chat", tokenizer=tiny_tokenizer)(tiny_titles[:2])
    check_prompt_tokenization(tiny_tokenizer, [chat], tiny_titles, terminator_id=tiny_tokenizer.eos_token_id)


def test_tokenization_check_reports_offending_titles(tiny_tokenizer, tiny_titles):
    # A prompt ending in a bare space: byte-level BPE glues the space to the title's first word.
    prompt = "Recommend: "
    with pytest.raises(ValueError) as err:
        check_prompt_tokenization(tiny_tokenizer, [prompt], tiny_titles)
    message = str(err.value)
    assert "'Blue Train'" in message and "encode(prompt + title)" in message
    assert "Fix: end the prompt" in message and "mode='reference'" in message
    p_ids = tiny_tokenizer("Recommend: ", add_special_tokens=False)["input_ids"]
    joint = tiny_tokenizer("Recommend: Blue Train", add_special_tokens=False)["input_ids"]
    apart = p_ids + tiny_tokenizer("Blue Train", add_special_tokens=False)["input_ids"]
    assert joint != apart and str(apart[-3:])[1:-1] in message  # the message shows the token ids


def _qwen_like_tokenizer():
    """A byte-level BPE with Qwen2's pre-tokenizer regex: punctuation absorbs a following newline (as in Qwen)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    pattern = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+"
    )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, show_progress=False, special_tokens=["<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(["Rumours.\n", "Blue Train\n", "A Love Supreme!\n"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")


def test_newline_terminator_merging_with_punctuation_is_reported():
    tok = _qwen_like_tokenizer()
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1
    titles = ["Blue Train", "Rumours.", "A Love Supreme!"]
    prompt = "### Response: \n"
    check_prompt_tokenization(tok, [prompt], titles)  # the prompt boundary itself is fine
    with pytest.raises(ValueError, match=r"merges with the end of 2 of 3 titles.*'Rumours\.'.*eos_token_id"):
        check_prompt_tokenization(tok, [prompt], titles, terminator_id=newline[0])
    check_prompt_tokenization(tok, [prompt], titles, terminator_id=tok.eos_token_id)  # a special token never merges


def test_tokenization_check_input_errors(tiny_tokenizer):
    with pytest.raises(ValueError, match="empty or whitespace"):
        check_prompt_tokenization(tiny_tokenizer, ["p\n"], ["A", " "])
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        check_prompt_tokenization(tiny_tokenizer, ["p\n"], ["A"], terminator_id=10**6)
    with pytest.raises(ValueError, match="at least one prompt"):
        check_prompt_tokenization(tiny_tokenizer, [], ["A"])
