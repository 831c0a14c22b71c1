"""The ALLMRec comparison table follows the evaluation mode its runs were made with."""
import json

import numpy as np
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
    assert "seconds on 1 CPU thread (" in text  # runs without a machine record count as one thread


def test_table_names_the_threads_its_runs_used(tmp_path):
    _run(tmp_path, "Pop", "uni19", 0.25)
    record = json.loads((tmp_path / "Pop.json").read_text())
    (tmp_path / "Pop.json").write_text(json.dumps({**record, "machine": {"torch_threads": 2}}))
    _run(tmp_path, "SASRec", "uni19", 0.5)
    write_table(tmp_path, tmp_path / "table.md", "python -m benchmarks.allmrec_compare", "ml-100k")
    assert "seconds on 1 or 2 CPU threads (each run's JSON: `machine`)" in (tmp_path / "table.md").read_text()


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


def _augbpr_run(method, seed, cold, warm, valid_cold, valid_warm, **config):
    groups = lambda c, w: {"cold_start_items@cold": {"recall@50": c}, "cold_start_items": {"recall@50": 0.0},  # noqa: E731
                           "warm_start_items": {"recall@50": w}}
    return {"base": "BPR", "method": method, "seed": seed, "config": config,
            "groups": groups(cold, warm), "valid_groups": groups(valid_cold, valid_warm)}


def test_augbpr_tables_choose_soft_labels_on_validation_and_check_them_against_their_control():
    from benchmarks.augbpr_benchmark import METHODS, goal_table, valid_choice_table

    assert METHODS["AugBPR-llm-soft"] == {"judge": "llm", "aug_label": "soft"}
    assert METHODS["AugBPR-llm-soft-pop"]["judge_history"] == "popular"
    runs = []
    for seed in (0, 1):
        runs += [_augbpr_run("base", seed, 0.15, 0.40, 0.15, 0.40),
                 _augbpr_run("AugBPR-llm", seed, 0.18, 0.40, 0.17, 0.40, judge="llm"),
                 # the best validation cold score, but validation warm down 5%: not allowed
                 _augbpr_run("AugBPR-llm-w0.3", seed, 0.25, 0.36, 0.30, 0.38, judge="llm", aug_weight=0.3),
                 _augbpr_run("AugBPR-llm-soft", seed, 0.20, 0.40, 0.20, 0.399, judge="llm", aug_label="soft"),
                 _augbpr_run("AugBPR-llm-soft-pop", seed, 0.21 - 0.02 * seed, 0.40, 0.22, 0.40, judge="llm",
                             aug_label="soft", judge_history="popular")]
    chosen = valid_choice_table(runs, ["BPR"]).splitlines()[2]
    # the -pop control is not a setting to choose; three settings tried, soft labels chosen
    assert "| llm | 3 | AugBPR-llm-soft (aug_weight 0.1, keep 1.0, soft labels) | 0.1500 → 0.2000 |" in chosen
    soft = next(line for line in goal_table(runs, ["BPR"], ["AugBPR-llm-soft"]).splitlines() if "AugBPR-llm-soft |" in line)
    assert "| 2/2 | 1/2 | met |" in soft  # above base in both seeds, above its control in seed 1 only


def test_summary_sets_llms_side_by_side_with_each_rows_distance_from_pop(tmp_path):
    from benchmarks.allmrec_summary import section_lines
    for folder, llm, hits in (("small", None, {"Pop": 0.2, "LLM-Only": 0.3}), ("big", "gemma-3-270m", {"Pop": 0.2})):
        (tmp_path / folder).mkdir()
        for variant, hit1 in hits.items():
            record = {"variant": variant, "settings": {"llm": llm} if llm else {},
                      "results": {"test": {"hit@1": hit1}}, "eval_users": {"test": 100}}
            (tmp_path / folder / f"{variant}.json").write_text(json.dumps(record))
    columns = [("small", "test"), ("big", "test")]
    lines = section_lines(tmp_path, "title", ["t.md"], ["Pop", "LLM-Only"], columns, columns, "SmolLM2")
    header = next(line for line in lines if line.startswith("| variant |"))
    assert "| SmolLM2 test (100 users) | gemma-3-270m test (100 users) | SmolLM2 test minus Pop |" in header
    assert next(line for line in lines if line.startswith("| chance |")).startswith("| chance | 0.050 | 0.050 | - | - |")
    row = next(line for line in lines if line.startswith("| LLM-Only |")).split(" | ")
    # 0.3 - 0.2 over sqrt(0.3 * 0.7 / 100 + 0.2 * 0.8 / 100) = 0.0608: +1.6 SE; not run with the other LLM
    assert row[1:5] == ["0.300 ± 0.046", "not run", "+0.100 (+1.6 SE)", "-"]


def test_summary_refuses_a_column_whose_runs_used_different_llms(tmp_path):
    from benchmarks.allmrec_summary import section_lines
    (tmp_path / "mixed").mkdir()
    for variant, llm in (("LLM-Only", "a"), ("TALLRec", "b")):
        record = {"variant": variant, "settings": {"llm": llm}, "results": {"test": {"hit@1": 0.1}},
                  "eval_users": {"test": 50}}
        (tmp_path / "mixed" / f"{variant}.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit, match="mixed: runs differ in LLM"):
        section_lines(tmp_path, "t", [], ["LLM-Only"], [("mixed", "test")], [], "x")


def test_score_sources_take_the_prior_out_and_check_the_llm_prior_against_the_backbone():
    from benchmarks.allmrec_score_sources import analyse
    rng = np.random.default_rng(0)
    users, items = range(200), range(1, 11)
    positives = {u: 1 + u % 10 for u in users}
    sasrec = {(u, i): 0.5 * (i == positives[u]) + rng.random() for u in users for i in items}  # often finds the target
    llm_only = {(u, i): 3 * rng.random() for u in users for i in items}  # a prior that knows nothing
    tables = {"sasrec": sasrec, "llm_only": llm_only, "pop": {k: rng.random() for k in sasrec},
              "trained": {k: sasrec[k] + llm_only[k] for k in sasrec}}  # the backbone's score over the prior
    lines = analyse(tables, positives)
    ranked = lines[lines.index("| ranked by | Hit@1 ± binomial SE |"):]
    hit = lambda name: float(next(line for line in ranked if line.startswith(f"| {name} |")).split(" | ")[1].split()[0])  # noqa: E731
    assert hit("trained minus 1 x llm_only") == hit("sasrec") > 0.3  # taking the whole prior out recovers the score
    assert hit("trained") < hit("trained minus 0.5 x llm_only") < hit("sasrec")  # the prior hides it
    assert hit("sasrec + 1 x llm_only (each standardised within user)") < hit("sasrec")  # a prior that knows nothing
