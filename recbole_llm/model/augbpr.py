"""AugBPR (Wang et al., WWW 2024, "LLMs as data augmenters for cold-start item recommendation").

Any RecBole model, named by ``base_model`` (general: BPR, NeuMF, LightGCN, ...; sequential:
SASRec, GRU4Rec, ...), is trained with its own loss plus an auxiliary pairwise loss over
synthetic preferences between cold-start items::

    loss = base loss + aug_weight * mean over judged pairs of -log sigmoid(s(u, pos) - s(u, neg))

The pairs come from a judge (``recbole_llm/llm/judge.py``): for every cold-start item
(``cold_item_args``), ``aug_users_per_item`` users with at least ``aug_min_history`` training items
are paired with ``aug_pairs_per_user`` other cold-start items, and the judge (an LLM asked "A or
B?" in both orders, or a sentence-embedding similarity) says which one the user prefers. With
``aug_warm_pairs_per_user`` > 0 (not in the paper) each judged (user, cold item) is also judged
against that many random warm items the user has not trained on: cold-only pairs order cold items
among themselves, so they never reach the warm items' score range and rank last among all items. With
``judge_history: popular`` (a control) every user is shown one history of the most popular
training items: the judge can then only express an item prior, not a personal preference. Scores
``s`` come from the base model's own ``predict``, so the loss reaches any model's item
representations; cold-start items otherwise receive no positive training signal. General and
context-aware models trained pointwise (NeuMF, DMF, FM, ...) predict a probability sigmoid(x);
``aug_score: auto`` then uses its logit x, since a BPR loss on probabilities saturates exactly
for the items it must move (cold-start items predicted near 0). ``predict`` and
``full_sort_predict`` are the base model's: no LLM at serving time.

With ``aug_cold_norm_cap: r`` (not in the paper) every item-embedding table of the base model (its
``nn.Embedding`` modules with one row per item) is reparametrised so that a cold-start item's row
never has a norm above r times the mean norm of the warm items' rows. Why: when cold items are kept
out of the negatives (``cold_item_args.negatives: false``), the aux loss is their only gradient, and
Adam's per-parameter step ignores its size (``aug_weight`` 0.01 moves them as far as 0.1), so
their norms keep growing until they crowd the warm items out of every user's top list
(``benchmarks/augbpr_cold_items``). The cap bounds how far they can rise while the judge still sets
their direction.

With ``aug_loss_moves: items`` (not in the paper) the aux loss moves only the base model's
item-embedding tables: users, towers and encoders learn from the base loss alone. Why: on BPR the
aux pairs also pull every judged user towards the cold items, which costs warm-item recall even when
cold items take almost none of the top slots. (A sequential model's history items are rows of the
same table, so there the aux loss still reaches warm items through the user's sequence.)

The model type, input type and dataset class follow the base model (``for_config``), and the base
model's yaml defaults are loaded under ``properties/model/AugBPR.yaml``. Judged pairs are sampled
with ``aug_seed`` (not the training seed), so runs with several seeds and base models share one
set of cached judgements.
"""
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.nn.utils import parametrize
from recbole.data.interaction import Interaction
from recbole.model.abstract_recommender import AbstractRecommender
from recbole.utils import InputType, ModelType

from recbole_llm import PROPERTIES_DIR
from recbole_llm.data.history import popular_history, user_histories
from recbole_llm.llm import judge as judges
from recbole_llm.utils import get_model

AUG_SCORES = ("auto", "predict", "logit")


def base_model_class(name):
    """The RecBole or plugin model class named ``name``, refusing names that are not models."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"AugBPR needs base_model, the name of a RecBole model (e.g. SASRec), got {name!r}")
    try:
        base = get_model(name)
    except ValueError as error:
        raise ValueError(f"base_model: {error}") from None
    if hasattr(base, "for_config"):
        raise ValueError(f"base_model={name} wraps another model itself; name a RecBole model such as BPR or SASRec")
    return base


_SPECIALISED = "AugBPR__"


@lru_cache(maxsize=None)
def _specialised(base_name):
    base = base_model_class(base_name)
    name = f"{_SPECIALISED}{base_name}"
    attributes = {"type": base.type, "base_model_name": base_name, "__module__": __name__, "__qualname__": name,
                  "__doc__": AugBPR.__doc__}
    if hasattr(base, "input_type"):  # sequential models leave it to their loss_type (RecBole's Config)
        attributes["input_type"] = base.input_type
    return type(name, (AugBPR,), attributes)


def __getattr__(name):
    # Configs pickled in checkpoints refer to the specialised class by name (AugBPR__SASRec).
    if name.startswith(_SPECIALISED):
        return _specialised(name[len(_SPECIALISED):])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class AugBPR(AbstractRecommender):
    type = ModelType.GENERAL  # replaced by the base model's, as is input_type (see for_config)
    base_model_name = None

    @classmethod
    def for_config(cls, external_config):
        """This class with the type and input type of the configured ``base_model`` (read by Config
        before any yaml default is known, hence the fallback to AugBPR.yaml)."""
        name = external_config.get("base_model")
        if name is None:
            with open(PROPERTIES_DIR / "model" / "AugBPR.yaml") as f:
                name = yaml.safe_load(f)["base_model"]
        return _specialised(name)

    def __init__(self, config, dataset):
        super().__init__()
        base = base_model_class(config["base_model"])
        self.type = base.type
        # The base model is built first, so its initial weights are those of a plain run with the
        # same seed (judging may draw random numbers when it loads a model).
        self.base = base(config, dataset)
        self.device = config["device"]
        self.aug_weight = float(config["aug_weight"])
        self.aug_batch_size = int(config["aug_batch_size"])
        self.aug_score = self._score_kind(config["aug_score"] or "auto", config["MODEL_INPUT_TYPE"])
        self.uid_field, self.iid_field = dataset.uid_field, dataset.iid_field
        self.config = config

        cold = getattr(dataset, "cold_start_item_ids", None)
        if not cold:
            raise ValueError("AugBPR judges pairs of cold-start items: set cold_item_args, e.g. {ratio: 0.2, by: time}")
        self.cold_items = sorted(cold)
        self.warm_items = sorted(set(range(1, dataset.item_num)) - set(self.cold_items))  # 0 is padding
        self.histories = user_histories(dataset)
        self.min_history = int(config["aug_min_history"])
        if self.min_history < 1:
            raise ValueError(f"aug_min_history must be at least 1 (a judge needs a history), got {self.min_history}")
        title_key = "item_title_template" if config["item_title_template"] else "item_text_template"
        self.judge = judges.judge_from_config(config, self._judge_histories(config), dataset.texts("item", title_key),
                                              dataset.texts("item", "item_text_template"))

        self.aug_label = config["aug_label"] or "hard"
        if self.aug_label not in ("hard", "soft"):
            raise ValueError(f"aug_label must be 'hard' or 'soft', got {self.aug_label!r}")
        self.judge_report = None
        if self.aug_weight == 0:  # the base model alone: nothing to judge
            judged, winner_prob = torch.zeros(0, 3, dtype=torch.long), torch.zeros(0)
            self.logger.info("AugBPR with aug_weight 0: the base model alone, no pairs judged")
        else:
            judged, winner_prob = self._judged_pairs(config)
        self.register_buffer("aug_pairs", judged.to(self.device), persistent=False)
        self.register_buffer("aug_targets", winner_prob.to(self.device), persistent=False)

        if self.type == ModelType.SEQUENTIAL:
            self._register_sequences(config)
        cap = config["aug_cold_norm_cap"]
        if cap is not None:
            self._cap_cold_item_norms(float(cap), dataset.item_num)
        self.aug_loss_moves = config["aug_loss_moves"] or "all"
        if self.aug_loss_moves not in ("all", "items"):
            raise ValueError(f"aug_loss_moves must be 'all' or 'items', got {self.aug_loss_moves!r}")
        if self.aug_loss_moves == "items":
            item_parameters = {id(p) for table in self._item_tables("aug_loss_moves", dataset.item_num)
                               for p in table.parameters()}
            self._held_by_aug = [p for p in self.base.parameters() if id(p) not in item_parameters]

    def _cap_cold_item_norms(self, ratio, item_num):
        """Reparametrise every item-embedding table of the base model with ``ColdRowNormCap``."""
        if ratio <= 0:
            raise ValueError(f"aug_cold_norm_cap must be a positive ratio of the mean warm-item norm (or null = "
                             f"off), got {ratio}")
        for table in self._item_tables("aug_cold_norm_cap", item_num):
            parametrize.register_parametrization(table, "weight", ColdRowNormCap(self.cold_items, self.warm_items, ratio))

    def _item_tables(self, key, item_num):
        """The base model's item-embedding tables: its ``nn.Embedding`` modules with one row per item."""
        tables = [m for m in self.base.modules() if isinstance(m, nn.Embedding) and m.num_embeddings == item_num]
        if not tables:
            raise ValueError(f"{key}: base_model={type(self.base).__name__} has no item-embedding table "
                             f"(an nn.Embedding with {item_num} rows)")
        return tables

    def _judge_histories(self, config):
        """What the judge is shown: each user's own history (the paper) or, as a control, one
        history of the most popular training items for everyone (a user-independent judge)."""
        kind = config["judge_history"] or "own"
        if kind == "own":
            return self.histories
        if kind == "popular":
            popular = popular_history(self.histories, int(config["judge_history_len"]))
            return [popular if len(history) else history for history in self.histories]
        raise ValueError(f"judge_history must be 'own' or 'popular', got {kind!r}")

    def _score_kind(self, kind, input_type):
        if kind not in AUG_SCORES:
            raise ValueError(f"aug_score must be one of {AUG_SCORES}, got {kind!r}")
        if kind == "auto":  # pointwise general/context models predict sigmoid(logit)
            return "logit" if self.type != ModelType.SEQUENTIAL and input_type == InputType.POINTWISE else "predict"
        return kind

    def _judged_pairs(self, config):
        """``[n, 3]`` rows (user, preferred, other) of sampled cold-item pairs the judge decided."""
        pairs = judges.sample_pairs(self.histories, self.cold_items, int(config["aug_users_per_item"]),
                                    int(config["aug_pairs_per_user"]), self.min_history, config["aug_seed"])
        probs, report = self._judge(pairs)
        per_pair = int(config["aug_warm_pairs_per_user"] or 0)
        if per_pair > 0:  # judged separately, so the cold pairs' cached judgements are reused
            warm = judges.warm_pairs(pairs, self.histories, self.warm_items, per_pair, config["aug_seed"])
            warm_probs, warm_report = self._judge(warm)
            pairs, probs = torch.cat([pairs, warm]), torch.cat([probs, warm_probs])
            report = {key: report[key] + warm_report[key] for key in ("pairs", "computed", "reused", "seconds")}
            report["pairs_per_s"] = round(report["computed"] / report["seconds"], 2) if report["computed"] else float("nan")
            report["warm_pairs"] = len(warm)
        keep, a_wins, confidence = judges.decide(probs, float(config["aug_min_confidence"]),
                                                  float(config["aug_keep_fraction"] or 1.0))
        users, a, b = pairs.T
        self.judge_report = {**report, "kept": int(keep.sum()), "dropped": int((~keep).sum()),
                             **judges.order_diagnostics(probs)}
        self.logger.info(f"AugBPR judged pairs ({config['judge']} judge): {self.judge_report}")
        self._free_judge()
        winner_prob = (1 + confidence) / 2  # the judge's probability that the winner is preferred
        judged = torch.stack([users, torch.where(a_wins, a, b), torch.where(a_wins, b, a)], dim=1)[keep]
        return judged, winner_prob[keep].float()

    def _judge(self, pairs):
        return judges.judge_pairs(self.judge, pairs, self.config["cache_dir"], self.config["judge_chunk_size"],
                                  show_progress=bool(self.config["show_progress"]))

    def _free_judge(self):
        if hasattr(self.judge, "_loaded"):
            self.judge._loaded = None  # the LLM is not needed while training; reloaded on demand

    def _register_sequences(self, config):
        """Each user's latest training sequence, the input a sequential model scores items after."""
        max_len = int(config["MAX_ITEM_LIST_LENGTH"])
        sequences = torch.zeros(len(self.histories), max_len, dtype=torch.long)
        lengths = torch.zeros(len(self.histories), dtype=torch.long)
        for user, history in enumerate(self.histories):
            history = history[-max_len:]
            sequences[user, :len(history)] = torch.as_tensor(history)
            lengths[user] = len(history)
        self.item_seq_field = self.iid_field + config["LIST_SUFFIX"]
        self.item_seq_len_field = config["ITEM_LIST_LENGTH_FIELD"]
        self.register_buffer("user_sequences", sequences.to(self.device), persistent=False)
        self.register_buffer("user_sequence_lengths", lengths.to(self.device), persistent=False)

    def pair_scores(self, users, items):
        """Base-model scores of (user, item) rows through its own ``predict``."""
        fields = {self.uid_field: users, self.iid_field: items}
        if self.type == ModelType.SEQUENTIAL:
            fields[self.item_seq_field] = self.user_sequences[users]
            fields[self.item_seq_len_field] = self.user_sequence_lengths[users]
        scores = self.base.predict(Interaction(fields)).view(-1)
        return torch.logit(scores, eps=1e-7) if self.aug_score == "logit" else scores

    def aug_loss(self, pairs, targets=None):
        """Mean ``-log sigmoid(d)``, ``d = s(u, pos) - s(u, neg)``, over judged ``pairs`` [n, 3];
        with ``targets`` (the judge's probability that pos wins) the soft-label cross-entropy
        ``-(p log sigmoid(d) + (1 - p) log sigmoid(-d))``."""
        users, pos, neg = pairs.T
        held = getattr(self, "_held_by_aug", [])  # aug_loss_moves: items
        for parameter in held:  # left out of this loss's graph: it gets no gradient from it
            parameter.requires_grad_(False)
        try:
            scores = self.pair_scores(torch.cat([users, users]), torch.cat([pos, neg]))
        finally:
            for parameter in held:
                parameter.requires_grad_(True)
        pos_scores, neg_scores = scores.split(len(users))
        margin = pos_scores - neg_scores
        if targets is None:
            return -F.logsigmoid(margin).mean()
        return -(targets * F.logsigmoid(margin) + (1 - targets) * F.logsigmoid(-margin)).mean()

    def calculate_loss(self, interaction):
        loss = self.base.calculate_loss(interaction)
        if self.aug_weight == 0 or len(self.aug_pairs) == 0:
            return loss
        index = torch.randint(len(self.aug_pairs), (self.aug_batch_size,), device=self.aug_pairs.device)
        targets = self.aug_targets[index] if self.aug_label == "soft" else None
        aug = self.aug_weight * self.aug_loss(self.aug_pairs[index], targets)
        return (*loss, aug) if isinstance(loss, tuple) else (loss, aug)

    def predict(self, interaction):
        return self.base.predict(interaction)

    def full_sort_predict(self, interaction):
        return self.base.full_sort_predict(interaction)

    def other_parameter(self):
        return self.base.other_parameter()

    def load_other_parameter(self, para):
        self.base.load_other_parameter(para)

    def extra_results(self, train_data, valid_data, test_data):
        """Judging figures and the judge's pairwise accuracy on held-out truth: pairs of cold-start
        items where the user interacted with one in validation or test and never with the other."""
        if self.judge_report is None:
            return {}
        held_out = np.concatenate([
            torch.stack([loader._dataset.inter_feat[self.uid_field], loader._dataset.inter_feat[self.iid_field]], 1).numpy()
            for loader in (valid_data, test_data)
        ])
        interacted = [set(h.tolist()) for h in self.histories]
        for user, item in held_out:
            interacted[user].add(int(item))
        truth = judges.truth_pairs(held_out.tolist(), interacted, self.cold_items, self.histories, self.min_history,
                                   int(self.config["judge_eval_pairs"]), self.config["aug_seed"])
        results = {"judging": self.judge_report}
        if len(truth):
            probs, report = self._judge(truth)
            self._free_judge()
            results["judge_accuracy"] = {"accuracy": round(judges.pairwise_accuracy(probs), 4), "chance": 0.5,
                                         "pairs": len(truth), "seconds": report["seconds"],
                                         **judges.order_diagnostics(probs)}
        return results


class ColdRowNormCap(nn.Module):
    """Parametrisation of an item-embedding weight: cold-start rows scaled down to at most ``ratio``
    times the mean norm of the warm rows (taken without gradient, so the cap follows the warm items
    as they train but never pulls them)."""

    def __init__(self, cold_items, warm_items, ratio):
        super().__init__()
        self.register_buffer("cold", torch.as_tensor(cold_items, dtype=torch.long), persistent=False)
        self.register_buffer("warm", torch.as_tensor(warm_items, dtype=torch.long), persistent=False)
        self.ratio = ratio

    def forward(self, weight):
        cap = self.ratio * weight[self.warm].detach().norm(dim=1).mean()
        cold = weight[self.cold]
        scale = (cap / cold.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
        return weight.index_copy(0, self.cold, cold * scale)
