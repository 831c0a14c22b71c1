"""SupportRidge: a per-user linear model on the item text embeddings, fitted to the support set.

The control that tells whether the text embeddings carry a user's preferences at all. Each task
fits, in closed form and with no meta-learning, ``r - mean(support r) ~ w . (x - mean(support x))``
by ridge regression on the support items' text embeddings ``x`` (``episodic_text``: the same
table MetaLLMRec reads), and predicts a query item as ``median(support r) + w . (x - mean x)``:
SupportMedian plus a personal content term. With fewer support ratings than dimensions the fit is
kernel ridge in the dual, ``alpha = (K + lambda I)^-1 (r - mean r)``. ``ridge_lambdas`` is a grid
and each task takes the lambda with the smallest leave-one-out squared error (closed form, see
``ridge.choose_lambda``), so nothing is tuned on validation or test users. If
SupportRidge ranks a task's query items better than chance where MetaLLMRec's adaptation does
not, the information is in the text and the MAML update does not extract it.
"""
import torch

from recbole_llm.model.episodic import EpisodicReference
from recbole_llm.model.episodic_text import EpisodicText
from recbole_llm.model.ridge import choose_lambda, ridge_predict


class SupportRidge(EpisodicText, EpisodicReference):
    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.register_buffer("item_text", self.text_table(config, dataset, "item").to(self.device), persistent=False)
        lambdas = [float(v) for v in (config["ridge_lambdas"] or [])]
        if not lambdas or min(lambdas) <= 0:
            raise ValueError(f"ridge_lambdas must be a non-empty list of positive numbers, got {config['ridge_lambdas']!r}")
        self.lambdas = lambdas

    def adapt_and_predict(self, task):
        support_x = self.item_text[task.support_items.to(self.device)].double()
        query_x = self.item_text[task.query_items.to(self.device)].double()
        support_r = task.support_ratings.to(self.device).double()
        lam, _ = choose_lambda(support_x, support_r, self.lambdas)
        personal = ridge_predict(support_x, support_r, query_x, lam) - support_r.mean()
        return (support_r.median() + personal).float()
