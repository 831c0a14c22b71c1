"""SupportMedian: the no-learning reference of the episodic scenarios.

Every query rating of a task is predicted as the median of the task's support ratings (torch's
median: the lower middle value for an even count), i.e. a per-user rating offset and nothing else.
A model with no parameters runs through the same trainer and evaluator as MetaLLMRec and MeLU
with a fake loss, as RecBole's ``Pop`` does (``EpisodicReference``).
Its graded nDCG@3 ranks constant predictions, so it measures the evaluator's tie-breaking.
"""
import torch

from recbole_llm.model.episodic import EpisodicReference


class SupportMedian(EpisodicReference):
    def adapt_and_predict(self, task):
        median = float(task.support_ratings.median())
        return torch.full((len(task.query_items),), median, device=self.device)
