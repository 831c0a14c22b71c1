"""SupportRidge: a per-user linear model on the item text embeddings, fitted to the support set.

The control that tells whether the text embeddings carry a user's preferences at all. Each task
fits, in closed form and with no meta-learning, ``r - mean(support r) ~ w . (x - mean(support x))``
by ridge regression on the support items' text embeddings ``x`` (``episodic_text``: the same
table MetaLLMRec reads), and predicts a query item as ``median(support r) + w . (x - mean x)``:
SupportMedian plus a personal content term. With fewer support ratings than dimensions the fit is
kernel ridge in the dual, ``alpha = (K + lambda I)^-1 (r - mean r)``. ``ridge_lambdas`` is a grid
and each task takes the lambda with the smallest leave-one-out squared error (closed form, see
``ridge_fit``), so nothing is tuned on validation or test users. If
SupportRidge ranks a task's query items better than chance where MetaLLMRec's adaptation does
not, the information is in the text and the MAML update does not extract it.
"""
import torch

from recbole_llm.model.episodic import EpisodicReference
from recbole_llm.model.episodic_text import EpisodicText


def ridge_fit(support_x, support_r, lambdas):
    """``(centre of x, dual weights alpha, chosen lambda, its leave-one-out residuals)``: kernel
    ridge of the ratings on the centred embeddings with an unpenalised intercept, lambda chosen among
    ``lambdas`` by leave-one-out squared error. The fit is linear in r with hat matrix
    ``S = J + K (K + lambda I)^-1 (I - J)`` (J averages), so the leave-one-out residual is
    ``(r_i - (S r)_i) / (1 - S_ii)``, exact, the intercept refitted without row i as well."""
    centre = support_x.mean(0)
    x = (support_x - centre).double()
    r = support_r.double()
    n = len(r)
    kernel = x @ x.T
    eye = torch.eye(n, dtype=kernel.dtype, device=kernel.device)
    centring = eye - 1.0 / n
    best = None
    for lam in lambdas:
        inverse = torch.linalg.inv(kernel + lam * eye)
        hat = 1.0 / n + kernel @ inverse @ centring
        residuals = (r - hat @ r) / (1 - hat.diagonal())
        loo = float((residuals ** 2).mean())
        if best is None or loo < best[0]:
            best = (loo, inverse @ (centring @ r), lam, residuals)
    return centre, *best[1:]


class SupportRidge(EpisodicText, EpisodicReference):
    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.register_buffer("item_text", self.text_table(config, dataset, "item").to(self.device), persistent=False)
        lambdas = [float(v) for v in (config["ridge_lambdas"] or [])]
        if not lambdas or min(lambdas) <= 0:
            raise ValueError(f"ridge_lambdas must be a non-empty list of positive numbers, got {config['ridge_lambdas']!r}")
        self.lambdas = lambdas

    def adapt_and_predict(self, task):
        support_items, support_r = task.support_items.to(self.device), task.support_ratings.to(self.device).float()
        support_x = self.item_text[support_items]
        centre, alpha, _, _ = ridge_fit(support_x, support_r, self.lambdas)
        query_x = (self.item_text[task.query_items.to(self.device)] - centre).double()
        personal = query_x @ (support_x - centre).double().T @ alpha
        return float(support_r.median()) + personal.float()
