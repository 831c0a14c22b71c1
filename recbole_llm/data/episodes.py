"""Episodic (one user = one task) data for meta-learned rating prediction (MetaLLMRec, MeLU).

The protocol follows MeLU and LLM-MetaRec:

* every user and every item is *warm* (existing) or *cold* (new); four scenarios are the cells of
  that table: ``warm_user_warm_item`` (meta-training, with held-out warm users for validation and
  test), ``cold_user_warm_item``, ``warm_user_cold_item`` and ``cold_user_cold_item``;
* inside each scenario a user is a task when he has between ``min_inter`` and ``max_inter``
  ratings *in that scenario* (13-100); ``query_num`` (10) of them, drawn at random with a seeded
  generator, are the query set, the rest the support set; tasks are drawn once per split.

Cold items (``meta_scenario_args``): ``item_cold_by: year`` marks items released in or after
``item_cold_from_year`` as cold (or, with ``item_cold_ratio``, the newest share of items by
release year, ties by internal id); items without a year are warm. ``item_cold_by: popularity``
marks items with fewer than ``item_warm_min_ratings`` ratings as cold (Book-Crossing).
Cold users: a seeded random share ``user_cold_ratio``; or, for k-fold cross-validation,
``user_cold_folds: k`` and ``user_cold_fold: i`` (users shuffled once, fold i is cold, so each
user is cold in exactly one of the k runs). Warm users with W-W tasks are split into meta-train /
validation / test users by ``meta_args.valid_test_ratio``. W-C tasks use every warm user (their
cold-item ratings were never trained on); C-W and C-C use the cold users.

Seeds come from ``meta_split_seed`` (``~`` = the run's ``seed``), so runs of different models
with the same seed see the same tasks.
"""
from dataclasses import dataclass
from logging import getLogger

import numpy as np
import torch
from recbole.data.dataloader.abstract_dataloader import AbstractDataLoader

from recbole_llm.data.scenarios import dict_setting, seeded_rng
from recbole_llm.distributed import single_process_view

TRAIN, VALID, TEST = "train", "valid", "test"
SCENARIOS = ("warm_user_warm_item", "cold_user_warm_item", "warm_user_cold_item", "cold_user_cold_item")
DEFAULT_META_ARGS = {"query_num": 10, "min_inter": 13, "max_inter": 100, "valid_test_ratio": [0.1, 0.1]}
DEFAULT_SCENARIO_ARGS = {"item_cold_by": "year", "item_year_field": "release_year", "item_cold_from_year": None,
                         "item_cold_ratio": None, "item_warm_min_ratings": 5, "user_cold_ratio": 0.2,
                         "user_cold_folds": None, "user_cold_fold": 0}


@dataclass
class Task:
    """One user's ratings split into support (adaptation) and query (evaluation) sets.

    Items are RecBole internal ids; ``*_rows`` index the dataset's ``inter_feat``.
    """
    user: int
    support_items: torch.Tensor
    support_ratings: torch.Tensor
    query_items: torch.Tensor
    query_ratings: torch.Tensor
    support_rows: torch.Tensor
    query_rows: torch.Tensor


def meta_args(config):
    args = dict_setting(config, "meta_args", defaults=DEFAULT_META_ARGS)
    if not 1 <= args["query_num"] < args["min_inter"] <= args["max_inter"]:
        raise ValueError(f"meta_args needs 1 <= query_num < min_inter <= max_inter, got {args}")
    return args


def _rng(config, *stream):
    return seeded_rng(config, "meta_split_seed", *stream)


def item_year_values(dataset, field):
    """Numeric value of ``field`` per internal item id (nan when missing or not a number)."""
    if dataset.item_feat is None or field not in dataset.item_feat:
        raise KeyError(
            f"cold items by year need the item field [{field}]; load it (meta_item_fields or "
            f"load_col.item) or set meta_scenario_args.item_year_field"
        )
    column = dataset.item_feat[field].numpy()
    if field in dataset.field2id_token:  # token field: map ids back to the raw tokens
        column = dataset.field2id_token[field][column]
    values = np.full(len(column), np.nan)
    for i, raw in enumerate(column):
        try:
            values[i] = float(raw)
        except (TypeError, ValueError):
            pass
    values[0] = np.nan  # padding
    return values


def cold_items(dataset, args, counts):
    """Boolean mask over internal item ids: True = cold."""
    n_items = dataset.item_num
    mask = np.zeros(n_items, dtype=bool)
    by = args["item_cold_by"]
    if by == "year":
        years = item_year_values(dataset, args["item_year_field"])
        known = ~np.isnan(years)
        if args["item_cold_from_year"] is not None:
            mask[known] = years[known] >= float(args["item_cold_from_year"])
        elif args["item_cold_ratio"] is not None:
            ids = np.flatnonzero(known)
            order = ids[np.lexsort((ids, years[ids]))]  # oldest first, ties by id
            size = int(round(float(args["item_cold_ratio"]) * len(ids)))
            mask[order[len(order) - size:]] = True
        else:
            raise ValueError("meta_scenario_args with item_cold_by: year needs item_cold_from_year or item_cold_ratio")
    elif by == "popularity":
        mask[1:] = counts[1:] < int(args["item_warm_min_ratings"])
    else:
        raise ValueError(f"meta_scenario_args.item_cold_by must be 'year' or 'popularity', got {by!r}")
    mask[0] = False
    return mask


def cold_users(config, users, args):
    """Sorted array of the cold users among ``users`` (seeded share or k-fold)."""
    users = np.sort(users)
    shuffled = _rng(config, 1).permutation(users)
    folds = args["user_cold_folds"]
    if folds:
        folds, fold = int(folds), int(args["user_cold_fold"])
        if not 0 <= fold < folds:
            raise ValueError(f"meta_scenario_args.user_cold_fold must be in [0, {folds}), got {fold}")
        return np.sort(np.array_split(shuffled, folds)[fold])
    size = int(round(float(args["user_cold_ratio"]) * len(users)))
    return np.sort(shuffled[:size])


def make_tasks(rows, users, items, ratings, rng, query_num, min_inter, max_inter):
    """Tasks of the users whose row count in ``rows`` lies in [min_inter, max_inter]."""
    tasks = []
    rows = rows[np.lexsort((rows, users[rows]))]
    bounds = np.flatnonzero(np.diff(users[rows])) + 1
    for user_rows in np.split(rows, bounds) if len(rows) else []:
        if not min_inter <= len(user_rows) <= max_inter:
            continue
        perm = user_rows[rng.permutation(len(user_rows))]
        query, support = np.sort(perm[:query_num]), np.sort(perm[query_num:])
        tasks.append(Task(
            user=int(users[user_rows[0]]),
            support_items=torch.as_tensor(items[support], dtype=torch.long),
            support_ratings=torch.as_tensor(ratings[support], dtype=torch.float),
            query_items=torch.as_tensor(items[query], dtype=torch.long),
            query_ratings=torch.as_tensor(ratings[query], dtype=torch.float),
            support_rows=torch.as_tensor(support, dtype=torch.long),
            query_rows=torch.as_tensor(query, dtype=torch.long),
        ))
    return tasks


def build_episodes(dataset):
    """``{train, valid, test, <scenario>...: [Task]}`` for a RecBole dataset (after filtering)."""
    config = dataset.config
    args = meta_args(config)
    scenario_args = dict_setting(config, "meta_scenario_args", defaults=DEFAULT_SCENARIO_ARGS)
    rating_field = config["RATING_FIELD"]
    if rating_field not in dataset.inter_feat:
        raise KeyError(f"episodic tasks need the rating field [{rating_field}] in the .inter file")
    users = dataset.inter_feat[dataset.uid_field].numpy()
    items = dataset.inter_feat[dataset.iid_field].numpy()
    ratings = dataset.inter_feat[rating_field].numpy().astype(np.float32)

    item_is_cold = cold_items(dataset, scenario_args, np.bincount(items, minlength=dataset.item_num))
    cold = cold_users(config, np.unique(users), scenario_args)
    user_is_cold = np.zeros(dataset.user_num, dtype=bool)
    user_is_cold[cold] = True
    row_user_cold, row_item_cold = user_is_cold[users], item_is_cold[items]

    cells = {
        "warm_user_warm_item": ~row_user_cold & ~row_item_cold,
        "cold_user_warm_item": row_user_cold & ~row_item_cold,
        "warm_user_cold_item": ~row_user_cold & row_item_cold,
        "cold_user_cold_item": row_user_cold & row_item_cold,
    }
    task_args = (args["query_num"], args["min_inter"], args["max_inter"])
    episodes = {
        name: make_tasks(np.flatnonzero(rows), users, items, ratings, _rng(config, 2, k), *task_args)
        for k, (name, rows) in enumerate(cells.items())
    }
    warm = episodes.pop("warm_user_warm_item")
    order = _rng(config, 3).permutation(len(warm))
    valid_ratio, test_ratio = args["valid_test_ratio"]
    n_valid, n_test = int(round(valid_ratio * len(warm))), int(round(test_ratio * len(warm)))
    parts = {TRAIN: order[n_valid + n_test:], VALID: order[:n_valid], TEST: order[n_valid:n_valid + n_test]}
    episodes = {**{name: [warm[i] for i in sorted(idx)] for name, idx in parts.items()}, **episodes}
    episodes["warm_user_warm_item"] = episodes[TEST]
    if not episodes[TRAIN]:
        raise ValueError(
            f"no meta-training task: no warm user has {args['min_inter']}-{args['max_inter']} ratings on "
            f"warm items in dataset [{config['dataset']}]; check meta_args and meta_scenario_args"
        )
    getLogger().info(
        f"Episodes: {int(user_is_cold.sum())} cold users, {int(item_is_cold.sum())} cold items; tasks "
        + ", ".join(f"{name}={len(tasks)}" for name, tasks in episodes.items() if name != "warm_user_warm_item")
    )
    return episodes


class TaskDataLoader(AbstractDataLoader):
    """Batches of ``Task`` objects (``train_batch_size`` tasks per meta-batch)."""

    def __init__(self, config, dataset, tasks, shuffle=False):
        self.tasks = list(tasks)
        self.sample_size = len(self.tasks)
        # No DistributedSampler: in a multi-process run every rank walks the same seeded batches
        # and the trainer takes each rank's share (recbole_llm/distributed.py).
        with single_process_view(config):
            super().__init__(config, dataset, None, shuffle=shuffle)

    def _init_batch_size_and_step(self):
        batch_size = int(self.config["train_batch_size"])
        self.step = batch_size
        self.set_batch_size(batch_size)

    def collate_fn(self, index):
        return [self.tasks[i] for i in index]
