"""MetaLLMRec / MeLU: episodes, MAML gradients, backends, evaluation, nDCG@3, CLI path (tiny data)."""
import math

import numpy as np
import pytest
import torch

from recbole_llm.config import Config
from recbole_llm.data.episodes import SCENARIOS, TEST, TRAIN, VALID
from recbole_llm.trainer.episodic import graded_ndcg, rank_correlation
from recbole_llm.utils import create_dataset, data_preparation, get_model, get_trainer
from tests.conftest import ML_TINY_YAML, TINY_META, tiny_config

META_KEYS = TINY_META


def build(model="MetaLLMRec", **overrides):
    config = Config(model=model, dataset="ml-tiny", config_file_list=[ML_TINY_YAML],
                    config_dict=tiny_config(**{**META_KEYS, **overrides}))
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    torch.manual_seed(0)
    model_obj = get_model(model)(config, dataset).to(config["device"])
    return config, dataset, model_obj, (train, valid, test)


def test_graded_ndcg_matches_hand_computed_example():
    # predicted 4.5 for items with r=3 and r=4 (a tie), 3.0 for r=5, 2.0 for r=1
    predicted, true = [4.5, 3.0, 4.5, 2.0], [3, 5, 4, 1]
    # ranks 1-2 hold the tie: each the mean gain of r=3 and r=4; rank 3 holds r=5; ideal: 5, 4, 3
    tie = ((2 ** 3 - 1) + (2 ** 4 - 1)) / 2
    dcg = tie / 1 + tie / math.log2(3) + (2 ** 5 - 1) / 2
    idcg = (2 ** 5 - 1) / 1 + (2 ** 4 - 1) / math.log2(3) + (2 ** 3 - 1) / 2
    assert graded_ndcg(predicted, true, k=3) == pytest.approx(dcg / idcg)
    assert graded_ndcg(true, true, k=3) == pytest.approx(1.0)
    assert graded_ndcg([3, 2, 1], [1, 2, 3], k=3) < graded_ndcg([1, 1, 1], [1, 2, 3], k=3) < 1.0


def test_tied_ndcg_is_the_mean_over_random_orders():
    rng = np.random.default_rng(0)
    predicted, true = [2.0, 2.0, 2.0, 1.0, 2.0], [5, 1, 3, 4, 2]
    orders = []
    for _ in range(4000):  # break the ties at random by a tiny jitter
        jitter = np.asarray(predicted) + 1e-6 * rng.random(5)
        orders.append(graded_ndcg(jitter, true, k=3))
    assert graded_ndcg(predicted, true, k=3) == pytest.approx(np.mean(orders), abs=0.01)


def test_episodes_follow_the_protocol():
    config, dataset, _, loaders = build("MeLU")
    episodes = dataset.episodes
    assert {TRAIN, VALID, TEST, *SCENARIOS} <= set(episodes)
    users = {name: {t.user for t in tasks} for name, tasks in episodes.items()}
    assert not users[TRAIN] & users[VALID] and not users[TRAIN] & users[TEST] and not users[VALID] & users[TEST]
    assert all(episodes[name] for name in SCENARIOS), {name: len(episodes[name]) for name in SCENARIOS}

    years = dataset.field2id_token["release_year"][dataset.item_feat["release_year"].numpy()]
    cold_item = {i for i, y in enumerate(years) if i > 0 and y.isdigit() and int(y) >= 1996}
    cold_user_tasks = users["cold_user_warm_item"] | users["cold_user_cold_item"]
    assert not cold_user_tasks & (users[TRAIN] | users[VALID] | users[TEST] | users["warm_user_cold_item"])
    for name, tasks in episodes.items():
        for task in tasks:
            assert len(task.query_items) == 10 and 13 <= len(task.query_items) + len(task.support_items) <= 100
            assert not set(task.query_items.tolist()) & set(task.support_items.tolist())
            items = set(task.query_items.tolist()) | set(task.support_items.tolist())
            assert items <= cold_item if name.endswith("cold_item") else not items & cold_item
            rows = torch.cat([task.support_rows, task.query_rows])
            assert (dataset.inter_feat[dataset.uid_field][rows] == task.user).all()
    assert len(loaders[0]) == math.ceil(len(episodes[TRAIN]) / 4)  # meta-batches of train_batch_size tasks

    same = build("MeLU")[1].episodes
    other = build("MeLU", meta_split_seed=7)[1].episodes
    first = lambda eps: [t.query_items.tolist() for t in eps[TRAIN]]  # noqa: E731
    assert first(same) == first(episodes) and first(other) != first(episodes)


def test_k_fold_cold_users_partition_users():
    folds = [build("MeLU", meta_scenario_args={**META_KEYS["meta_scenario_args"], "user_cold_folds": 3,
                                              "user_cold_fold": k})[1] for k in range(3)]
    from recbole_llm.data.episodes import cold_users

    all_users = np.unique(folds[0].inter_feat["user_id"].numpy())
    cold = [set(cold_users(ds.config, all_users, {**ds.config["meta_scenario_args"], "user_cold_ratio": 0}).tolist())
            for ds in folds]
    assert set().union(*cold) == set(all_users.tolist()) and sum(map(len, cold)) == len(all_users)


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradients_reach_every_meta_parameter(first_order):
    _, dataset, model, _ = build(first_order=first_order)
    model.calculate_loss(dataset.episodes[TRAIN][0]).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert "user_text" not in model.state_dict() and "item_text" not in model.state_dict()


def _meta_grads(model, task):
    model.zero_grad()
    model.calculate_loss(task).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("model_name", ["MetaLLMRec", "MeLU"])
def test_higher_and_func_backends_agree(model_name):
    _, dataset, model, _ = build(model_name, local_update=3)
    task = dataset.episodes[TRAIN][0]
    grads = {}
    for first_order in (False, True):
        model.first_order = first_order
        for backend in ("higher", "func"):
            model.meta_backend = backend
            grads[first_order, backend] = _meta_grads(model, task)
            if backend == "higher":
                adapted = model.adapt_and_predict(task)
            else:
                assert torch.allclose(adapted, model.adapt_and_predict(task), atol=1e-5)
        for g_higher, g_func in zip(grads[first_order, "higher"], grads[first_order, "func"]):
            assert torch.allclose(g_higher, g_func, atol=1e-5)
    # the second-order terms are real: first- and second-order meta-gradients differ
    assert any(not torch.allclose(a, b) for a, b in zip(grads[False, "higher"], grads[True, "higher"]))


def test_evaluation_adapts_but_keeps_meta_weights():
    config, dataset, model, (_, valid, _) = build()
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = trainer.evaluate(valid, load_best_model=False)
    assert set(result) == {"mae", "ndcg@3", "spearman", "spearman_before", "spread"}
    assert 0 < result["mae"] < 4 and 0 < result["ndcg@3"] <= 1 and -1 <= result["spearman"] <= 1
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    task = dataset.episodes[VALID][0]
    interaction = {model.USER_ID: torch.full_like(task.query_items, task.user), model.ITEM_ID: task.query_items}
    unadapted = model.predict(interaction).detach()
    assert not torch.allclose(model.adapt_and_predict(task), unadapted)


def test_output_bias_starts_at_mean_training_rating():
    _, dataset, model, _ = build("MeLU")
    assert model.estimator[-1].bias.item() == pytest.approx(dataset.train_rating_mean())
    assert 3.0 < dataset.train_rating_mean() < 4.5


def test_bad_scenario_key_is_named():
    with pytest.raises(ValueError, match="item_cold_year"):
        build("MeLU", meta_scenario_args={"item_cold_year": 1997})


def test_widedeep_baseline_trains_on_known_ratings_only_and_runs_all_scenarios():
    from recbole_llm.quick_start import run_rating_baseline

    _, dataset, _, _ = build("MeLU")
    train = dataset.rating_baseline_data(include_support=True)
    queries = {r for name, tasks in dataset.episodes.items() if name != TRAIN for t in tasks for r in t.query_rows.tolist()}
    supports = {r for name, tasks in dataset.episodes.items() for t in tasks for r in t.support_rows.tolist()}
    key = lambda inter: set(zip(inter["user_id"].tolist(), inter["item_id"].tolist()))  # noqa: E731
    trained = key(train.inter_feat)
    assert not trained & key(dataset.inter_feat[torch.tensor(sorted(queries))])
    assert key(dataset.inter_feat[torch.tensor(sorted(supports))]) <= trained
    assert 0 <= train.inter_feat["label"].min() and train.inter_feat["label"].max() <= 1

    result = run_rating_baseline("WideDeep", "ml-tiny", config_dict=tiny_config(**META_KEYS),
                                 config_file_list=[ML_TINY_YAML])
    assert set(result["group_results"]) == set(SCENARIOS)
    assert all(0 < v["mae"] < 4 and 0 < v["ndcg@3"] <= 1 for v in result["group_results"].values())


def test_cold_item_rules_of_ml1m_and_book_crossing():
    from recbole_llm.data.episodes import cold_items, item_year_values

    _, dataset, _, _ = build("MeLU")
    years = item_year_values(dataset, "release_year")
    args = {"item_cold_by": "year", "item_year_field": "release_year", "item_cold_from_year": None,
            "item_cold_ratio": 0.2, "item_warm_min_ratings": 5}
    cold = cold_items(dataset, args, None)
    known = ~np.isnan(years)
    assert cold.sum() == round(0.2 * known.sum()) and not cold[~known].any()
    assert years[cold].min() >= years[known & ~cold].max()  # the newest items are the cold ones

    counts = np.bincount(dataset.inter_feat["item_id"].numpy(), minlength=dataset.item_num)
    cold = cold_items(dataset, {**args, "item_cold_by": "popularity", "item_warm_min_ratings": 20}, counts)
    assert not cold[0] and (cold[1:] == (counts[1:] < 20)).all() and 0 < cold.sum() < dataset.item_num - 1


def test_causal_llm_text_source_and_text_fallback():
    # ml-tiny has no MetaLLMRec-specific templates: the generic ones are used
    _, dataset, model, _ = build(text_source="llm", text_standardize=True)
    assert model.item_text.shape == (dataset.item_num, 32)  # hidden size of tiny-random-llama
    assert not model.item_text[0].any()
    assert model.item_text[1:].std(0).mean().item() == pytest.approx(1.0, abs=0.05)  # standardised
    model.calculate_loss(dataset.episodes[TRAIN][0]).backward()
    assert model.item_proj.weight.grad.abs().sum() > 0


def test_rank_correlation_by_hand():
    assert rank_correlation([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert rank_correlation([3, 2, 1], [10, 20, 30]) == pytest.approx(-1.0)
    assert rank_correlation([4.0, 4.0, 4.0], [1, 2, 5]) == 0.0  # a constant prediction ranks nothing
    # ties take their average rank: ranks (1.5, 1.5, 3) against (1, 2, 3) -> rho = 0.866
    assert rank_correlation([1, 1, 2], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)


def test_constant_predictor_ndcg_equals_its_expectation_over_orders():
    true = [5, 1, 3]
    orders = [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]
    by_order = [graded_ndcg([3 - order.index(i) for i in range(3)], true, k=3) for order in orders]
    assert graded_ndcg([4.0, 4.0, 4.0], true, k=3) == pytest.approx(np.mean(by_order))


def test_bias_only_adaptation_changes_the_output_bias_and_nothing_else():
    _, dataset, model, _ = build(meta_backend="func", local_params="output_bias", local_update=3)
    task = dataset.episodes[TRAIN][0]
    weights = dict(model.estimator.named_parameters())
    output_bias = model.adapted_names[0]
    x_s = model.features(*model.task_tensors(task)[:2]).detach()
    y_s = task.support_ratings.to(model.device)
    params = {k: p.detach().requires_grad_(k == output_bias) for k, p in weights.items()}
    loss = model.local_loss_fn(torch.func.functional_call(model.estimator, params, (x_s,)).squeeze(-1), y_s)
    (grad,) = torch.autograd.grad(loss, [params[output_bias]])
    # one local step moves the output bias only: predictions shift by one constant
    unadapted = model.adapt_and_predict(task, steps=0)
    one_step = model.adapted_predict(x_s, y_s, model.features(*model.task_tensors(task)[3:]).detach(), 1, False)
    shift = one_step - unadapted
    assert torch.allclose(shift, torch.full_like(shift, -model.local_lr * grad.item()), atol=1e-5)
    # meta-gradients still reach every weight (through the query loss), and the meta weights are unchanged
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.adapt_and_predict(task)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.adapted_names == [f"{len(model.estimator) - 1}.bias"]


@pytest.mark.parametrize("options", [
    {"local_loss_type": "MSE"},
    {"local_params": "all_but_output_bias"},
    {"local_params": "output_bias"},
    {"meta_sgd": True},
    {"local_lr": 0.05, "local_update": 8},
    {"local_head": "ridge"},
    {"local_head": "ridge", "ridge_intercept": "median"},
])
def test_each_inner_loop_option_trains_and_evaluates(options):
    config, dataset, model, (train, valid, _) = build(meta_backend="func", **options)
    task = dataset.episodes[TRAIN][0]
    model.calculate_loss(task).backward()
    trained = [name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert any(name.startswith("estimator.") for name in trained)
    if options.get("meta_sgd"):
        assert any(name.startswith("local_lrs.") for name in trained)  # the step sizes are meta-learned
    if options.get("local_head"):
        assert "log_ridge_lambda" in trained  # the penalty is meta-learned through the solve
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    result = trainer.evaluate(valid, load_best_model=False)
    assert 0 < result["mae"] < 4


def test_ridge_head_adds_the_ridge_fit_of_the_support_residuals():
    from recbole_llm.model.ridge import ridge_predict

    _, dataset, model, _ = build(local_head="ridge", ridge_lambda=0.5, local_update_eval=0)
    task = dataset.episodes[TRAIN][0]
    users_s, items_s, y_s, users_q, items_q = model.task_tensors(task)
    with torch.no_grad():
        x_s, x_q = model.features(users_s, items_s), model.features(users_q, items_q)
        base_s, base_q = model.estimator(x_s).squeeze(-1), model.estimator(x_q).squeeze(-1)
        by_hand = base_q + ridge_predict(x_s, y_s - base_s, x_q, 0.5)
    assert torch.allclose(model.adapt_and_predict(task), by_hand, atol=1e-5)
    assert torch.allclose(model.adapt_and_predict(task, steps=0), base_q, atol=1e-6)  # "before": no head
    assert not torch.allclose(by_hand, base_q)
    with pytest.raises(ValueError, match="local_head must be one of"):
        build(local_head="lasso")


def test_inner_loop_options_need_the_func_backend():
    with pytest.raises(ValueError, match="meta_backend: func"):
        build(meta_backend="higher", meta_sgd=True)
    with pytest.raises(ValueError, match="local_params must be one of"):
        build(meta_backend="func", local_params="bias")


def test_text_shuffle_permutes_the_texts_of_one_side_only():
    _, _, plain, _ = build()
    _, _, shuffled, _ = build(text_shuffle=["user"])
    assert torch.equal(plain.item_text, shuffled.item_text)
    assert not torch.equal(plain.user_text, shuffled.user_text)
    assert torch.equal(plain.user_text[1:].sort(0).values, shuffled.user_text[1:].sort(0).values)


def test_melu_can_leave_a_field_out():
    config, _, full, _ = build("MeLU")
    _, _, fair, _ = build("MeLU", meta_exclude_fields=["release_year"])
    assert "item_release_year" in full.embeddings and "item_release_year" not in fair.embeddings
    assert fair.estimator[0].in_features == full.estimator[0].in_features - int(config["embedding_size"])


def test_support_ridge_leave_one_out_residuals_equal_refitting_without_each_rating():
    from recbole_llm.model.ridge import choose_lambda, ridge_predict

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(30, 50, generator=generator, dtype=torch.float64)  # fewer ratings than dimensions
    taste = torch.randn(50, generator=generator, dtype=torch.float64) / 7
    r = 3 + x @ taste + 0.1 * torch.randn(30, generator=generator, dtype=torch.float64)
    lam, residuals = choose_lambda(x, r, [0.3])
    for i in range(30):  # refit from scratch without row i (its centring and intercept too)
        keep = [j for j in range(30) if j != i]
        predicted = ridge_predict(x[keep], r[keep], x[i:i + 1], lam)
        assert float(r[i] - predicted) == pytest.approx(float(residuals[i]), abs=1e-8)
    # noise only: the largest lambda wins (no fit)
    lam, _ = choose_lambda(x, 3 + torch.randn(30, generator=generator, dtype=torch.float64), [0.01, 1e4])
    assert lam == 1e4
    x, taste = x[:, :5], taste[:5]  # a linear taste in 5 dimensions: a small lambda, the order recovered
    r = 3 + x @ taste + 0.01 * torch.randn(30, generator=generator, dtype=torch.float64)
    lam, _ = choose_lambda(x, r, [0.01, 1e4])
    assert lam == 0.01
    query = torch.randn(20, 5, generator=generator, dtype=torch.float64)
    assert rank_correlation(ridge_predict(x, r, query, lam).float(), (query @ taste).float()) > 0.9


def test_ridge_intercept_is_the_mean_or_the_median_of_the_residuals():
    from recbole_llm.model.ridge import ridge_predict

    x = torch.randn(9, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    r = torch.tensor([3.0, 3, 3, 4, 4, 4, 5, 5, 40], dtype=torch.float64)  # one outlier
    query = torch.zeros(1, 4, dtype=torch.float64) + x.mean(0)  # at the centre: the intercept alone
    assert float(ridge_predict(x, r, query, 1e9)) == pytest.approx(float(r.mean()))
    assert float(ridge_predict(x, r, query, 1e9, intercept="median")) == pytest.approx(4.0, abs=1e-6)
