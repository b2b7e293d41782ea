"""The RQ2 benchmarks' bookkeeping (bench/rq2_recommend.py and bench/rq2_pu_diagnostic.py, loaded by path): a
finished checkpoint is reused only with the budget and options it was trained with, distilled-reward recipes are
checked, the pre-registered criterion is computed per seed, and the p_u diagnostic reads only lists of its rows."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _bench_script(name: str):
    """Load bench/<name>.py by path, as `python bench/<name>.py` finds its spine and the RQ2 study: beside it."""
    bench = str(ROOT / "bench")
    sys.path.insert(0, bench)
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(bench)


@pytest.fixture(scope="module")
def rq2():
    yield from _bench_script("rq2_recommend")


def _args(rq2, *extra):
    return rq2.make_parser().parse_args(["--sasrec-dir", "unused", *extra])


def _finished(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "prefix_tree.npz").write_text("")
    return path


def test_a_sizing_run_is_not_reused_as_the_full_run(rq2, tmp_path):
    out = _finished(tmp_path / "sft")
    sizing = rq2.training_record(_args(rq2, "--max-steps", "4"), 0, "sft", {})
    (out / rq2.BUDGET_FILE).write_text(json.dumps(sizing, sort_keys=True))
    rq2.check_reuse(out, sizing)  # same budget: reused
    full = rq2.training_record(_args(rq2, "--epochs", "3"), 0, "sft", {})
    with pytest.raises(SystemExit, match=r"max_steps: 4 there, -1 now.*another --runs-dir"):
        rq2.check_reuse(out, full)


def test_a_checkpoint_without_record_is_refused(rq2, tmp_path):
    out = _finished(tmp_path / "flower")
    with pytest.raises(SystemExit, match="without rq2_budget.json"):
        rq2.check_reuse(out, rq2.training_record(_args(rq2), 0, "flower", {}))


def test_distilled_settings_are_part_of_the_record(rq2, tmp_path):
    grid = {"a": {"flow_lambda": 0.1, "logits": "oof", "distill_alpha": 0.5}}
    before = rq2.training_record(_args(rq2), 1, "distill_a", grid)
    out = _finished(tmp_path / "distill_a")
    (out / rq2.BUDGET_FILE).write_text(json.dumps(before, sort_keys=True))
    grid["a"]["distill_alpha"] = 1.0  # the recipe changed under the same name
    with pytest.raises(SystemExit, match="options"):
        rq2.check_reuse(out, rq2.training_record(_args(rq2), 1, "distill_a", grid))


def test_distill_grid_recipe_is_checked(rq2, tmp_path):
    recipe = tmp_path / "grid.json"
    recipe.write_text(json.dumps({"_comment": "ignored", "ok": {"flow_lambda": 0.1, "logits": "train"}}))
    assert list(rq2.load_distill_grid(_args(rq2, "--distill-grid", str(recipe)))) == ["ok"]
    recipe.write_text(json.dumps({"bad": {"flow_lambda": 0.1}}))
    with pytest.raises(SystemExit, match="lacks \\['logits'\\]"):
        rq2.load_distill_grid(_args(rq2, "--distill-grid", str(recipe)))


def test_distilled_criterion_per_seed(rq2):
    def rec(ndcg, dgu):
        return {"metrics": {"NDCG@5": ndcg, "DGU@10": dgu}}

    per_seed = {
        0: {"BIGRec": rec(0.04, 0.5), "D3": rec(0.08, 0.3), rq2.DISTILLED: rec(0.05, 0.3)},  # 1.25x, 0.6x: holds
        1: {"BIGRec": rec(0.05, 0.5), "D3": rec(0.08, 0.3), rq2.DISTILLED: rec(0.05, 0.3)},  # 1.0x: accuracy fails
    }
    crit = rq2.distilled_criterion(per_seed)
    assert crit["per_seed"]["0"]["accuracy holds"] and crit["per_seed"]["0"]["fairness holds"]
    assert crit["per_seed"]["0"]["NDCG@5 / D3"] == pytest.approx(0.625)
    assert not crit["per_seed"]["1"]["accuracy holds"]
    assert crit["holds"] is False
    del per_seed[1]
    assert rq2.distilled_criterion(per_seed)["holds"] is True


def test_choose_distilled_follows_the_preregistered_rule(rq2):
    def rec(ndcg, dgu):
        return {"metrics": {"NDCG@5": ndcg, "DGU@10": dgu}}

    base = rec(0.05, 0.5)
    grid = {"fair_weak": rec(0.04, 0.3), "fair_strong": rec(0.045, 0.34), "accurate": rec(0.08, 0.45)}
    assert rq2.choose_distilled(grid, base) == "fair_strong"  # rule 1: fair ones first, then NDCG@5
    del grid["fair_weak"], grid["fair_strong"]
    grid["accurate_fairer"] = rec(0.056, 0.4)
    assert rq2.choose_distilled(grid, base) == "accurate_fairer"  # rule 2: lowest DGU among the accurate
    assert rq2.choose_distilled({"a": rec(0.03, 0.6), "b": rec(0.04, 0.9)}, base) == "b"  # rule 3: best NDCG@5


@pytest.mark.parametrize("recipe", sorted((ROOT / "bench" / "recipes").glob("*.json")), ids=lambda p: p.name)
def test_shipped_recipes_build_valid_configs(rq2, recipe, tmp_path):
    """Each recipe under bench/recipes loads and every setting is a FlowerConfig the trainer accepts."""
    from trl_flower import FlowerConfig

    grid = rq2.load_distill_grid(_args(rq2, "--distill-grid", str(recipe)))
    assert grid, f"{recipe.name} has no settings"
    for name, options in grid.items():
        options = {k: v for k, v in options.items() if k != "logits"}
        config = FlowerConfig(
            output_dir=str(tmp_path / name),
            reward_variant="distill",
            preference_scores_path=str(tmp_path / "logits.npy"),  # read by the trainer, not the config
            **options,
        )
        assert config.flow_lambda == options["flow_lambda"]


@pytest.fixture(scope="module")
def pu_diagnostic():
    yield from _bench_script("rq2_pu_diagnostic")


def test_pu_diagnostic_refuses_lists_of_other_rows(pu_diagnostic, tmp_path):
    """The beam lists are read from an evaluation's predictions.json: rows out of line with the scored ones are
    refused (by target and by prompt) before any model loads."""
    (tmp_path / "predictions.json").write_text(json.dumps([{"input": "p0", "output": "A", "predict": ["A"]}]))
    args = pu_diagnostic.parse_args(["--sasrec-dir", "unused", "--method", "x", "unused", str(tmp_path)])
    for rows, prompts in (({"item_title": ["B"]}, ["p0"]), ({"item_title": ["A"]}, ["p1"])):
        setup = dict(rows=rows, prompts=prompts, p=None, title_index=None, g1=None)
        with pytest.raises(ValueError, match="does not hold these rows"):
            pu_diagnostic.diagnose("x", "unused", str(tmp_path), args, setup, print)


def test_pu_diagnostic_page_has_a_row_per_run(pu_diagnostic):
    keys = ["kl_p_q", "kl_p_q_median", "catalogue_mass", "top_overlap", "q_top_mass_of_p", "q_g1_mass", "p_g1_mass"]
    keys += ["q_top10_g1_share", "beam_g1_share", "beam_overlap_sasrec", "beam_overlap_q_top10", "q_top10_hit"]
    run = dict.fromkeys(keys + ["beam_hit"], 0.5)
    report = {"dataset": "D", "rows": 2, "titles": 3, "g1_data_share": 0.4, "command": "c", "versions": {}}
    report |= {"wall_s": 1, "sasrec": {"top10_g1_share": 0.1, "p_g1_mass": 0.2, "hit@10": 0.3}}
    page = pu_diagnostic.markdown(report | {"methods": {"BIGRec": run, "distilled": run}})
    assert "| BIGRec | 0.50 / 0.50 |" in page and "| distilled |" in page
