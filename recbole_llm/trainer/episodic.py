"""Episodic trainer (one user = one task) for MetaLLMRec, MeLU and SupportMedian, and task
evaluation for RecBole's rating models.

Training: each meta-batch holds ``train_batch_size`` tasks; every task's query loss after local
adaptation (``model.calculate_loss(task)``) is back-propagated (averaged over the batch) into the
meta-parameters, and the meta-optimiser (``learner``, Adam by default, ``learning_rate``) takes
one step. RecBole's ``fit`` supplies epochs, validation every ``eval_step`` epochs, early
stopping on ``valid_metric`` (MAE) and checkpoints.

Evaluation: each task's query ratings are predicted after adapting on its support set, without
touching the meta-parameters. Metrics:

* ``mae``: RecBole's MAE over all query ratings (micro average; with 10 query ratings per task it
  equals the mean of per-task MAEs);
* ``ndcg@3`` (``graded_ndcg``): per task, the query items are ranked by predicted rating
  (descending; tied predictions counted by expectation over their orders), DCG@3 = sum over ranks j = 1..3 of
  (2^r_j - 1) / log2(j + 1) with r_j the true rating at rank j, divided by the DCG@3 of the query
  sorted by true rating; the mean over tasks is reported. RecBole's NDCG is binary and cannot be
  combined with MAE in one metrics list, hence our own.

Diagnostics (reported next to them, means over tasks): ``spearman``, the rank correlation of
predicted and true query ratings within a task (0 for a constant prediction); for models that
adapt locally, ``spearman_before`` of the un-adapted estimator, so ``spearman - spearman_before``
is what adaptation adds to the ranking within a task; ``spread``, the standard deviation of the
predictions within a task over that of the true ratings (tasks whose ratings all agree are left
out): a per-user offset has spread 0.

Models trained here are ``EpisodicRecommender``s: ``calculate_loss(task)`` and
``adapt_and_predict(task)``.
"""
import math
from collections import OrderedDict

import numpy as np
import torch
from recbole.evaluator.collector import DataStruct
from recbole.trainer import Trainer
from recbole.utils import set_color
from scipy.stats import rankdata
from tqdm import tqdm

from recbole_llm import distributed
from recbole_llm.checkpoint import CheckpointSafeMixin


def graded_ndcg(predicted, true, k=3):
    """nDCG@k of one task, gain 2^r - 1, items ranked by ``predicted``; tied predictions count by
    expectation over their random orders (each rank a tie group covers gets the group's mean gain).

    Ties are never broken by item id: internal ids follow popularity, so an id order would turn a
    constant predictor into a popularity ranking.
    """
    predicted, true = np.asarray(predicted, dtype=float), np.asarray(true, dtype=float)
    gains = 2.0 ** true - 1.0
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    values, group = np.unique(-predicted, return_inverse=True)  # groups in descending prediction
    expected_gain = np.bincount(group, weights=gains) / np.bincount(group)
    ranked = np.repeat(expected_gain, np.bincount(group))[:k]  # expected gain at each rank
    dcg = float((ranked * discounts[:len(ranked)]).sum())
    ideal = np.sort(gains)[::-1][:k]
    idcg = float((ideal * discounts[:len(ideal)]).sum())
    return dcg / idcg if idcg > 0 else 0.0


def rank_correlation(predicted, true):
    """Spearman's rho (average ranks for ties); 0 when either side is constant."""
    a, b = rankdata(predicted), rankdata(true)
    a, b = a - a.mean(), b - b.mean()
    norm = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / norm) if norm > 0 else 0.0


class TaskEvaluation(CheckpointSafeMixin):
    """``evaluate`` over ``episodes.TaskDataLoader``s; subclasses define ``predict_task(task)``."""

    def predict_task(self, task):
        raise NotImplementedError

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if not eval_data:
            return None
        if load_best_model:
            self._load_best_into_model(model_file)
        self.model.eval()
        k = int(self.config["meta_ndcg_k"] or 3)
        records = []  # per task: (predictions, true ratings, un-adapted predictions or None)
        batches = tqdm(eval_data, desc=set_color("Evaluate   ", "pink"), ncols=100) if show_progress else eval_data
        for tasks in batches:
            for task in distributed.shard(tasks, self.config):  # every rank predicts its share
                pred = self.predict_task(task).detach().float().cpu()
                before = None
                if getattr(self.model, "adapts_locally", False):
                    before = self.model.adapt_and_predict(task, steps=0).detach().float().cpu()
                records.append((pred, task.query_ratings.float(), before))
        struct, per_task = DataStruct(), {f"ndcg@{k}": [], "spearman": [], "spearman_before": [], "spread": []}
        for pred, true, before in distributed.gather(records, self.config):
            struct.update_tensor("rec.score", pred)
            struct.update_tensor("data.label", true)
            per_task[f"ndcg@{k}"].append(graded_ndcg(pred.numpy(), true.numpy(), k))
            per_task["spearman"].append(rank_correlation(pred.numpy(), true.numpy()))
            if before is not None:
                per_task["spearman_before"].append(rank_correlation(before.numpy(), true.numpy()))
            if true.std() > 0:
                per_task["spread"].append(float(pred.std() / true.std()))
        result = self.evaluator.evaluate(struct)
        for name, values in per_task.items():
            if values:
                result[name] = round(float(np.mean(values)), self.config["metric_decimal_place"])
        return OrderedDict(result)


class EpisodicTrainer(TaskEvaluation, Trainer):
    recbole_training_loop = False  # every rank takes its share of each meta-batch; gradients summed

    def predict_task(self, task):
        return self.model.adapt_and_predict(task)

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        self.model.train()
        losses = []
        batches = (tqdm(train_data, desc=set_color(f"Train {epoch_idx:>5}", "pink"), ncols=100)
                   if show_progress else train_data)
        for tasks in batches:
            self.optimizer.zero_grad()
            batch_loss = 0.0
            for task in distributed.shard(tasks, self.config):
                loss = self.model.calculate_loss(task) / len(tasks)
                self._check_nan(loss)
                loss.backward()  # per task, so each task's graph is freed at once
                batch_loss += loss.item()
            distributed.all_reduce_gradients(self.model.parameters(), self.config)
            batch_loss = distributed.all_reduce_sum(batch_loss, self.config)
            if self.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), **self.clip_grad_norm)
            self.optimizer.step()
            losses.append(batch_loss)
        return float(np.mean(losses)) if losses else math.nan


class RatingBaselineTrainer(TaskEvaluation, Trainer):
    """RecBole's usual pointwise training for a non-meta model; tasks are evaluated without
    adaptation: the query ratings are ``rating_min + (rating_max - rating_min) * model.predict``
    for a model trained on ratings min-max scaled to [0, 1] (e.g. RecBole's WideDeep with its
    logistic loss on the scaled rating). The dataset joins user and item features into the query.
    """

    def __init__(self, config, model, dataset, rating_range):
        super().__init__(config, model)
        self.dataset = dataset
        self.rating_min, self.rating_max = rating_range

    def predict_task(self, task):
        interaction = self.dataset.join(self.dataset.inter_feat[task.query_rows]).to(self.device)
        with torch.no_grad():
            scaled = self.model.predict(interaction)
        return self.rating_min + (self.rating_max - self.rating_min) * scaled

