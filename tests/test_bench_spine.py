"""bench/ on its spine: the import rule of the benchmark scripts, and the spine itself (bench/spine.py).

The rule (issue 21): a benchmark uses the library's public interface, never `trl_flower.cli` nor an underscore name
(imported, reached as an attribute, or looked up by name), and no benchmark script imports another one; the modules
beside the scripts that are not scripts (the spine, the RQ2 study) are what they share. Only the spine touches
``sys.path`` (to put the checkout's own library first). Checked on the source with `ast`, so it cannot regress
silently.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
SOURCES = {path.stem: path.read_text(encoding="utf-8") for path in sorted(BENCH.glob("*.py"))}
SCRIPTS = {name for name, text in SOURCES.items() if 'if __name__ == "__main__":' in text}
NAME_LOOKUPS = ("getattr", "setattr", "hasattr", "delattr")


def _private(name: str) -> bool:
    """An underscore name that is not a dunder (``_left_pad``, ``_trl_compat``; not ``__version__``)."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def rule_breaks(name: str, source: str) -> list[str]:
    """What `source` (bench/<name>.py) does against the bench import rule, one line per offence."""
    out = []
    for node in ast.walk(ast.parse(source)):
        line = f"{name}.py:{getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            imported = [] if isinstance(node, ast.Import) else [a.name for a in node.names]
            for module in modules:
                parts = module.split(".")
                if parts[0] == "trl_flower" and (parts[1:2] == ["cli"] or any(map(_private, parts))):
                    out.append(f"{line} imports {module}")
                if parts[0] in SCRIPTS and parts[0] != name:
                    out.append(f"{line} imports the script {parts[0]}")
            out += [f"{line} imports the underscore name {n}" for n in imported if _private(n)]
        elif isinstance(node, ast.Attribute):
            receiver = node.value.id if isinstance(node.value, ast.Name) else None
            if _private(node.attr) and receiver not in ("self", "cls"):
                out.append(f"{line} reaches the underscore name .{node.attr}")
            if receiver == "sys" and node.attr == "path" and name != "spine":
                out.append(f"{line} touches sys.path")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in NAME_LOOKUPS:
            key = node.args[1] if len(node.args) > 1 else None
            if isinstance(key, ast.Constant) and isinstance(key.value, str) and _private(key.value):
                out.append(f"{line} looks up the underscore name {key.value!r}")
    return out


def test_the_rule_check_catches_each_kind_of_offence():
    """The checker itself, on a made-up script that breaks every part of the rule once (SCRIPTS holds rq2_recommend)."""
    bad = """
import sys
import trl_flower.cli.train
from trl_flower.evaluation.recommend import _left_pad
from trl_flower._trl_compat import constrained_generate
import rq2_recommend
sys.path.insert(0, "..")
trainer._sample_items
setattr(trainer, "_compute_loss", None)
self._own = 1
"""
    found = rule_breaks("made_up", bad)
    assert sorted(offence.split(" ", 1)[1] for offence in found) == sorted(
        [
            "imports trl_flower.cli.train",
            "imports the underscore name _left_pad",
            "imports trl_flower._trl_compat",
            "imports the script rq2_recommend",
            "touches sys.path",
            "reaches the underscore name ._sample_items",
            "looks up the underscore name '_compute_loss'",
        ]
    )


def test_bench_scripts_keep_to_the_public_interface_and_import_no_other_script():
    assert {"rq2_recommend", "rq1_distribution", "rq3_reference", "flower_step"} <= SCRIPTS
    assert "spine" in SOURCES and "spine" not in SCRIPTS  # shared modules are not scripts
    offences = [offence for name, source in SOURCES.items() for offence in rule_breaks(name, source)]
    assert offences == []


# ------------------------------------------------------------------------------------------------------ the spine


@pytest.fixture(scope="module")
def spine():
    sys.path.insert(0, str(BENCH))  # as `python bench/<script>.py` finds it: the script's own folder
    try:
        import spine

        yield spine
    finally:
        sys.path.remove(str(BENCH))


def test_versions_in_the_order_asked(spine):
    import numpy

    import trl_flower

    found = spine.versions("trl_flower", "git_commit", "numpy", "python", "no-such-package-xyz")
    assert list(found) == ["trl_flower", "git_commit", "numpy", "python", "no-such-package-xyz"]
    assert (found["trl_flower"], found["numpy"]) == (trl_flower.__version__, numpy.__version__)
    assert found["no-such-package-xyz"] is None and found["git_commit"] == spine.git_commit()
    assert spine.machine(torch_threads=1)["torch_threads"] == 1


def _rows(values: dict):
    """The innermost {column: number} rows of a paper file's nested ``values``."""
    for value in values.values():
        if all(isinstance(x, (int, float)) for x in value.values()):
            yield value
        else:
            yield from _rows(value)


def test_paper_numbers_are_data_with_their_source(spine):
    """Every file of bench/paper names where its numbers come from; Table 4 as the reference notes give it."""
    files = sorted((BENCH / "paper").glob("*.json"))
    assert {f.stem for f in files} >= {"flower_table3", "flower_table4"}
    for path in files:
        record = json.loads(path.read_text())
        assert "shared/reference/" in record["source"] and record["values"], path.name
        for row in _rows(record["values"]):
            assert set(row) <= set(record["columns"]) and all(isinstance(x, float) for x in row.values()), path.name
    movies = spine.paper_numbers("flower_table4")["Movies_and_TV"]
    assert movies["Flower"] == {
        "NDCG@5": 0.0959,
        "HR@5": 0.1199,
        "DGU@10": 0.076,
        "MGU@10": 0.026,
        "H": 8.808,
        "TTR": 0.023,
    }
    assert movies["SASRec"] == {"HR@5": 0.1072} and list(movies) == ["SASRec", "BIGRec", "D3", "Flower"]
    assert spine.paper_numbers("flower_table3")["sft"]["title_KL(T||R)"] == 5.114


def test_write_results_appends_the_suffixes(spine, tmp_path):
    import numpy as np

    json_path, md_path = spine.write_results(
        tmp_path / "sub" / "rq3_lam0.001", {"x": np.float32(0.5)}, "# page\n", indent=2, final_newline=True
    )
    assert (json_path.name, md_path.name) == ("rq3_lam0.001.json", "rq3_lam0.001.md")  # the dot survives
    assert json_path.read_text() == '{\n  "x": "0.5"\n}\n' and md_path.read_text() == "# page\n"
    assert spine.with_notes("page", None) == "page"
    notes = tmp_path / "notes.md"
    notes.write_text("analysis")
    assert spine.with_notes("page\n", notes) == "page\n\nanalysis"
