"""Every plugin model through ``objective_function`` on tiny data (RecBole's quick_test pattern):
the five keys RecBole's HyperTuning reads, finite metrics, the model's evaluation groups, and no
checkpoint left behind."""
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import ML_TINY_YAML, TINY_ALLMREC, TINY_META, TINY_SASREC, tiny_config
from recbole_llm.config import Config
from recbole_llm.data.episodes import SCENARIOS
from recbole_llm.quick_start import objective_function
from recbole_llm.utils import create_dataset, plugin_model_names

RESULT_KEYS = {"model", "best_valid_score", "valid_score_bigger", "best_valid_result", "test_result", "group_results"}
AUGBPR = {"model": "AugBPR", "aug_users_per_item": 2, "judge_eval_pairs": 20}
MODELS = {
    "ALLMRec": {"model": "ALLMRec", **TINY_ALLMREC},
    "TALLRec": {"model": "TALLRec", **TINY_ALLMREC, "stage2_max_samples": 2},
    "AugBPR-BPR": {**AUGBPR, "base_model": "BPR"},
    "AugBPR-SASRec": {**AUGBPR, "base_model": "SASRec", **TINY_SASREC},
    "MetaLLMRec": {"model": "MetaLLMRec", **TINY_META, "epochs": 2},
    "MeLU": {"model": "MeLU", **TINY_META, "epochs": 2},
    "SupportMedian": {"model": "SupportMedian", **TINY_META},
    "ItemMean": {"model": "ItemMean", **TINY_META},
    "SupportRidge": {"model": "SupportRidge", **TINY_META},
}


def quick_test(settings):
    result = objective_function(tiny_config(**settings), [ML_TINY_YAML])
    assert RESULT_KEYS <= set(result)
    for values in [result["test_result"], *result["group_results"].values()]:
        assert values and all(math.isfinite(v) for v in values.values())
    assert not list(Path("saved").glob("*.pth")), "a tuning trial must not leave its checkpoint behind"
    return result


def test_every_plugin_model_is_tested_here():
    tested = {settings["model"] for settings in MODELS.values()}
    assert set(plugin_model_names()) == tested


@pytest.mark.parametrize("name", ["ALLMRec", "TALLRec"])
def test_llm_rankers(name):
    result = quick_test(MODELS[name])
    assert set(result["test_result"]) >= {"hit@1", "ndcg@10"}
    assert 0 <= result["test_result"]["hit@1"] <= 1
    # the controls of ALLMRec.yaml, on the same groups, and the chance level of uni19
    controls = result["control_results"]
    assert set(controls) == ({"Pop", "backbone"} if name == "ALLMRec" else {"Pop"})  # TALLRec has no backbone
    for rows in controls.values():
        assert set(rows) == {"test", *result["group_results"]}
        assert all(0 <= values["hit@1"] <= 1 for values in rows.values())
    assert result["chance_result"]["hit@1"] == pytest.approx(1 / 20)


@pytest.mark.parametrize("name", ["AugBPR-BPR", "AugBPR-SASRec"])
def test_augbpr(name):
    result = quick_test(MODELS[name])
    assert {"cold_start_items", "cold_start_items@cold", "warm_start_items"} <= set(result["group_results"])
    assert "recall@50" in result["group_results"]["cold_start_items@cold"]
    assert set(result["valid_group_results"]) == set(result["group_results"])
    chance = result["group_chance"]  # a random ranking's expected metrics, per group
    assert set(chance) == set(result["group_results"]) and "recall@50" in result["chance_result"]
    assert chance["cold_start_items@cold"]["recall@5"] > chance["cold_start_items"]["recall@5"] > 0
    judging = result["extra_results"]["judging"]
    assert judging["pairs"] == judging["kept"] + judging["dropped"] > 0
    accuracy = result["extra_results"]["judge_accuracy"]
    assert 0 <= accuracy["accuracy"] <= 1 and accuracy["chance"] == 0.5 and accuracy["pairs"] > 0


@pytest.mark.parametrize("name", ["MetaLLMRec", "MeLU", "SupportMedian", "ItemMean", "SupportRidge"])
def test_episodic_models(name):
    result = quick_test(MODELS[name])
    assert set(result["group_results"]) == set(SCENARIOS)
    adapts = name in ("MetaLLMRec", "MeLU")
    for values in result["group_results"].values():
        assert set(values) == {"mae", "ndcg@3", "spearman", "spread"} | ({"spearman_before"} if adapts else set())
        if name == "SupportMedian":  # one value per task: no ranking, no spread
            assert values["spearman"] == 0 and values["spread"] == 0
    assert result["group_results"]["warm_user_warm_item"] == result["test_result"]
    assert result["valid_score_bigger"] is False


def test_support_median_predicts_each_users_support_median():
    result = quick_test(MODELS["SupportMedian"])
    episodes = create_dataset(Config(config_file_list=[ML_TINY_YAML], config_dict=tiny_config(**MODELS["SupportMedian"]))).episodes
    for scenario in SCENARIOS:
        errors = np.concatenate([(t.query_ratings - t.support_ratings.median()).abs().numpy() for t in episodes[scenario]])
        assert result["group_results"][scenario]["mae"] == pytest.approx(errors.mean(), abs=1e-4)


@pytest.mark.parametrize("source", ["inductive", "transductive"])
def test_item_mean_predicts_the_known_mean_rating_of_each_query_item(source):
    settings = {**MODELS["ItemMean"], "item_mean_source": source}
    result = quick_test(settings)
    episodes = create_dataset(Config(config_file_list=[ML_TINY_YAML], config_dict=tiny_config(**settings))).episodes
    known = [(t.support_items, t.support_ratings) for t in episodes["train"]]
    known += [(t.query_items, t.query_ratings) for t in episodes["train"]]
    if source == "transductive":
        known += [(t.support_items, t.support_ratings) for name in ("valid", *SCENARIOS) for t in episodes[name]]
    items = np.concatenate([i.numpy() for i, _ in known])
    ratings = np.concatenate([r.numpy() for _, r in known])
    means = {item: ratings[items == item].mean() for item in np.unique(items)}
    for scenario in SCENARIOS:
        errors = [abs(r - means.get(int(i), ratings.mean())) for t in episodes[scenario]
                  for i, r in zip(t.query_items.tolist(), t.query_ratings.tolist())]
        assert result["group_results"][scenario]["mae"] == pytest.approx(np.mean(errors), abs=1e-4)


@pytest.mark.parametrize("name", list(MODELS))
def test_the_same_seed_gives_identical_metrics_twice(name):
    first, second = (objective_function(tiny_config(**MODELS[name]), [ML_TINY_YAML]) for _ in range(2))
    assert first["test_result"] == second["test_result"]
    assert first["group_results"] == second["group_results"]
