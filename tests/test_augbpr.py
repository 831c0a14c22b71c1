"""AugBPR: judged cold-start pairs as an auxiliary BPR loss around any RecBole model."""
import pickle

import pytest
import torch
import torch.nn.functional as F

from conftest import ML_TINY_YAML, TINY_SASREC, tiny_config
from recbole_llm.config import Config
from recbole_llm.data import scenarios
from recbole_llm.llm import judge as judges
from recbole_llm.llm.scoring import score_continuations
from recbole_llm.quick_start import objective_function
from recbole_llm.utils import create_dataset, data_preparation, get_model

SASREC = TINY_SASREC
SMALL = {"aug_users_per_item": 2, "judge_eval_pairs": 20}


def _augbpr_config(**overrides):
    return tiny_config(model="AugBPR", **SMALL, **overrides)


def _built(**overrides):
    config = Config(config_file_list=[ML_TINY_YAML], config_dict=_augbpr_config(**overrides))
    dataset = create_dataset(config)
    train, valid, test = data_preparation(config, dataset)
    model = get_model("AugBPR")(config, train._dataset).to(config["device"])
    return config, dataset, (train, valid, test), model


def test_zero_aug_weight_is_exactly_the_base_model():
    """The benchmark's `base` rows are AugBPR with aug_weight 0: same data, weights and results as a plain run."""
    settings = {"cold_item_args": {"ratio": 0.2, "by": "time"}, "epochs": 2, "metrics": ["Recall"], "topk": [10],
                "valid_metric": "recall@10", "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO",
                                                             "group_by": "user", "mode": "full"}}
    plain = objective_function(tiny_config(model="BPR", **settings), [ML_TINY_YAML])
    wrapped = objective_function(_augbpr_config(base_model="BPR", aug_weight=0.0, **settings), [ML_TINY_YAML])
    assert wrapped["test_result"] == plain["test_result"]
    assert wrapped["group_results"] == plain["group_results"]
    assert wrapped["extra_results"] == {}, "nothing is judged with aug_weight 0"


def test_model_type_and_defaults_follow_the_base_model():
    config = Config(config_file_list=[ML_TINY_YAML], config_dict=_augbpr_config(base_model="SASRec"))
    assert config["MODEL_TYPE"].name == "SEQUENTIAL" and config["n_layers"] == 2  # SASRec.yaml
    assert config["train_neg_sample_args"]["distribution"] == "none"  # CE loss: no sampled negatives
    config = Config(config_file_list=[ML_TINY_YAML], config_dict=_augbpr_config(base_model="NeuMF"))
    assert config["MODEL_TYPE"].name == "GENERAL" and config["mlp_hidden_size"] == [128, 64]  # NeuMF.yaml
    # checkpoints pickle the config, which refers to the specialised class by name
    assert pickle.loads(pickle.dumps(config.model_class)) is config.model_class


def test_aux_loss_reaches_the_base_models_cold_item_embeddings():
    _, dataset, _, model = _built(base_model="BPR")
    pairs = model.aug_pairs
    cold = dataset.eval_groups["cold_start_items"][1].to(pairs.device)
    assert len(pairs) > 0 and cold[pairs[:, 1:]].all()
    model.aug_loss(pairs).backward()
    grad = model.base.item_embedding.weight.grad
    judged = torch.unique(pairs[:, 1:])
    assert (grad[judged].abs().sum(1) > 0).all(), "every judged cold-start item gets a gradient"
    assert grad[~cold].abs().sum() == 0, "the auxiliary loss touches only the judged items"


def test_pointwise_base_models_are_compared_on_logits_not_probabilities():
    _, _, _, model = _built(base_model="NeuMF")
    model.eval()  # no dropout: the two paths must agree exactly
    assert model.aug_score == "logit"
    users, items = model.aug_pairs[:8, 0], model.aug_pairs[:8, 1]
    logits = model.base.forward(users, items)
    assert torch.allclose(model.pair_scores(users, items), logits, atol=1e-3)
    model.aug_score = "predict"
    assert torch.allclose(model.pair_scores(users, items), torch.sigmoid(logits))
    _, _, _, bpr = _built(base_model="BPR")
    assert bpr.aug_score == "predict"  # BPR's predict is already an unbounded score


def test_aux_loss_is_added_to_the_base_loss_for_a_sequential_model():
    config, _, (train, _, _), model = _built(base_model="SASRec", **SASREC)
    batch = next(iter(train)).to(config["device"])
    losses = model.calculate_loss(batch)
    assert isinstance(losses, tuple) and len(losses) == 2 and all(torch.isfinite(loss) for loss in losses)
    model.aug_weight = 0.0
    assert torch.is_tensor(model.calculate_loss(batch))


class _AlwaysA(judges.LLMJudge):
    """An LLM judge whose model always answers "A" (pure position bias); prompts are recorded."""

    def prompt_parts(self, history_titles):
        return f"history: {', '.join(history_titles)}", ""

    def option_logprobs(self, prompt_groups):
        self.seen = prompt_groups
        return torch.log(torch.tensor([[0.8, 0.2]])).expand(sum(map(len, prompt_groups)), 2)


def test_llm_judge_asks_both_orders_and_cancels_position_bias():
    histories = [[], [1, 2, 3]]
    titles = ["", "one", "two", "three", "four", "five"]
    judge = _AlwaysA("tiny-random-llama", histories, titles, history_len=2)
    probs = judge.score(torch.tensor([[1, 4, 5]]))
    assert judge.seen == [["history: two, three" + judge.options("four", "five"),
                           "history: two, three" + judge.options("five", "four")]]
    assert torch.allclose(probs, torch.tensor([[0.8, 0.2]]))
    keep, _, confidence = judges.decide(probs)
    assert not keep.any() and confidence.item() == pytest.approx(0.0, abs=1e-6)
    assert judges.order_diagnostics(probs) == {"first_shown_wins": 1.0, "orders_agree": 0.0}


def test_llm_judge_shares_each_history_among_its_prompts_without_changing_the_answer():
    judge = judges.LLMJudge("tiny-random-llama", [[], [1, 2]], ["", "a", "b", "c", "d"], dtype="float32",
                            batch_size=2)
    prefix, after = judge.prompt_parts(["a", "b"])
    other, _ = judge.prompt_parts(["c"])
    groups = [[prefix + judge.options("c", "d") + after, prefix + judge.options("a long title", "d") + after,
               prefix + judge.options("d", "c") + after],
              ["B" + after],  # a group of one: nothing to share
              [other + judge.options("a", "b") + after, other + judge.options("b", "a") + after]]
    batched = judge.option_logprobs(groups)
    model, tokenizer, chat, option_ids = judge._load()
    prompts = [prompt for group in groups for prompt in group]
    assert batched.shape == (len(prompts), 2)
    for row, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt, add_special_tokens=not chat)
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([ids])).logits[0, -1].log_softmax(-1)[option_ids]
        assert torch.allclose(batched[row], alone, atol=1e-4), "shared histories and batching change nothing"
    assert (batched < 0).all()


def test_llm_judge_scores_pairs_in_any_order_and_grouping_alike():
    histories = [[], [1, 2], [3, 4, 1], [2]]
    judge = judges.LLMJudge("tiny-random-llama", histories, ["", "a", "b", "c", "d", "e"], dtype="float32")
    pairs = torch.tensor([[1, 3, 4], [2, 5, 2], [1, 4, 5], [3, 1, 5], [2, 3, 1]])
    together = judge.score(pairs)
    one_by_one = torch.cat([judge.score(pair.unsqueeze(0)) for pair in pairs])
    assert torch.allclose(together, one_by_one, atol=1e-5)
    shuffled = torch.tensor([4, 0, 3, 1, 2])
    assert torch.allclose(judge.score(pairs[shuffled]), together[shuffled], atol=1e-5)
    judge.pairs_per_group = 1  # users 1 and 2 have two pairs each: now split over two groups
    assert torch.allclose(judge.score(pairs), together, atol=1e-5)


class _CountingJudge:
    name, identity = "counting", ["counting-v1"]

    def __init__(self, fail_after=None):
        self.scored, self.fail_after = 0, fail_after

    def describe(self, pairs):
        return pairs.tolist()

    def score(self, pairs):
        if self.fail_after is not None and self.scored >= self.fail_after:
            raise KeyboardInterrupt  # killed mid-way
        self.scored += len(pairs)
        return torch.stack([pairs[:, 1] > pairs[:, 2]] * 2, 1).float()


def test_judgements_resume_after_an_interruption_and_are_reused(tmp_path):
    pairs = torch.tensor([[u, u + 1, u + 2] for u in range(10)])
    interrupted = _CountingJudge(fail_after=4)
    with pytest.raises(KeyboardInterrupt):
        judges.judge_pairs(interrupted, pairs, tmp_path, chunk_size=2, show_progress=False)
    resumed = _CountingJudge()
    probs, report = judges.judge_pairs(resumed, pairs, tmp_path, chunk_size=2, show_progress=False)
    assert (report["computed"], report["reused"]) == (6, 4) and resumed.scored == 6
    again = _CountingJudge()
    cached, report = judges.judge_pairs(again, pairs, tmp_path, chunk_size=2, show_progress=False)
    assert (report["computed"], report["reused"], again.scored) == (0, 10, 0)
    assert torch.equal(cached, probs)


def test_judgements_come_back_in_the_order_of_the_pairs_whatever_the_user_order(tmp_path):
    pairs = torch.tensor([[3, 1, 2], [1, 5, 4], [3, 4, 1], [2, 2, 3], [1, 1, 3]])  # users unsorted
    probs, _ = judges.judge_pairs(_CountingJudge(), pairs, tmp_path, chunk_size=2, show_progress=False)
    assert torch.equal(probs, _CountingJudge().score(pairs))
    reused, report = judges.judge_pairs(_CountingJudge(), pairs, tmp_path, chunk_size=2, show_progress=False)
    assert report["reused"] == len(pairs) and torch.equal(reused, probs)


def test_embedding_judge_prefers_the_item_closer_to_the_history():
    vectors = {"x": [1.0, 0.0], "y": [0.0, 1.0], "x y": [1.0, 0.2]}
    judge = judges.EmbeddingJudge(lambda texts: torch.tensor([vectors[t] for t in texts]), ["fake"],
                                  [[], [1]], ["", "x", "y"], history_len=1)
    probs = judge.score(torch.tensor([[1, 1, 2], [1, 2, 1]]))
    assert probs[0, 0] > 0.5 > probs[1, 0] and torch.equal(probs[:, 0], probs[:, 1])
    assert judges.pairwise_accuracy(probs[:1]) == 1.0


def test_embedding_judge_runs_end_to_end():
    result = objective_function(_augbpr_config(base_model="BPR", judge="embedding", aug_weight=0.5), [ML_TINY_YAML])
    assert result["extra_results"]["judging"]["first_shown_wins"] == 0.5  # order-free judge
    assert "judge_accuracy" in result["extra_results"]


def test_cold_items_are_ranked_among_cold_items_only():
    config, dataset, (_, _, test), _ = _built(base_model="BPR")
    _, loaders = scenarios.group_loaders(config, dataset, test)
    cold = dataset.eval_groups["cold_start_items"][1]
    interaction, (rows, items), _, positive_i = next(iter(loaders["cold_start_items@cold"]))
    masked = torch.zeros(len(interaction), dataset.item_num, dtype=torch.bool)
    masked[rows, items] = True
    assert masked[:, ~cold].all(), "every warm item is masked for every user"
    assert cold[positive_i].all()


def test_sampled_pairs_are_distinct_cold_items_of_users_with_enough_history():
    histories = [[], [1, 2], [1, 2, 3, 4, 5]]
    pairs = judges.sample_pairs(histories, [7, 8, 9], users_per_item=2, pairs_per_user=2, min_history=2, seed=0)
    assert len(pairs) == 3 * 2 * 2
    assert (pairs[:, 1] != pairs[:, 2]).all() and set(pairs[:, 0].tolist()) == {1, 2}
    assert set(pairs[:, 1:].flatten().tolist()) <= {7, 8, 9}


def test_keep_fraction_keeps_the_most_confident_share_of_the_decided_pairs():
    probs = torch.tensor([[0.9, 0.9], [0.5, 0.5], [0.3, 0.3], [0.55, 0.55], [0.05, 0.05]])  # |2p-1|: .8 0 .4 .1 .9
    keep, a_wins, _ = judges.decide(probs, keep_fraction=0.5)  # the tie is never kept: half of 4 decided
    assert keep.tolist() == [True, False, False, False, True] and a_wins.tolist() == [True, False, False, True, False]
    keep, _, _ = judges.decide(probs, min_confidence=0.2, keep_fraction=1.0)
    assert keep.tolist() == [True, False, True, False, True]
    with pytest.raises(ValueError, match="aug_keep_fraction"):
        judges.decide(probs, keep_fraction=0)


def test_warm_pairs_are_unseen_warm_items_for_each_judged_user_and_cold_item():
    histories = [[], [1, 2], [1, 2, 3, 4, 5]]
    pairs = torch.tensor([[1, 7, 8], [1, 7, 9], [2, 8, 7]])  # (1, 7) twice: one set of warm items
    warm = judges.warm_pairs(pairs, histories, [1, 2, 3, 4, 5, 6], per_pair=2, seed=0)
    assert warm[:, :2].tolist() == [[1, 7], [1, 7], [2, 8]], "one unseen item only is left for user 2"
    assert warm[2, 2] == 6 and set(warm[:2, 2].tolist()) <= {3, 4, 5, 6} and warm[0, 2] != warm[1, 2]


def test_cold_items_are_also_judged_against_warm_items_when_asked():
    _, dataset, _, model = _built(base_model="BPR", judge="embedding", aug_warm_pairs_per_user=1)
    cold = dataset.eval_groups["cold_start_items"][1].to(model.aug_pairs.device)
    both_cold = cold[model.aug_pairs[:, 1]] & cold[model.aug_pairs[:, 2]]
    one_warm = cold[model.aug_pairs[:, 1]] ^ cold[model.aug_pairs[:, 2]]
    assert both_cold.any() and one_warm.any() and (both_cold | one_warm).all()
    assert model.judge_report["warm_pairs"] == model.judge_report["pairs"] // 2


def test_the_llm_judge_decides_in_fp32_unless_told_otherwise():
    def judge_dtype(**settings):
        config = Config(config_file_list=[ML_TINY_YAML], config_dict=_augbpr_config(base_model="BPR", **settings))
        judge = judges.judge_from_config(config, [[1, 2]] * 3, ["", "a", "b"], ["", "a", "b"])
        return judge.identity[2]

    assert judge_dtype(llm_dtype="bfloat16") == "torch.float32"
    assert judge_dtype(llm_dtype="bfloat16", judge_dtype="auto") == "torch.bfloat16"


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="base_model.*Unknown model 'NoSuchModel'"):
        Config(config_file_list=[ML_TINY_YAML], config_dict=_augbpr_config(base_model="NoSuchModel"))
    with pytest.raises(ValueError, match="aug_min_history=1000"):
        _built(base_model="BPR", aug_min_history=1000)
    with pytest.raises(ValueError, match="cold_item_args"):
        _built(base_model="BPR", cold_item_args=None)
    with pytest.raises(ValueError, match="aug_score must be one of"):
        _built(base_model="BPR", aug_score="rank")
    with pytest.raises(ValueError, match="judge must be one of"):
        _built(base_model="BPR", judge="oracle")


def test_pointwise_judge_scores_pmi_once_per_item_and_has_no_order():
    histories = [[], [1, 2], [3]]
    titles = ["", "Alpha (1990)", "Beta (1991)", "Gamma (1992)", "Delta (1993)", "Epsilon (1994)"]
    judge = judges.PointwiseLLMJudge("tiny-random-llama", histories, titles, history_len=2, dtype="float32")
    probs = judge.score(torch.tensor([[1, 4, 5], [1, 5, 4], [2, 4, 5]]))
    assert torch.equal(probs[:, 0], probs[:, 1])  # one number per pair: no order
    assert probs[0, 0] == pytest.approx(1 - probs[1, 0].item(), abs=1e-6)
    # by hand: the PMI of each text through the KV-cache scorer, one prompt at a time
    model, tokenizer, chat, _ = judge._load()

    def logp(history, item):
        prompt = model.get_input_embeddings()(torch.tensor(tokenizer.encode(judge.ask(history), add_special_tokens=not chat)))
        ids = tokenizer.encode(titles[item] if chat else " " + titles[item], add_special_tokens=False)
        return score_continuations(model, prompt, [ids])[0].item()

    pmi = {i: logp(["Alpha (1990)", "Beta (1991)"], i) - logp([], i) for i in (4, 5)}
    assert probs[0, 0].item() == pytest.approx(torch.sigmoid(torch.tensor(pmi[4] - pmi[5])).item(), abs=1e-4)
    assert probs[2, 0] != probs[0, 0]  # another history, another verdict


def test_pointwise_judge_runs_one_pass_per_distinct_history(monkeypatch):
    histories = [[], [1, 2], [1, 2], [3]]  # users 1 and 2 are shown the same history
    titles = ["", "Alpha (1990)", "Beta (1991)", "Gamma (1992)", "Delta (1993)", "Epsilon (1994)"]
    judge = judges.PointwiseLLMJudge("tiny-random-llama", histories, titles, history_len=2, dtype="float32")
    passes, real = [], judge.log_likelihoods
    monkeypatch.setattr(judge, "log_likelihoods", lambda history, items: passes.append(tuple(history)) or real(history, items))
    probs = judge.score(torch.tensor([[1, 4, 5], [2, 4, 5], [3, 4, 5]]))
    assert passes.count(("Alpha (1990)", "Beta (1991)")) == 1 and passes.count(("Gamma (1992)",)) == 1
    assert torch.equal(probs[0], probs[1]) and not torch.equal(probs[0], probs[2])


def test_popular_history_judge_shows_everyone_the_same_popular_items():
    _, dataset, (train, _, _), model = _built(base_model="BPR", judge="embedding", judge_history="popular",
                                              judge_history_len=3)
    shown = {tuple(h.tolist()) for h in model.judge.histories if len(h)}
    counts = torch.bincount(train._dataset.inter_feat["item_id"], minlength=dataset.item_num)
    assert len(shown) == 1 and sorted(counts[list(shown.pop())].tolist()) == sorted(counts.topk(3).values.tolist())
    with pytest.raises(ValueError, match="judge_history"):
        _built(base_model="BPR", judge="embedding", judge_history="neighbours")


def test_control_judges():
    popularity = judges.PopularityJudge([0, 10, 1, 0], "training")
    probs = popularity.score(torch.tensor([[0, 1, 2], [0, 2, 1], [0, 3, 3]]))
    assert probs[0, 0] > 0.5 > probs[1, 0] and probs[2, 0] == 0.5
    random = judges.RandomJudge(seed=3)
    pairs = torch.tensor([[1, 2, 3], [1, 3, 2], [4, 2, 3]])
    assert torch.equal(random.score(pairs), random.score(pairs))  # seeded by the pair
    assert len(set(random.score(pairs)[:, 0].tolist())) == 3


def test_soft_labels_weight_the_aux_loss_by_the_judges_probability():
    _, _, _, model = _built(base_model="BPR", judge="embedding", aug_weight=0.5, aug_label="soft")
    assert len(model.aug_targets) == len(model.aug_pairs) > 0
    assert ((model.aug_targets > 0.5) & (model.aug_targets <= 1)).all()
    pairs, targets = model.aug_pairs[:4], torch.tensor([1.0, 0.5, 0.75, 0.0], device=model.aug_pairs.device)
    users, pos, neg = pairs.T
    margin = model.pair_scores(users, pos) - model.pair_scores(users, neg)
    by_hand = -(targets * F.logsigmoid(margin) + (1 - targets) * F.logsigmoid(-margin)).mean()
    assert model.aug_loss(pairs, targets).item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert model.aug_loss(pairs, torch.ones(4, device=pairs.device)).item() == pytest.approx(model.aug_loss(pairs).item(), rel=1e-5)


@pytest.mark.parametrize("judge", ["llm_pointwise", "random"])
def test_new_judges_run_end_to_end(judge):
    result = objective_function(_augbpr_config(base_model="BPR", judge=judge, aug_weight=0.5), [ML_TINY_YAML])
    assert result["extra_results"]["judging"]["first_shown_wins"] == 0.5  # order-free judges
    assert 0 <= result["extra_results"]["judge_accuracy"]["accuracy"] <= 1


def test_llm_judges_show_the_item_text_unless_told_titles():
    config = Config(config_file_list=[ML_TINY_YAML], config_dict=_augbpr_config(base_model="BPR"))
    judge = judges.judge_from_config(config, [[1, 2]] * 3, ["", "a", "b"], ["", "a (genres)", "b (genres)"])
    assert judge.titles[1] == "a (genres)"
    config = Config(config_file_list=[ML_TINY_YAML], config_dict=_augbpr_config(base_model="BPR", judge_item_text="title"))
    assert judges.judge_from_config(config, [[1, 2]] * 3, ["", "a", "b"], ["", "a (genres)", "b (genres)"]).titles[1] == "a"


def test_cold_norm_cap_bounds_every_item_table_and_leaves_warm_rows_alone():
    _, _, _, model = _built(base_model="NeuMF", aug_cold_norm_cap=0.5)
    tables = [model.base.item_mf_embedding, model.base.item_mlp_embedding]
    cold, warm = model.cold_items, model.warm_items
    for table in tables:
        raw = table.parametrizations.weight.original
        with torch.no_grad():
            raw[cold[0]] *= 100.0  # far above the cap
            raw[cold[1]] *= 1e-3  # far below it: untouched
        weight = table.weight
        cap = 0.5 * raw[warm].norm(dim=1).mean()
        assert torch.isclose(weight[cold[0]].norm(), cap)
        assert torch.allclose(F.normalize(weight[cold[0]], dim=0), F.normalize(raw[cold[0]], dim=0), atol=1e-6)
        assert torch.equal(weight[cold[1]], raw[cold[1]])
        assert torch.equal(weight[warm], raw[warm])
        assert (weight[cold].norm(dim=1) <= cap * (1 + 1e-5)).all()
    model.aug_loss(model.aug_pairs).backward()
    grad = model.base.item_mf_embedding.parametrizations.weight.original.grad
    assert grad[torch.unique(model.aug_pairs[:, 1:])].abs().sum() > 0, "the judged cold items still learn"
    assert grad[warm].abs().sum() == 0, "the cap's warm-norm reference takes no gradient"


def test_cold_norm_cap_trains_saves_and_reloads_end_to_end():
    result = objective_function(_augbpr_config(base_model="BPR", judge="random", aug_cold_norm_cap=1.0, epochs=1,
                                               cold_item_args={"ratio": 0.2, "by": "time", "negatives": False}),
                                [ML_TINY_YAML])
    assert "cold_start_items" in result["group_results"]


def test_cold_norm_cap_needs_a_positive_ratio_and_an_item_table():
    with pytest.raises(ValueError, match="aug_cold_norm_cap must be a positive ratio"):
        _built(base_model="BPR", aug_cold_norm_cap=0)
    with pytest.raises(ValueError, match="aug_cold_norm_cap: base_model=Pop has no item-embedding table"):
        _built(base_model="Pop", aug_cold_norm_cap=1.0)
    with pytest.raises(ValueError, match="aug_loss_moves: base_model=Pop has no item-embedding table"):
        _built(base_model="Pop", aug_loss_moves="items")
    with pytest.raises(ValueError, match="aug_loss_moves must be 'all' or 'items'"):
        _built(base_model="BPR", aug_loss_moves="users")


def test_aux_loss_can_be_kept_to_the_item_tables():
    for moves, users_learn in (("all", True), ("items", False)):
        _, _, _, model = _built(base_model="NeuMF", aug_loss_moves=moves)
        model.aug_loss(model.aug_pairs).backward()
        grads = {name: p.grad for name, p in model.base.named_parameters()}
        assert grads["item_mf_embedding.weight"].abs().sum() > 0
        assert (grads["user_mf_embedding.weight"] is not None) == users_learn
        assert (grads["mlp_layers.mlp_layers.1.weight"] is not None) == users_learn  # the tower too
        assert all(p.requires_grad for p in model.parameters()), "nothing is left frozen for the base loss"
