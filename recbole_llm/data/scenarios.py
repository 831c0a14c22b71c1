"""Cold-start and few-shot scenarios, shared by every model (RecBole's or ours).

A scenario changes what the model trains on and adds evaluation groups next to the overall test
result. All settings are ordinary config keys (off by default, see ``properties/overall.yaml``):

``eval_item_groups``  e.g. ``{cold: [0.0, 0.35], warm: [0.65, 1.0]}``: items ranked by their number
    of training interactions (ascending, ties by item id); an item whose rank quantile falls in
    ``[lo, hi]`` belongs to the group; test rows whose target is in the group are evaluated
    separately (A-LLMRec's cold/warm items are the bottom/top 35%).
``cold_user_args``  ``{inter_num: 3}``: users with exactly ``inter_num`` interactions are held out of
    training and validation and evaluated separately as group ``cold_users``. With ``ratio: r`` a
    seeded share ``r`` of the other users is turned into cold users by keeping only their first
    ``inter_num`` interactions (for datasets such as ml-100k that have no such users).
``few_shot_users``  ``K``: only K seeded-random users keep their training rows (A-LLMRec's K-shot).
``eval_max_users``  ``N``: each evaluation group (and the overall test) is evaluated on at most N
    seeded-random users (all of them when the group has fewer); for models whose scoring is slow
    (LLM rankers on CPU).
``cold_item_args``  ``{ratio: 0.2, by: time|random}``: that share of items becomes cold-start: every
    training interaction with them is removed, validation and test keep them; groups
    ``cold_start_items`` and ``warm_start_items`` are evaluated separately (ranked among all items),
    and with full ranking also ``cold_start_items@cold``: cold-start items ranked among the
    cold-start items only (every warm item scored -inf), the setting of cold-start papers. ``by: time`` picks the
    items whose first interaction is latest (new items), ``random`` a seeded random share.
    ``negatives: false`` keeps cold-start items out of the training negatives (models trained on
    sampled negatives only): otherwise being a sampled negative is all they ever see in training,
    which ranks them below every warm item.

Seeds come from ``scenario_seed`` (default: the run's ``seed``), so every model run with the same
settings sees the same split.
"""
from logging import getLogger

import numpy as np
import torch
from recbole.data.dataloader import FullSortEvalDataLoader


def seeded_rng(config, seed_key, *stream):
    """numpy Generator seeded by ``config[seed_key]`` (``~`` = the run's ``seed``); ``stream``
    numbers give independent generators for the separate draws of one split."""
    seed = config[seed_key] if config[seed_key] is not None else config["seed"]
    return np.random.default_rng([int(seed), *stream] if stream else seed)


def dict_setting(config, key, required=(), defaults=None):
    """The dict-valued setting ``key``, checked. Unset: None, or ``defaults`` when given. With
    ``defaults`` the value is merged over them and keys they do not name are refused."""
    given = config[key]
    if given is None and defaults is None:
        return None
    given = given or {}
    if not isinstance(given, dict):
        example = ", ".join(f"{name}: ..." for name in (required or sorted(defaults or {})[:2]))
        raise ValueError(f"{key} must be a dict such as {{{example}}}, got {given!r}")
    missing = [name for name in required if name not in given]
    if missing:
        raise ValueError(f"{key} is missing {missing}; got {given!r}")
    if defaults is None:
        return given
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"{key} has unknown key(s) {unknown}; known: {sorted(defaults)}")
    return {**defaults, **given}


def _rng(config):
    return seeded_rng(config, "scenario_seed")


def _eval_rows_per_user(config):
    """How many of each user's last interactions a leave-one-out split keeps for evaluation."""
    split = config["eval_args"]["split"]
    if "LS" not in split:
        return None
    return 2 if split["LS"] == "valid_and_test" else 1


# ----------------------------------------------------------------------------------------------
# before the split: edits on the raw interaction table (a pandas DataFrame)


def before_split(dataset):
    config = dataset.config
    dataset.eval_groups = {}
    dataset.cold_user_ids = _choose_cold_users(dataset)
    dataset.cold_start_item_ids = _choose_cold_start_items(dataset)
    if dataset.cold_start_item_ids is not None:
        _drop_cold_item_history(dataset, _eval_rows_per_user(config))


def _choose_cold_users(dataset):
    config = dataset.config
    args = dict_setting(config, "cold_user_args", ["inter_num"])
    if args is None:
        return None
    n = int(args["inter_num"])
    df = dataset.inter_feat
    uid, time = dataset.uid_field, dataset.time_field
    counts = df[uid].value_counts()
    natural = counts.index[counts == n].to_numpy()
    simulated = np.array([], dtype=natural.dtype)
    ratio = args.get("ratio")
    if ratio:
        others = np.sort(counts.index[counts > n].to_numpy())
        size = int(round(ratio * len(others)))
        simulated = _rng(config).choice(others, size=size, replace=False)
        order = [uid, time] if time in df else [uid]
        df = df.sort_values(order, kind="stable")
        rank = df.groupby(uid).cumcount()
        keep = ~df[uid].isin(simulated) | (rank < n)
        dataset.inter_feat = df[keep.to_numpy()].reset_index(drop=True)
    cold = np.concatenate([natural, simulated])
    if len(cold) == 0:
        raise ValueError(
            f"cold_user_args={args}: no user of dataset [{config['dataset']}] has exactly {n} "
            f"interactions after filtering; add ratio: <share> to simulate cold users"
        )
    getLogger().info(
        f"Cold users: {len(natural)} with exactly {n} interactions + {len(simulated)} truncated to "
        f"their first {n}; held out of training and evaluated as group [cold_users]."
    )
    return set(cold.tolist())


def _choose_cold_start_items(dataset):
    config = dataset.config
    args = dict_setting(config, "cold_item_args", ["ratio"])
    if args is None:
        return None
    df = dataset.inter_feat
    iid, time = dataset.iid_field, dataset.time_field
    items = np.sort(df[iid].unique())
    size = int(round(float(args["ratio"]) * len(items)))
    by = args.get("by", "time")
    if by == "time":
        if time not in df:
            raise ValueError(f"cold_item_args.by=time needs the time field [{time}] in the .inter file")
        first_seen = df.groupby(iid)[time].min().loc[items].to_numpy()
        order = np.lexsort((items, first_seen))  # latest first interaction = newest items
        cold = items[order[len(items) - size:]]
    elif by == "random":
        cold = _rng(config).choice(items, size=size, replace=False)
    else:
        raise ValueError(f"cold_item_args.by must be 'time' or 'random', got {by!r}")
    getLogger().info(f"Cold-start items: {len(cold)} of {len(items)} ({by}); no training interactions.")
    return set(cold.tolist())


def keep_cold_items_out_of_negatives(config, dataset, train_loader):
    """With ``cold_item_args: {..., negatives: false}``, add the cold-start items to every user's
    used items in the training sampler, whose rejection sampling then never draws them."""
    args = dict_setting(config, "cold_item_args", ["ratio"])
    if args is None or args.get("negatives", True):
        return
    sampler = getattr(train_loader, "_sampler", None)
    if sampler is None or getattr(sampler, "phase", None) != "train":
        raise ValueError(f"cold_item_args.negatives: false needs sampled training negatives "
                         f"(train_neg_sample_args); model {config['model']} trains without them")
    cold = dataset.cold_start_item_ids
    for used in sampler.used_ids:  # the training phase's own sets; evaluation masks are untouched
        used.update(cold)
    getLogger().info(f"Cold-start items: {len(cold)} kept out of the training negatives.")


def _drop_cold_item_history(dataset, eval_rows):
    """Interactions with cold-start items leave the data unless they are evaluation rows.

    With a leave-one-out split the evaluation rows are each user's last ``eval_rows`` interactions,
    so sequences seen in training never contain a cold-start item. Other splits are handled after
    the split (training rows with a cold-start target are dropped).
    """
    if eval_rows is None:
        return
    df = dataset.inter_feat
    uid, iid, time = dataset.uid_field, dataset.iid_field, dataset.time_field
    df = df.sort_values([uid, time] if time in df else [uid], kind="stable")
    rank_from_end = df.groupby(uid).cumcount(ascending=False)
    keep = ~df[iid].isin(dataset.cold_start_item_ids) | (rank_from_end < eval_rows)
    dataset.inter_feat = df[keep.to_numpy()].reset_index(drop=True)


# ----------------------------------------------------------------------------------------------
# after the split: edits on the built RecBole datasets (Interaction-backed)


def after_split(dataset, built):
    config = dataset.config
    train, valid, test = built
    uid, iid = dataset.uid_field, dataset.iid_field

    if dataset.cold_user_ids is not None:
        cold_users = _id_mask(dataset, uid, dataset.cold_user_ids)
        train = _keep_rows(train, ~cold_users[train.inter_feat[uid]])
        valid = _keep_rows(valid, ~cold_users[valid.inter_feat[uid]])
        dataset.eval_groups["cold_users"] = ("user", cold_users)

    if dataset.cold_start_item_ids is not None:
        cold_items = _id_mask(dataset, iid, dataset.cold_start_item_ids)
        train = _keep_rows(train, ~cold_items[train.inter_feat[iid]])
        dataset.eval_groups["cold_start_items"] = ("item", cold_items)
        warm = ~cold_items
        warm[0] = False
        dataset.eval_groups["warm_start_items"] = ("item", warm)

    if config["few_shot_users"]:
        k = int(config["few_shot_users"])
        users = np.unique(train.inter_feat[uid].numpy())
        if k > len(users):
            raise ValueError(f"few_shot_users={k} but only {len(users)} users have training rows")
        chosen = torch.zeros(dataset.user_num, dtype=torch.bool)
        chosen[torch.from_numpy(_rng(config).choice(users, size=k, replace=False))] = True
        train = _keep_rows(train, chosen[train.inter_feat[uid]])
        getLogger().info(f"Few-shot: training rows of {k} users kept ({len(train)} rows).")

    if config["eval_item_groups"]:
        counts = torch.bincount(train.inter_feat[iid], minlength=dataset.item_num)
        for name, bounds in _popularity_groups(counts, config["eval_item_groups"]).items():
            dataset.eval_groups[name] = ("item", bounds)

    if len(train) == 0:
        raise ValueError("the scenario settings left no training rows")
    return [train, valid, test]


def _popularity_groups(counts, spec):
    """Item masks for quantile ranges of the training-count ranking (item 0 = padding excluded)."""
    if not isinstance(spec, dict):
        raise ValueError(f"eval_item_groups must map group names to [lo, hi] quantiles, got {spec!r}")
    item_ids = torch.arange(1, len(counts))
    order = np.lexsort((item_ids.numpy(), counts[1:].numpy()))  # ascending count, ties by id
    quantile = torch.empty(len(item_ids), dtype=torch.float64)
    quantile[torch.from_numpy(order)] = torch.arange(len(item_ids), dtype=torch.float64) / max(len(item_ids) - 1, 1)
    groups = {}
    for name, bounds in spec.items():
        if not (isinstance(bounds, (list, tuple)) and len(bounds) == 2 and 0 <= bounds[0] <= bounds[1] <= 1):
            raise ValueError(f"eval_item_groups[{name!r}] must be [lo, hi] with 0 <= lo <= hi <= 1, got {bounds!r}")
        mask = torch.zeros(len(counts), dtype=torch.bool)
        mask[1:] = (quantile >= bounds[0]) & (quantile <= bounds[1])
        groups[name] = mask
    return groups


def _id_mask(dataset, field, internal_ids):
    """Boolean mask over the internal ids of ``field`` (user or item)."""
    size = dataset.user_num if field == dataset.uid_field else dataset.item_num
    mask = torch.zeros(size, dtype=torch.bool)
    mask[torch.as_tensor(sorted(internal_ids), dtype=torch.long)] = True
    return mask


def _keep_rows(built_dataset, mask):
    return built_dataset.copy(built_dataset.inter_feat[mask])


# ----------------------------------------------------------------------------------------------
# evaluation groups


def group_loaders(config, dataset, test_loader):
    """``{group name: dataloader}`` over the test rows of each evaluation group.

    Each loader is the test loader's class over the group's rows, with the same sampler, so
    the candidate protocol (full ranking or sampled negatives) is the one of the overall result.
    Cold users are removed from the overall test loader's rows, which is also returned.
    """
    groups = getattr(dataset, "eval_groups", None) or {}
    test_data = test_loader._dataset
    uid, iid = dataset.uid_field, dataset.iid_field
    loaders = {}
    for name, (kind, mask) in groups.items():
        column = test_data.inter_feat[uid if kind == "user" else iid]
        rows = mask[column]
        if rows.any():
            loaders[name] = _rebuild_loader(config, test_loader, rows)
        else:
            getLogger().warning(f"Evaluation group [{name}] has no test rows; skipped.")
        if name == "cold_start_items" and rows.any():
            if isinstance(test_loader, FullSortEvalDataLoader):
                loaders[f"{name}@cold"] = CandidateMaskedLoader(
                    config, test_data.copy(test_data.inter_feat[rows]), test_loader._sampler, excluded=~mask)
            else:
                getLogger().warning("Group [cold_start_items@cold] needs full ranking (eval mode full); skipped.")
    if "cold_users" in groups:
        cold = groups["cold_users"][1][test_data.inter_feat[uid]]
        test_loader = _rebuild_loader(config, test_loader, ~cold)
    test_loader = limit_users(config, test_loader)
    return test_loader, {name: limit_users(config, loader) for name, loader in loaders.items()}


def limit_users(config, loader, limit=None):
    """``loader`` restricted to ``limit`` (default ``eval_max_users``) seeded-random users
    (unchanged if it has fewer)."""
    limit = limit or config["eval_max_users"]
    if not limit:
        return loader
    users = loader._dataset.inter_feat[loader._dataset.uid_field]
    unique = np.unique(users.numpy())
    if len(unique) <= int(limit):
        return loader
    chosen = np.sort(_rng(config).choice(unique, size=int(limit), replace=False))
    return _rebuild_loader(config, loader, torch.from_numpy(np.isin(users.numpy(), chosen)))


class CandidateMaskedLoader(FullSortEvalDataLoader):
    """Full ranking among a subset of the items: the ``excluded`` ones (bool mask over item ids)
    are added to every user's masked history, so their scores are -inf for any model."""

    def __init__(self, config, dataset, sampler, excluded, shuffle=False):
        self.excluded_items = torch.nonzero(excluded, as_tuple=False).squeeze(1)
        super().__init__(config, dataset, sampler, shuffle=shuffle)

    def collate_fn(self, index):
        interaction, history, positive_u, positive_i = super().collate_fn(index)
        n_rows, n_excluded = len(interaction), len(self.excluded_items)
        rows = torch.arange(n_rows).repeat_interleave(n_excluded)
        items = self.excluded_items.repeat(n_rows)
        if history is not None:
            rows, items = torch.cat([history[0], rows]), torch.cat([history[1], items])
        return interaction, (rows, items), positive_u, positive_i


def _rebuild_loader(config, loader, rows):
    subset = loader._dataset.copy(loader._dataset.inter_feat[rows])
    return type(loader)(config, subset, loader._sampler, shuffle=False)
