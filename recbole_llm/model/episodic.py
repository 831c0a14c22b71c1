"""Base class of the models trained and evaluated per task (one user = one task).

A task (``recbole_llm.data.episodes.Task``) holds a user's support ratings, which a model may
use at prediction time, and query ratings, which it predicts. ``EpisodicTrainer`` trains such a
model with ``calculate_loss(task)`` and evaluates it with ``adapt_and_predict(task)``;
``EpisodicDataset`` builds the tasks. Both are found through this class (``recbole_llm.utils``),
and its yaml (``properties/model/EpisodicRecommender.yaml``) holds the shared evaluation settings.
"""
import torch
from recbole.model.abstract_recommender import GeneralRecommender
from recbole.utils import InputType, ModelType


class EpisodicRecommender(GeneralRecommender):
    type = ModelType.GENERAL
    input_type = InputType.POINTWISE
    adapts_locally = False  # True: ``adapt_and_predict(task, steps=0)`` gives the un-adapted predictions

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.rating_mean = dataset.train_rating_mean()

    def task_tensors(self, task):
        """``(support users, support items, support ratings, query users, query items)`` on the device."""
        device = self.device
        users_s = torch.full_like(task.support_items, task.user).to(device)
        users_q = torch.full_like(task.query_items, task.user).to(device)
        return (users_s, task.support_items.to(device), task.support_ratings.to(device),
                users_q, task.query_items.to(device))

    def calculate_loss(self, task):
        """Training loss of one task (differentiable with respect to the model's parameters)."""
        raise NotImplementedError

    def adapt_and_predict(self, task):
        """Predicted query ratings of one task, given its support ratings; the model is unchanged."""
        raise NotImplementedError


class EpisodicReference(EpisodicRecommender):
    """A parameter-free reference (SupportMedian, ItemMean): it runs through the same trainer and
    evaluator as the learned models with a fake loss, as RecBole's ``Pop`` does, for one epoch
    (``properties/model/EpisodicReference.yaml``)."""

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.fake_loss = torch.nn.Parameter(torch.zeros(1))

    def calculate_loss(self, task):
        return self.fake_loss.sum()

    def predict(self, interaction):
        """Without a support set: the mean meta-training rating for every pair."""
        return torch.full((len(interaction),), self.rating_mean, device=self.device)

    def full_sort_predict(self, interaction):
        return torch.full((len(interaction) * self.n_items,), self.rating_mean, device=self.device)
