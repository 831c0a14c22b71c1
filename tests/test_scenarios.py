"""Shared scenario splits: popularity groups, cold users, cold-start items, few-shot users."""
import pytest
import torch

from conftest import ML_TINY_YAML, tiny_config
from recbole_llm.config import Config
from recbole_llm.data import scenarios
from recbole_llm.quick_start import objective_function
from recbole_llm.utils import create_dataset, data_preparation

SASREC = {"hidden_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 1, "train_batch_size": 256}


def _prepared(model="BPR", **overrides):
    config = Config(model=model, config_file_list=[ML_TINY_YAML],
                    config_dict=tiny_config(**(SASREC if model == "SASRec" else {}), **overrides))
    dataset = create_dataset(config)
    return config, dataset, data_preparation(config, dataset)


def test_popularity_groups_split_items_by_training_count():
    config, dataset, (train, _, test) = _prepared(eval_item_groups={"cold": [0.0, 0.35], "warm": [0.65, 1.0]})
    cold, warm = dataset.eval_groups["cold"][1], dataset.eval_groups["warm"][1]
    assert not (cold & warm).any() and not cold[0] and not warm[0]
    counts = torch.bincount(train._dataset.inter_feat["item_id"], minlength=dataset.item_num)
    assert counts[cold].max() <= counts[warm].min()
    assert abs(cold.sum().item() - 0.35 * (dataset.item_num - 1)) <= 2
    overall, groups = scenarios.group_loaders(config, dataset, test)
    assert set(groups) == {"cold", "warm"}
    assert all(cold[groups["cold"]._dataset.inter_feat["item_id"]])


def test_group_results_are_reported_by_the_objective():
    result = objective_function(tiny_config(model="BPR", eval_item_groups={"cold": [0.0, 0.35]}), [ML_TINY_YAML])
    assert set(result["group_results"]) == {"cold"}
    assert "recall@10" in result["group_results"]["cold"]


def test_simulated_cold_users_are_held_out_of_training():
    config, dataset, (train, valid, test) = _prepared(model="SASRec", cold_user_args={"inter_num": 3, "ratio": 0.2})
    cold = dataset.eval_groups["cold_users"][1]
    assert cold.sum() == round(0.2 * (dataset.user_num - 1))
    assert not cold[train._dataset.inter_feat["user_id"]].any()
    assert not cold[valid._dataset.inter_feat["user_id"]].any()
    overall, groups = scenarios.group_loaders(config, dataset, test)
    cold_rows = groups["cold_users"]._dataset.inter_feat
    assert cold[cold_rows["user_id"]].all() and (cold_rows["item_length"] == 2).all()
    assert not cold[overall._dataset.inter_feat["user_id"]].any()


def test_cold_users_need_such_users_or_a_ratio():
    with pytest.raises(ValueError, match="exactly 3 interactions"):
        _prepared(cold_user_args={"inter_num": 3})
    with pytest.raises(ValueError, match="inter_num"):
        _prepared(cold_user_args={"ratio": 0.1})


@pytest.mark.parametrize("model, by", [("BPR", "random"), ("SASRec", "time")])
def test_cold_start_items_have_no_training_interactions(model, by):
    config, dataset, (train, valid, test) = _prepared(model=model, cold_item_args={"ratio": 0.2, "by": by})
    cold = dataset.eval_groups["cold_start_items"][1]
    assert abs(cold.sum().item() - 0.2 * (dataset.item_num - 1)) <= 1
    rows = train._dataset.inter_feat
    assert not cold[rows["item_id"]].any()
    if model == "SASRec":
        assert not cold[rows["item_id_list"]].any(), "cold-start items leaked into training sequences"
    assert cold[test._dataset.inter_feat["item_id"]].any()
    warm = dataset.eval_groups["warm_start_items"][1]
    assert not (warm & cold).any() and (warm | cold)[1:].all()


def test_cold_start_items_can_be_kept_out_of_the_training_negatives():
    args = {"ratio": 0.3, "by": "time"}
    _, dataset, (train, valid, _) = _prepared(cold_item_args={**args, "negatives": False})
    cold = dataset.eval_groups["cold_start_items"][1]
    negatives = torch.cat([batch["neg_item_id"] for batch in train for _ in range(3)])
    assert len(negatives) > 1000 and not cold[negatives].any()
    masked = torch.cat([history_items for _, (_, history_items), _, _ in valid])
    assert len(masked) > 0 and not cold[masked].any(), "evaluation still ranks cold-start items"
    _, _, (default_train, _, _) = _prepared(cold_item_args=args)
    default_negatives = torch.cat([batch["neg_item_id"] for batch in default_train])
    assert cold[default_negatives].any(), "by default cold-start items are sampled as negatives"
    with pytest.raises(ValueError, match="negatives: false needs sampled training negatives.*SASRec"):
        _prepared(model="SASRec", cold_item_args={**args, "negatives": False})


def test_cold_start_items_by_time_are_the_newest():
    config, dataset, _ = _prepared(cold_item_args={"ratio": 0.2, "by": "time"})
    cold = dataset.eval_groups["cold_start_items"][1]
    inter = dataset.inter_feat
    first = torch.full((dataset.item_num,), float("inf")).scatter_reduce(
        0, inter["item_id"], inter["timestamp"], reduce="amin")
    assert first[cold].min() >= first[~cold][1:].max()


def test_few_shot_keeps_k_users_training_rows():
    _, dataset, (train, _, test) = _prepared(few_shot_users=5)
    assert len(train._dataset.inter_feat["user_id"].unique()) == 5
    assert len(test._dataset.inter_feat["user_id"].unique()) > 5


def test_bad_scenario_settings_are_named():
    with pytest.raises(ValueError, match="eval_item_groups"):
        _prepared(eval_item_groups={"cold": [0.5, 0.1]})
    with pytest.raises(ValueError, match="cold_item_args.by"):
        _prepared(cold_item_args={"ratio": 0.2, "by": "alphabet"})


def test_eval_max_users_keeps_a_seeded_subset_per_group():
    config, dataset, (_, _, test) = _prepared(eval_item_groups={"cold": [0.0, 0.35]}, eval_max_users=10)
    overall, groups = scenarios.group_loaders(config, dataset, test)
    users = overall._dataset.inter_feat["user_id"]
    assert len(set(users.tolist())) == 10
    cold_users = set(groups["cold"]._dataset.inter_feat["user_id"].tolist())
    assert len(cold_users) <= 10
    again, _ = scenarios.group_loaders(config, dataset, test)
    assert torch.equal(again._dataset.inter_feat["user_id"], users)
