"""ItemMean: the item-quality reference of the episodic scenarios.

Every query rating is predicted as the query item's mean known rating; an item with none gets the
mean of all known ratings (so unknown items tie, and ties count by expectation in nDCG@3). Within a
task this is a pure item ranking: it says how much of a model's nDCG@3 an item-quality lookup
explains. ``item_mean_source`` says which ratings are known:

* ``inductive``: the meta-training tasks' ratings only (what a model trained on warm users knows;
  a cold item has none);
* ``transductive``: those plus the support ratings of every validation, test and scenario task,
  as WideDeep is trained (other test users' support ratings of a cold item inform its mean).

``item_mean_user_offset`` adds the user's mean support residual (support rating minus the item
mean), which changes MAE, not the ranking. Like SupportMedian it runs through the episodic trainer
with a fake loss (``EpisodicReference``).
"""
import torch

from recbole_llm.data.episodes import TRAIN
from recbole_llm.model.episodic import EpisodicReference

SOURCES = ("inductive", "transductive")


class ItemMean(EpisodicReference):
    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        source = config["item_mean_source"] or "inductive"
        if source not in SOURCES:
            raise ValueError(f"item_mean_source must be one of {SOURCES}, got {source!r}")
        self.user_offset = bool(config["item_mean_user_offset"])
        items, ratings = [], []
        for task in dataset.episodes[TRAIN]:
            items += [task.support_items, task.query_items]
            ratings += [task.support_ratings, task.query_ratings]
        if source == "transductive":
            evaluation = {id(t): t for name, tasks in dataset.episodes.items() if name != TRAIN for t in tasks}
            items += [t.support_items for t in evaluation.values()]
            ratings += [t.support_ratings for t in evaluation.values()]
        items, ratings = torch.cat(items), torch.cat(ratings)
        counts = torch.bincount(items, minlength=self.n_items).float()
        sums = torch.bincount(items, weights=ratings, minlength=self.n_items).float()
        means = torch.where(counts > 0, sums / counts.clamp(min=1), ratings.mean())
        self.register_buffer("item_means", means.to(self.device), persistent=False)

    def adapt_and_predict(self, task):
        predicted = self.item_means[task.query_items.to(self.device)]
        if self.user_offset:
            support = task.support_ratings.to(self.device) - self.item_means[task.support_items.to(self.device)]
            predicted = predicted + support.mean()
        return predicted

    def predict(self, interaction):
        return self.item_means[interaction[self.ITEM_ID]]

    def full_sort_predict(self, interaction):
        return self.item_means.repeat(len(interaction))
