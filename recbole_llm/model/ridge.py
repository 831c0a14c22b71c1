"""Per-task ridge regression with an unpenalised intercept, in the dual (fewer ratings than
dimensions): SupportRidge's closed-form fit and MetaEstimator's ``local_head: ridge``."""
import torch


def choose_lambda(support_x, support_r, lambdas):
    """``(lambda, its leave-one-out residuals)``: the one of ``lambdas`` with the smallest
    leave-one-out squared error of ``ridge_predict``. The fit is linear in r with hat matrix
    ``S = J + K (K + lambda I)^-1 (I - J)`` (J averages, K the centred kernel), so the residual of
    row i is ``(r_i - (S r)_i) / (1 - S_ii)``: exact, the centring and intercept refitted too."""
    x = (support_x - support_x.mean(0)).double()
    r = support_r.double()
    n = len(r)
    kernel = x @ x.T
    eye = torch.eye(n, dtype=kernel.dtype, device=kernel.device)
    centring = eye - 1.0 / n
    best = None
    for lam in lambdas:
        hat = 1.0 / n + kernel @ torch.linalg.solve(kernel + lam * eye, centring)
        residuals = (r - hat @ r) / (1 - hat.diagonal())
        loo = float((residuals ** 2).mean())
        if best is None or loo < best[0]:
            best = (loo, lam, residuals)
    return best[1], best[2]


def ridge_predict(support_x, support_r, query_x, lam, intercept="mean"):
    """Ridge predictions for ``query_x`` fitted on ``(support_x, support_r)``, differentiable with
    respect to all inputs and ``lam`` (a scalar tensor or float): an intercept plus
    ``(x - mean x) . w`` with ``w = X_c^T (X_c X_c^T + lam I)^-1 (r - mean r)``. The intercept is the
    support mean of ``r`` (least squares) or, with ``intercept="median"``, the median of the support
    residuals of the linear term (the L1-optimal offset for that ``w``)."""
    centre = support_x.mean(0)
    x_s, x_q = support_x - centre, query_x - centre
    eye = torch.eye(len(support_r), dtype=support_x.dtype, device=support_x.device)
    alpha = torch.linalg.solve(x_s @ x_s.T + lam * eye, support_r - support_r.mean())
    weights = x_s.T @ alpha
    if intercept == "median":
        return (support_r - x_s @ weights).median() + x_q @ weights
    return support_r.mean() + x_q @ weights
