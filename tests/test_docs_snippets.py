"""Every Python snippet in README.md and docs/*.md runs in CI, or is marked in the page as not runnable with the reason.

A snippet is a fenced block tagged ``python``, ``py`` or ``pycon``. Each one is exactly one of:

* run here, against the tiny local model of conftest.py (`RUN_HERE`): the README's two blocks (the model directory
  stands in for ``path/to/model``), docs/trainer.md's usage block and docs/tree_and_rewards.md's doctest block;
* run by the page's own test in the fast suite, which executes every ``python`` block of that page (`RUN_ELSEWHERE`);
* marked on the line before its fence with ``<!-- not run: <reason> -->`` (a fragment, the full data, a GPU launch,
  an optional extra), the reason naming where the same code is tested.

A new snippet that is none of these fails `test_every_snippet_is_run_or_marked`.
"""

from __future__ import annotations

import contextlib
import doctest
import io
import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(python|py|pycon)\s*$")
MARK = re.compile(r"^<!-- not run: (.+) -->$")

# pages whose every ```python block another fast test executes (it prints-and-compares where the page shows output)
RUN_ELSEWHERE = {
    "docs/chaining.md": "tests/test_chain.py::test_docs_chaining_page_runs",
    "docs/data.md": "tests/test_data_amazon.py::test_docs_data_examples_run_and_print_what_they_say",
    "docs/decoding.md": "tests/test_decoding.py::test_docs_page_examples_print_what_they_say",
    "docs/evaluation.md": "tests/test_report.py::test_docs_evaluation_examples_run_and_print_what_they_say",
    "docs/losses.md": "tests/test_losses.py::test_docs_page_example_runs",
    "docs/metrics.md": "tests/test_metrics.py::test_docs_metrics_examples_run_and_print_what_they_say",
}
# (page, index of the snippet in the page) run by the tests below
RUN_HERE = {("README.md", 0), ("README.md", 1), ("docs/trainer.md", 0), ("docs/tree_and_rewards.md", 0)}


def snippets(page: Path) -> list[dict]:
    """The page's Python snippets: line of the fence, language tag, code, and the not-run reason (or None)."""
    lines = page.read_text().split("\n")
    out, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        end = lines.index("```", i + 1)
        mark = MARK.match(lines[i - 1]) if i else None
        out.append(
            {
                "line": i + 1,
                "lang": match.group(1),
                "code": "\n".join(lines[i + 1 : end]) + "\n",
                "reason": mark.group(1).strip() if mark else None,
            }
        )
        i = end + 1
    return out


def page_snippets(name: str) -> list[str]:
    return [s["code"] for s in snippets(REPO / name)]


def test_every_snippet_is_run_or_marked():
    unaccounted, counted = [], 0
    for page in PAGES:
        name = page.relative_to(REPO).as_posix()
        for index, snippet in enumerate(snippets(page)):
            where = f"{name}:{snippet['line']}"
            counted += 1
            if snippet["reason"] is not None:
                assert len(snippet["reason"]) >= 20, f"{where}: say why it is not run and where it is tested"
                assert (name, index) not in RUN_HERE, f"{where} is marked not run but runs here"
            elif (name, index) in RUN_HERE:
                continue
            elif name in RUN_ELSEWHERE and snippet["lang"] == "python":
                continue  # the page's test runs every ```python block
            else:
                unaccounted.append(where)
    assert not unaccounted, (
        f"snippets neither run in CI nor marked `<!-- not run: reason -->`: {unaccounted}; run them in this file or "
        "in the page's test, or mark them"
    )
    assert counted >= 28  # README's 2 + the docs' 26 (a page that lost its snippets would go unnoticed otherwise)


@pytest.mark.parametrize("name", sorted(RUN_ELSEWHERE))
def test_the_tests_that_run_pages_exist_and_read_them(name):
    path, function = RUN_ELSEWHERE[name].split("::")
    source = (REPO / path).read_text()
    body = source.split(f"def {function}(", 1)
    assert len(body) == 2, f"{RUN_ELSEWHERE[name]} is gone"
    assert Path(name).name in body[1].split("\ndef ", 1)[0], f"{RUN_ELSEWHERE[name]} no longer reads {name}"


def run(code: str, namespace: dict, where: str) -> str:
    """Execute `code` in `namespace`; returns what it printed."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        exec(compile(code, where, "exec"), namespace)
    return buffer.getvalue()


def test_readme_snippets_run_with_a_tiny_model(tiny_model_dir, tmp_path, monkeypatch):
    """The README's short example and its training block, in order, with a local tiny model for path/to/model."""
    monkeypatch.chdir(tmp_path)  # the training block writes flower-cds/
    first, second = (code.replace("path/to/model", str(tiny_model_dir)) for code in page_snippets("README.md"))
    namespace: dict = {}
    torch.manual_seed(0)
    printed = run(first, namespace, "README.md")
    tree, tokenizer = namespace["tree"], namespace["tokenizer"]
    # the printed process rewards of the first tokens are F(child)/F(root): they sum to 1
    values = [float(v) for v in re.findall(r"[0-9]+\.[0-9]+", printed)]
    assert len(values) == len(namespace["first"]) and abs(sum(values) - 1) < 1e-3, printed
    prompt_length = namespace["inputs"]["input_ids"].shape[1]
    sampled = namespace["out"][0, prompt_length:].tolist()
    assert sampled[-1] == tree.terminator_id  # constrained sampling ends with the terminator ...
    assert tokenizer.decode(sampled[:-1]) in namespace["titles"]  # ... after a whole catalogue title

    run(second, namespace, "README.md")
    trainer = namespace["trainer"]
    assert trainer.state.global_step > 0 and trainer.state.log_history[-1]["train_loss"] > 0
    saved = tmp_path / "flower-cds"
    assert (saved / "model.safetensors").is_file() and (saved / "prefix_tree.npz").is_file()


def test_trainer_usage_snippet_runs(tmp_path, monkeypatch):
    """docs/trainer.md's usage block: synthetic catalogue, tiny model built locally, Flower steps (2 of its 10, to
    spare the CPU: the other steps are the same code)."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    code = page_snippets("docs/trainer.md")[0]
    assert "max_steps=10" in code
    run(code.replace("max_steps=10", "max_steps=2"), namespace, "docs/trainer.md")
    assert namespace["trainer"].state.global_step == 2
    assert (tmp_path / "flower-out" / "prefix_tree.npz").is_file()
    assert (tmp_path / "flower-out" / "item_groups.npy").is_file()


def test_tree_and_rewards_doctest_block():
    (code,) = page_snippets("docs/tree_and_rewards.md")
    test = doctest.DocTestParser().get_doctest(code, {}, "tree_and_rewards.md", "docs/tree_and_rewards.md", 0)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.summarize(verbose=False) == doctest.TestResults(failed=0, attempted=11)
