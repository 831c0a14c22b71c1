"""The ALLMRec comparison table follows the evaluation mode its runs were made with."""
import json

import pytest

from benchmarks.allmrec_compare import write_table


def _run(folder, variant, mode, hit1):
    record = {"variant": variant, "settings": {"eval_args": {"mode": mode}},
              "results": {"test": {"hit@1": hit1, "hit@5": 0.5, "hit@10": 0.8}},
              "eval_users": {"test": 100}, "eval_seconds": {"test": 10.0}}
    (folder / f"{variant}.json").write_text(json.dumps(record))


@pytest.mark.parametrize("mode, title, chance", [
    ({"valid": "uni4", "test": "uni4"}, "uni4 Hit@1 (1 positive + 4 sampled negatives)",
     "| chance | a uniformly random order of the 5 candidates | 0.200"),
    ("uni19", "uni19 Hit@1 (1 positive + 19 sampled negatives)", "| 0.050 | 0.050 |"),
    ("full", "Hit@1 ranked by `eval_args.mode: full`", None),
])
def test_table_title_and_chance_row_follow_the_runs_evaluation_mode(tmp_path, mode, title, chance):
    _run(tmp_path, "Pop", mode, 0.25)
    _run(tmp_path, "SASRec", mode, 0.5)
    out = tmp_path / "table.md"
    write_table(tmp_path, out, "python -m benchmarks.allmrec_compare", "ml-100k")
    text = out.read_text()
    assert text.splitlines()[0] == f"# ALLMRec on ml-100k: {title}"
    assert "| SASRec |" in text and "0.500 ± 0.050" in text  # binomial SE of 0.5 on 100 users
    assert (chance in text) if chance else ("| chance |" not in text)


def test_table_of_groups_without_the_overall_test(tmp_path):
    record = {"variant": "Pop", "settings": {}, "results": {"cold_items": {"hit@1": 0.1, "hit@5": 0.3, "hit@10": 0.6}},
              "eval_users": {"cold_items": 40}, "eval_seconds": {"cold_items": 1.0}}
    (tmp_path / "Pop.json").write_text(json.dumps(record))
    write_table(tmp_path, tmp_path / "table.md", "python -m benchmarks.allmrec_compare", "ml-100k")
    row = next(line for line in (tmp_path / "table.md").read_text().splitlines() if line.startswith("| Pop |"))
    assert row.split(" | ")[2:7] == ["-", "0.100 ± 0.047", "-", "-", "-"]


def test_trained_from_evaluates_stored_weights_without_training(tmp_path, monkeypatch):
    """A trained variant's weights are kept; --trained_from evaluates them again (here on fewer
    users) with the training record copied, and refuses a run trained with other settings."""
    import sys

    import yaml

    from benchmarks import allmrec_compare
    from conftest import ML_TINY_YAML, TINY_ALLMREC, tiny_config
    from recbole_llm.trainer.allmrec import ALLMRecTrainer

    settings = {**yaml.safe_load(open(ML_TINY_YAML)), **tiny_config(**TINY_ALLMREC, cache_dir=str(tmp_path / "cache")),
                "eval_item_groups": {"cold_items": [0.0, 0.35], "warm_items": [0.65, 1.0]}}
    (tmp_path / "settings.yaml").write_text(yaml.safe_dump(settings))
    variant = "LLM-score-token-word"

    def compare(runs, *extra, variant=variant, groups=("test",)):
        monkeypatch.setattr(sys, "argv", ["allmrec_compare", "--dataset=ml-tiny", "--variants", variant,
                                          "--config", str(tmp_path / "settings.yaml"), "--runs", str(tmp_path / runs),
                                          "--groups", *groups, *extra])
        allmrec_compare.main()
        return json.loads((tmp_path / runs / f"{variant}.json").read_text())

    trained = compare("first")
    assert (tmp_path / "saved" / "allmrec_compare" / "first" / f"{variant}.pth").exists()
    def no_training(*args, **kwargs):
        raise AssertionError("--trained_from trained again")

    monkeypatch.setattr(ALLMRecTrainer, "fit", no_training)
    again = compare("again", "--trained_from", str(tmp_path / "first"))
    assert again["trained_from"].endswith(f"{variant}.pth") and "trained_from" not in trained
    assert again["epoch_losses"] == trained["epoch_losses"]
    assert again["results"] == trained["results"]  # the same weights, users and negatives
    # a stored run asked for a group it lacks ranks its kept weights on that group only
    grown = compare("again", "--trained_from", str(tmp_path / "first"), groups=("test", "warm_items"))
    assert set(grown["results"]) == {"test", "warm_items"} and grown["results"]["test"] == again["results"]["test"]
    assert grown["eval_users"]["warm_items"] > 0 and grown["epoch_losses"] == trained["epoch_losses"]
    assert compare("again", "--trained_from", str(tmp_path / "first"), groups=("warm_items",)) == grown  # nothing left to add
    fewer = compare("fewer", "--trained_from", str(tmp_path / "first"), "--set", "eval_max_users=2")
    assert fewer["eval_users"]["test"] == 2 < trained["eval_users"]["test"]
    with pytest.raises(SystemExit, match="stage2_lr"):
        compare("other", "--trained_from", str(tmp_path / "first"), "--set", "stage2_lr=0.5")
    # a variant of EVALUATED_FROM ranks the kept weights of another variant its own way
    name, overrides, what = "ranked-otherwise", {**allmrec_compare.VARIANTS[variant][1], "score_calibration": "prompt_prior"}, ""
    monkeypatch.setitem(allmrec_compare.VARIANTS, name, ("ALLMRec", overrides, what))
    monkeypatch.setitem(allmrec_compare.EVALUATED_FROM, name, variant)
    otherwise = compare("first", variant=name)  # the kept weights of the same runs folder
    assert otherwise["trained_from"].endswith(f"{variant}.pth")
    assert otherwise["epoch_losses"] == trained["epoch_losses"] and otherwise["overrides"] == overrides
    assert "learning_curve" not in otherwise, "the source variant's curve ranks its own way"
    assert otherwise["results"] != trained["results"]
