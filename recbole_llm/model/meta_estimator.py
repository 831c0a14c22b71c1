"""MAML-trained user preference estimator shared by MetaLLMRec and MeLU.

A subclass defines ``features(users, items)``: the global-only input representation of each
(user, item) pair (MeLU: attribute embeddings; MetaLLMRec: projected frozen text embeddings).
The shared part is the rating estimator, an MLP ``[in] -> mlp_hidden_size -> 1`` with ReLU, and
its local adaptation:

* for a task, the estimator is adapted on the support set with ``local_update`` plain SGD steps
  of size ``local_lr`` (the features and the rest of the model stay global, as in MeLU);
* training (MAML) differentiates the query loss of the adapted estimator with respect to the
  initial weights and the feature parameters; second order by default, ``first_order: True``
  drops the second-order terms (the inner gradients are treated as constants);
* evaluation adapts a detached copy: the meta-parameters are never changed.

Two interchangeable backends run the inner loop (``meta_backend``): ``higher`` (functional
copies via ``higher.innerloop_ctx`` with ``copy_initial_weights=False``, otherwise the initial
weights get no gradient) and ``func`` (``torch.func.functional_call`` and a hand-written SGD
step), a fallback that needs nothing but torch. They compute the same function.

Loss: ``loss_type: L1`` (the paper's) or ``MSE`` (MeLU's) for the meta (query) loss and, unless
``local_loss_type`` says otherwise, the local one. With L1 the local gradient on the output bias
is the mean sign of the errors, so local steps mostly find the user's median rating.
The output bias starts at the mean meta-training rating, so the untrained model predicts the
global mean rather than 0.

Inner-loop options (``func`` backend; the paper's setting is ``local_params: all``,
``meta_sgd: False``): ``local_params`` adapts ``all`` estimator weights, only the
``output_bias`` (a per-user rating offset: the ablation that tells an offset from a preference),
or ``all_but_output_bias``; ``meta_sgd: True`` meta-learns one local learning rate per weight
(Meta-SGD, Li et al. 2017), initialised at ``local_lr``.

``local_head: ridge`` (ours; not in the paper) adds a closed-form per-user term after the local
steps: ridge regression of the support residuals on the estimator's input features (the user part
is constant within a task and centres away), with an unpenalised intercept (``ridge_intercept``: the residuals' mean, or their median, which
L1 asks for) and a meta-learned lambda (starting at ``ridge_lambda``). Meta-training differentiates through the solve (as R2D2,
Bertinetto et al. 2019), so the global features are learned for a per-user linear fit: the inner
loop gets the taste term that SupportRidge shows the texts carry and a few SGD steps do not find.
"""
import math

import higher
import torch
from torch import nn
from torch.func import functional_call

from recbole_llm.model.episodic import EpisodicRecommender
from recbole_llm.model.ridge import ridge_predict

BACKENDS = ("higher", "func")
LOCAL_PARAMS = ("all", "output_bias", "all_but_output_bias")
LOCAL_HEADS = ("none", "ridge")
LOSSES = {"L1": nn.functional.l1_loss, "MSE": nn.functional.mse_loss}


def _detach_grads(grads):
    return [g.detach() if g is not None else None for g in grads]


class MetaEstimator(EpisodicRecommender):
    adapts_locally = True

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.local_lr = float(config["local_lr"])
        self.local_update = int(config["local_update"])
        self.local_update_eval = int(
            config["local_update_eval"] if config["local_update_eval"] is not None else self.local_update)
        self.first_order = bool(config["first_order"])
        self.meta_backend = config["meta_backend"] or "higher"
        if self.meta_backend not in BACKENDS:
            raise ValueError(f"meta_backend must be one of {BACKENDS}, got {self.meta_backend!r}")
        self.loss_fn = self._loss("loss_type", config["loss_type"] or "L1")
        self.local_loss_fn = self._loss("local_loss_type", config["local_loss_type"] or config["loss_type"] or "L1")
        self.local_params = config["local_params"] or "all"
        if self.local_params not in LOCAL_PARAMS:
            raise ValueError(f"local_params must be one of {LOCAL_PARAMS}, got {self.local_params!r}")
        self.meta_sgd = bool(config["meta_sgd"])
        if self.meta_backend == "higher" and (self.local_params != "all" or self.meta_sgd):
            raise ValueError("local_params other than 'all' and meta_sgd need meta_backend: func")
        self.local_head = config["local_head"] or "none"
        if self.local_head not in LOCAL_HEADS:
            raise ValueError(f"local_head must be one of {LOCAL_HEADS}, got {self.local_head!r}")
        if self.local_head == "ridge":
            lam = float(config["ridge_lambda"])
            if lam <= 0:
                raise ValueError(f"ridge_lambda must be positive, got {lam}")
            self.log_ridge_lambda = nn.Parameter(torch.tensor(math.log(lam)))
            self.ridge_intercept = config["ridge_intercept"] or "mean"
            if self.ridge_intercept not in ("mean", "median"):
                raise ValueError(f"ridge_intercept must be 'mean' or 'median', got {self.ridge_intercept!r}")

    def _loss(self, key, name):
        if str(name).upper() not in LOSSES:
            raise ValueError(f"{key} must be one of {sorted(LOSSES)} for {type(self).__name__}, got {name!r}")
        return LOSSES[str(name).upper()]

    def build_estimator(self, in_dim, hidden_sizes):
        """The locally adapted MLP; its output bias starts at the mean training rating."""
        layers, dims = [], [in_dim] + list(hidden_sizes)
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(d_in, d_out), nn.ReLU()]
        out = nn.Linear(dims[-1], 1)
        layers.append(out)
        self.estimator = nn.Sequential(*layers)
        with torch.no_grad():
            out.bias.fill_(self.rating_mean)
        output_bias = f"{len(layers) - 1}.bias"
        names = [name for name, _ in self.estimator.named_parameters()]
        self.adapted_names = {"all": names, "output_bias": [output_bias],
                              "all_but_output_bias": [n for n in names if n != output_bias]}[self.local_params]
        if self.meta_sgd:
            weights = dict(self.estimator.named_parameters())
            self.local_lrs = nn.ParameterDict({name.replace(".", "_"): nn.Parameter(torch.full_like(weights[name], self.local_lr))
                                               for name in self.adapted_names})

    def features(self, users, items):
        """[n, in_dim] global input of the estimator for (user, item) pairs (subclasses)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------
    # local adaptation

    def adapted_predict(self, x_support, y_support, x_query, steps, track_meta_grads):
        """Query predictions of the estimator after ``steps`` SGD steps on the support set.

        With ``track_meta_grads`` the result is differentiable with respect to the estimator's
        initial weights (and whatever ``x_*`` depend on); without, it is computed on a detached
        copy and returned detached.
        """
        if self.meta_backend == "higher":
            return self._adapt_higher(x_support, y_support, x_query, steps, track_meta_grads)
        return self._adapt_func(x_support, y_support, x_query, steps, track_meta_grads)

    def adapted_predict_with_head(self, x_s, y_s, x_q, steps, track_meta_grads):
        """``adapted_predict`` plus, with ``local_head: ridge``, the ridge fit of the support
        residuals of the adapted estimator, evaluated on the query."""
        if self.local_head == "none":
            return self.adapted_predict(x_s, y_s, x_q, steps, track_meta_grads)
        both = self.adapted_predict(x_s, y_s, torch.cat([x_s, x_q]), steps, track_meta_grads)
        fitted, out = both[:len(x_s)], both[len(x_s):]
        out = out + ridge_predict(x_s, y_s - fitted, x_q, self.log_ridge_lambda.exp(), self.ridge_intercept)
        return out if track_meta_grads else out.detach()

    def _adapt_higher(self, x_s, y_s, x_q, steps, track):
        inner_opt = torch.optim.SGD(self.estimator.parameters(), lr=self.local_lr)
        callback = _detach_grads if self.first_order else None
        with higher.innerloop_ctx(self.estimator, inner_opt, copy_initial_weights=False,
                                  track_higher_grads=track) as (fmodel, diffopt):
            for _ in range(steps):
                diffopt.step(self.local_loss_fn(fmodel(x_s).squeeze(-1), y_s), grad_callback=callback)
            out = fmodel(x_q).squeeze(-1)
        return out if track else out.detach()

    def _step_size(self, name):
        return self.local_lrs[name.replace(".", "_")] if self.meta_sgd else self.local_lr

    def _adapt_func(self, x_s, y_s, x_q, steps, track):
        params = dict(self.estimator.named_parameters())
        names = self.adapted_names
        create_graph = track and not self.first_order
        for _ in range(steps):
            if not track:
                params = {k: p.detach().requires_grad_(k in names) for k, p in params.items()}
            loss = self.local_loss_fn(functional_call(self.estimator, params, (x_s,)).squeeze(-1), y_s)
            grads = torch.autograd.grad(loss, [params[k] for k in names], create_graph=create_graph)
            if not create_graph:
                grads = _detach_grads(grads)
            params = {**params, **{k: params[k] - self._step_size(k) * g for k, g in zip(names, grads)}}
        out = functional_call(self.estimator, params, (x_q,)).squeeze(-1)
        return out if track else out.detach()

    # ------------------------------------------------------------------------------------------
    # tasks

    def calculate_loss(self, task):
        """MAML query loss of one ``episodes.Task`` (differentiable w.r.t. all meta-parameters)."""
        users_s, items_s, y_s, users_q, items_q = self.task_tensors(task)
        x_s, x_q = self.features(users_s, items_s), self.features(users_q, items_q)
        pred = self.adapted_predict_with_head(x_s, y_s, x_q, self.local_update, track_meta_grads=True)
        return self.loss_fn(pred, task.query_ratings.to(self.device))

    def adapt_and_predict(self, task, steps=None):
        """Query ratings predicted after adapting on the task's support set (meta weights kept):
        ``local_update_eval`` steps and the local head; ``steps=0``: the un-adapted estimator
        (no steps, no head), the "before adaptation" of the diagnostics."""
        users_s, items_s, y_s, users_q, items_q = self.task_tensors(task)
        with torch.enable_grad():
            x_s = self.features(users_s, items_s).detach()
            x_q = self.features(users_q, items_q).detach()
            if steps == 0:
                return self.adapted_predict(x_s, y_s, x_q, 0, track_meta_grads=False)
            steps = self.local_update_eval if steps is None else steps
            return self.adapted_predict_with_head(x_s, y_s, x_q, steps, track_meta_grads=False)

    def predict(self, interaction):
        """Ratings of the un-adapted (global) estimator for the pairs of an Interaction."""
        users, items = interaction[self.USER_ID], interaction[self.ITEM_ID]
        return self.estimator(self.features(users, items)).squeeze(-1)

    def full_sort_predict(self, interaction):
        """Un-adapted ratings of every item for each user, [batch * n_items]."""
        users = interaction[self.USER_ID]
        all_items = torch.arange(self.n_items, device=users.device)
        pairs_u = users.repeat_interleave(self.n_items)
        pairs_i = all_items.repeat(len(users))
        return self.estimator(self.features(pairs_u, pairs_i)).squeeze(-1)
