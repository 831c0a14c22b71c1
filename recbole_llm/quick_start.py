"""Run, tune and reload models through the plugin (RecBole's quick start, plugin-aware).

This module orchestrates; models compute, datasets own their data and texts. A run is:
``resolve_prerequisites`` (train what the model stacks on, e.g. ALLMRec's backbone, and pass its
checkpoint path on, RecBole's S3Rec ``pre_model_path`` pattern) -> ``prepare`` (dataset and
loaders) -> ``build_model`` -> the trainer -> ``evaluation_loaders`` (overall test and groups) ->
RecBole's evaluator. ``run_recbole_llm`` and ``objective_function`` run all of it;
benchmarks compose the same public steps.

RecBole's own ``recbole.quick_start`` resolves models by name inside RecBole only, imports ray and
profiles FLOPs; none of that is used here.
"""
import logging
import math
import os
import re
import sys
import tempfile
import time
from logging import getLogger

import torch
from recbole.data.dataloader import FullSortEvalDataLoader, TrainDataLoader
from recbole.utils import init_logger, init_seed, set_color
from recbole.utils.utils import dict2str

from recbole_llm.checkpoint import checkpoint_safe, load_checkpoint, load_into_model
from recbole_llm.config import Config
from recbole_llm.data import scenarios
from recbole_llm.data.dataset import EpisodicDataset
from recbole_llm.distributed import main_process_first, sharing_work, spawn
from recbole_llm.fast_kernels import use_fast_kernels
from recbole_llm.llm.models import set_threads
from recbole_llm.trainer import RatingBaselineTrainer
from recbole_llm.utils import create_dataset, data_preparation, get_model, get_trainer


def resolve_prerequisites(config):
    """Train the runs the configured model stacks on and set their checkpoint paths in ``config``.

    A model class lists them in ``prerequisites(config)`` as ``{config key: {"model",
    "config_dict", "path"}}`` (ALLMRec: its backbone when ``backbone_checkpoint`` is unset).
    """
    model_class = get_model(config["model"])
    needed = getattr(model_class, "prerequisites", None)
    for key, run in (needed(config) if needed else {}).items():
        config[key] = pretrain(run["model"], config["dataset"], run["config_dict"], run["path"])


def pretrain(model, dataset, config_dict, path):
    """``path``, holding the best checkpoint of ``model`` trained on ``dataset`` with ``config_dict``.

    Reused when it exists. Otherwise trained now (its own Config, blind to this process's command
    line); best epochs are written under a temporary name that becomes ``path`` only when training
    ends, so a killed run never leaves a half-trained checkpoint that the next run would reuse.
    """
    logger = getLogger()
    if os.path.isfile(path):
        logger.info(f"Prerequisite {model}: reusing {path}")
        return path
    config = Config(model=model, dataset=dataset, config_dict=config_dict, command_line=False)
    logger.info(f"Prerequisite {model}: training on [{dataset}] (published as {path})")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    _, train_data, valid_data, _ = prepare(config)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, build_model(config, train_data))
    trainer.saved_model_file = path + ".training"
    began = time.time()
    trainer.fit(train_data, valid_data, saved=True, show_progress=config["show_progress"])
    os.replace(trainer.saved_model_file, path)
    logger.info(f"Prerequisite {model} time: {time.time() - began:.1f}s ({config['epochs']} epochs)")
    return path


def check_output_dirs(config, keys=("checkpoint_dir", "cache_dir")):
    """Create the folders a run writes to and fail now, naming the key, if one cannot be written
    (rather than after hours of training, when the first checkpoint or cache entry is saved)."""
    for key in keys:
        folder = config[key]
        if not folder:
            continue
        try:
            os.makedirs(folder, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
                pass
        except OSError as error:
            raise PermissionError(f"{key}={folder!r} is not a writable folder ({type(error).__name__}: "
                                  f"{error.strerror or error}); pass --{key}=<a writable folder>") from None


def prepare(config):
    """``(dataset, train_data, valid_data, test_data)`` of a run, its prerequisites trained first."""
    check_output_dirs(config)
    resolve_prerequisites(config)
    init_seed(config["seed"], config["reproducibility"])
    set_threads(config["torch_threads"])
    dataset = create_dataset(config)
    getLogger().info(dataset)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    return dataset, train_data, valid_data, test_data


def build_model(config, train_data):
    """The configured model, freshly initialised (seeded) for ``train_data``'s dataset."""
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    return instantiate(config, train_data._dataset)


def instantiate(config, dataset):
    """``config["model"]`` built for ``dataset`` on the config's device, with the faster kernels in
    RecBole's layers unless ``fast_kernels`` is off (``recbole_llm.fast_kernels``)."""
    model = get_model(config["model"])(config, dataset).to(config["device"])
    if config["fast_kernels"]:
        use_fast_kernels(model)
    return model


def load_model(model_file, dataset):
    """The model of a saved checkpoint, rebuilt from the checkpoint's own config for ``dataset``, on
    ``dataset``'s run's device (a checkpoint trained on a GPU loads on a CPU machine and back)."""
    checkpoint = load_checkpoint(model_file)
    config = checkpoint["config"]
    config["device"] = dataset.config["device"]
    return load_into_model(instantiate(config, dataset), checkpoint)


def evaluation_loaders(config, dataset, test_data):
    """``(overall test loader, {group name: loader})``: the scenario groups (cold users, item
    popularity groups, cold-start items) or a dataset's own groups (episodic scenarios)."""
    own = getattr(dataset, "evaluation_loaders", None)
    if own is not None:
        return own(config, test_data)
    return scenarios.group_loaders(config, dataset, test_data)


def evaluate_seeded(trainer, loader, load_best_model=False, show_progress=False):
    """``trainer.evaluate`` with the global seed reset first: RecBole's sampled evaluation draws
    its negatives from the global RNG, so every model (and every control) evaluated on a loader
    sees the same candidates, whatever ran before."""
    init_seed(trainer.config["seed"], trainer.config["reproducibility"])
    return trainer.evaluate(loader, load_best_model=load_best_model, show_progress=show_progress)


def evaluate_groups(trainer, loaders):
    """``{group name: result}`` of the trained model on each loader (weights as they are)."""
    return {name: evaluate_seeded(trainer, loader) for name, loader in loaders.items()}


def group_users(loaders):
    """``{group name: number of users}`` of each loader: the n of an interval on the group's mean."""
    return {name: len(torch.unique(loader._dataset.inter_feat[loader._dataset.uid_field]))
            for name, loader in loaders.items()}


def popularity_trainer(config, train_data):
    """A trainer holding RecBole's ``Pop`` fitted on ``train_data``, ties broken at random.

    Pop's scores are counts, so many candidates tie, and RecBole's sampled evaluation would order
    them by row (the positive is each user's first row): a seeded uniform jitter below one count
    breaks the ties at random instead.
    """
    pop = get_model("Pop")(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(pop.type, "Pop")(config, pop)
    trainer.fit(train_data, None, saved=False, show_progress=False)
    generator = torch.Generator().manual_seed(int(config["seed"]))
    with torch.no_grad():
        jitter = 0.5 * torch.rand(pop.item_cnt.shape, generator=generator).to(pop.item_cnt.device)
        pop.item_cnt = pop.item_cnt.float() + jitter
        pop.max_cnt = pop.item_cnt.max(dim=0)[0]
    return trainer


def control_trainers(config, train_data):
    """``{name: trainer}`` of the ``eval_controls``: ``Pop`` (``popularity_trainer``) and
    ``backbone`` (the frozen model of ``backbone_checkpoint``, e.g. ALLMRec's SASRec)."""
    controls = {}
    for name in config["eval_controls"] or []:
        if name == "Pop":
            controls[name] = popularity_trainer(config, train_data)
        elif name == "backbone":
            if not config["backbone_checkpoint"]:  # e.g. ALLMRec without soft tokens (LLM-only), TALLRec
                getLogger().warning("eval_controls: no backbone_checkpoint in this run; control 'backbone' skipped")
                continue
            model = load_model(config["backbone_checkpoint"], train_data._dataset).eval()
            controls[name] = get_trainer(model.type, type(model).__name__)(config, model)
        else:
            raise ValueError(f"eval_controls: unknown control {name!r}; known: 'Pop', 'backbone'")
    return controls


def chance_result(config, metrics):
    """Expected metrics of a random ranking under sampled evaluation (``uniN``/``popN``: one
    positive among N + 1 candidates), for the metrics that have one (Hit, NDCG, MRR); ``None``
    under full ranking."""
    mode = config["eval_args"]["mode"]
    mode = mode.get("test") if isinstance(mode, dict) else mode
    match = re.fullmatch(r"(?:uni|pop)(\d+)", str(mode))
    if not match:
        return None
    n = int(match.group(1)) + 1
    out = {}
    for metric in metrics:
        name, _, k = metric.partition("@")
        ranks = range(1, min(int(k), n) + 1)
        if name == "hit":
            out[metric] = len(ranks) / n
        elif name == "ndcg":
            out[metric] = sum(1 / math.log2(r + 1) for r in ranks) / n
        elif name == "mrr":
            out[metric] = sum(1 / r for r in ranks) / n
    return out


def full_sort_chance(loader, metrics):
    """Expected metrics of a uniformly random ranking under full ranking, averaged over the users
    of ``loader`` as RecBole averages them: each user's candidates are the items the loader does
    not mask (history, padding item, items excluded by a ``CandidateMaskedLoader``), and their
    positives are the user's rows. Exact for Recall, Precision, Hit, NDCG and MRR (by linearity
    over ranks); other metrics are left out. In a multi-process run RecBole's loader holds this
    rank's share of the users, and the chance is theirs."""
    item_num = loader._dataset.item_num
    per_user = {metric: [] for metric in metrics}
    for _, history, positive_u, positive_i in loader:
        n_rows = int(positive_u.max()) + 1
        masked = torch.zeros(n_rows, item_num, dtype=torch.bool)
        if history is not None:
            masked[history[0], history[1]] = True
        masked[:, 0] = True
        masked[positive_u, positive_i] = False
        candidates = (item_num - masked.sum(1)).double()  # N: items a random ranking orders
        positives = torch.bincount(positive_u, minlength=n_rows).double()  # P
        for metric in metrics:
            name, _, k = metric.partition("@")
            value = _random_ranking_metric(name, int(k), candidates, positives)
            if value is not None:
                per_user[metric].append(value)
    return {metric: float(torch.cat(values).mean()) for metric, values in per_user.items() if values}


def _random_ranking_metric(name, k, n, p):
    """Per-user expectation of ``name@k`` when ``p`` positives lie uniformly among ``n`` candidates."""
    ranks = torch.arange(1, k + 1, dtype=torch.double)
    shown = torch.minimum(torch.full_like(n, k), n)  # a user with fewer than k candidates shows all
    if name == "recall":
        return shown / n
    if name == "precision":
        return p * shown / n / k
    discount = 1 / torch.log2(ranks + 1)
    in_list = ranks[None, :] <= n[:, None]
    if name == "ndcg":  # E[DCG] = sum over ranks of P(positive at r) / log2(r + 1); IDCG is fixed
        ideal = torch.stack([discount[:int(min(q, k))].sum() for q in p.tolist()])
        return (p / n) * (discount[None, :] * in_list).sum(1) / ideal
    # P(no positive in the first r - 1 ranks), then P(first positive at rank r)
    misses = ((n[:, None] - p[:, None] - ranks[None, :] + 1) / (n[:, None] - ranks[None, :] + 1)).clamp(min=0)
    none_before = torch.cumprod(torch.cat([torch.ones_like(n)[:, None], misses[:, :-1]], 1), 1)
    first_at = none_before * (p[:, None] / (n[:, None] - ranks[None, :] + 1)).clamp(max=1) * in_list
    if name == "hit":
        return first_at.sum(1)
    if name == "mrr":
        return (first_at / ranks[None, :]).sum(1)
    return None


def train_and_test(config, saved=True, verbose=True):
    """Train the configured model, test it overall and per group: ``(trainer, result dict)``."""
    logger = getLogger()
    with main_process_first(config):  # rank 0 trains the prerequisites; the others then reuse them
        check_output_dirs(config)
        resolve_prerequisites(config)
    with sharing_work(config):  # text embeddings and judgements: each rank computes a share
        dataset, train_data, valid_data, test_data = prepare(config)
        model = build_model(config, train_data)
    logger.info(model)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, verbose=verbose, saved=saved, show_progress=config["show_progress"] and verbose
    )
    test_data, groups = evaluation_loaders(config, dataset, test_data)
    test_result = evaluate_seeded(trainer, test_data, load_best_model=saved,
                                  show_progress=config["show_progress"] and verbose)
    result = {
        "model": config["model"],
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
        "group_results": evaluate_groups(trainer, groups),
        "group_users": group_users(groups),
    }
    if getattr(trainer, "stage_times", None):  # ALLMRec's training seconds per stage
        result["stage_seconds"] = {stage: round(seconds, 2) for stage, seconds in trainer.stage_times.items()}
    if getattr(trainer, "learning_curve", None):  # ALLMRec's validation metrics along stage 2
        result["learning_curve"] = trainer.learning_curve
    controls = control_trainers(config, train_data)
    if controls:  # the simplest explanations of the number, on the same users and candidates
        result["control_results"] = {
            name: {"test": evaluate_seeded(control, test_data), **evaluate_groups(control, groups)}
            for name, control in controls.items()}
    chance = chance_result(config, test_result)
    if chance is None and isinstance(test_data, FullSortEvalDataLoader):
        chance = full_sort_chance(test_data, test_result)
        result["group_chance"] = {name: full_sort_chance(loader, test_result) for name, loader in groups.items()
                                  if isinstance(loader, FullSortEvalDataLoader)}
    if chance:
        result["chance_result"] = chance
    if groups and config["eval_valid_groups"] and not hasattr(dataset, "evaluation_loaders"):
        # The same groups on the validation rows, so settings can be chosen per group without
        # looking at test numbers.
        result["valid_group_results"] = evaluate_groups(trainer, scenarios.group_loaders(config, dataset, valid_data)[1])
    report = getattr(model, "extra_results", None)
    if report is not None:  # model-specific figures (e.g. AugBPR's judge quality and timing)
        with sharing_work(config):
            result["extra_results"] = report(train_data, valid_data, test_data)
    return trainer, result


def format_results(result):
    """A plain-text table: one row for the overall test result, one per evaluation group, then
    the same rows of each control (``eval_controls``) and the chance level."""
    rows = {"test": result["test_result"], **result.get("group_results", {})}
    for control, results in result.get("control_results", {}).items():
        rows.update({f"{control}: {name}": values for name, values in results.items()})
    if result.get("chance_result"):
        rows["chance"] = result["chance_result"]
    rows.update({f"chance: {name}": values for name, values in result.get("group_chance", {}).items()})
    metrics = list(result["test_result"])
    width = max(len(name) for name in rows)
    cols = [max(10, len(m)) for m in metrics]
    lines = [" " * width + "  " + "  ".join(f"{m:>{c}}" for m, c in zip(metrics, cols))]
    for name, values in rows.items():
        cells = [f"{values[m]:>{c}.4f}" if m in values else f"{'-':>{c}}" for m, c in zip(metrics, cols)]
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def run_recbole_llm(model=None, dataset=None, config_file_list=None, config_dict=None, saved=True,
                    nproc=1, world_size=-1, ip="localhost", port=None, group_offset=0):
    """Train and test one model on one dataset, as ``recbole.quick_start.run_recbole`` does.

    Args:
        model (str or class): a recbole_llm model (ALLMRec, AugBPR, MetaLLMRec, MeLU) or any RecBole model.
        dataset (str): dataset name; its atomic files are under ``data_path`` or shipped with the plugin.
        config_file_list (list of str): yaml files, applied over the plugin's properties.
        config_dict (dict): parameters applied over the files; ``--key=value`` arguments win over both.
        saved (bool): keep the best checkpoint and test it (True) or test the final weights.
        nproc, world_size, ip, port, group_offset: RecBole's multi-process arguments; ``nproc`` > 1
            trains in that many processes on this machine (gloo on the CPU, NCCL on GPUs;
            ``recbole_llm/distributed.py``) and returns rank 0's result.

    Returns:
        dict with ``best_valid_score``, ``valid_score_bigger``, ``best_valid_result``,
        ``test_result`` and ``group_results`` (one result per evaluation group / scenario).
    """
    if nproc > 1 or world_size > 0:
        run = {"model": model, "dataset": dataset, "config_file_list": config_file_list,
               "config_dict": config_dict, "saved": saved}
        return spawn(run_recbole_llm, nproc, run, world_size, ip, port, group_offset)
    config = Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    # RecBole's init_logger checks, then creates ./log/<model>: ranks starting together race on it
    os.makedirs(os.path.join("log", str(config["model"])), exist_ok=True)
    init_logger(config)
    logger = getLogger()
    logger.info(sys.argv)
    logger.info(config)
    _, result = train_and_test(config, saved=saved, verbose=True)
    logger.info(set_color("best valid ", "yellow") + f": {dict2str(result['best_valid_result'])}")
    logger.info(set_color("test result", "yellow") + f": {dict2str(result['test_result'])}")
    for name, values in result["group_results"].items():
        logger.info(set_color(f"test [{name}]", "yellow") + f": {dict2str(values)}")
    for control, results in result.get("control_results", {}).items():
        for name, values in results.items():
            logger.info(set_color(f"control {control} [{name}]", "yellow") + f": {dict2str(values)}")
    for name, values in result.get("extra_results", {}).items():
        logger.info(set_color(name, "yellow") + f": {values}")
    logger.info("\n" + format_results(result))
    return result


def objective_function(config_dict=None, config_file_list=None, saved=True, command_line=True):
    """One trial for RecBole's ``HyperTuning``: train, validate, test, quietly.

    Returns the five keys ``HyperTuning.trial`` reads (``model``, ``best_valid_score``,
    ``valid_score_bigger``, ``best_valid_result``, ``test_result``) plus ``group_results``.
    With ``saved`` the best-validation checkpoint is tested and then deleted, so a search leaves
    no checkpoint per trial behind. ``command_line=False``: ``--key=value`` arguments of the
    calling program are not read (a benchmark's own flags).
    """
    config = Config(config_dict=config_dict, config_file_list=config_file_list, command_line=command_line)
    init_seed(config["seed"], config["reproducibility"])
    logging.basicConfig(level=logging.ERROR)
    trainer, result = train_and_test(config, saved=saved, verbose=False)
    if saved and os.path.exists(trainer.saved_model_file):
        os.remove(trainer.saved_model_file)
    return result


def load_data_and_model(model_file):
    """Config, model (with the checkpoint's weights), dataset and dataloaders of a saved run.

    Returns:
        tuple: ``(config, model, dataset, train_data, valid_data, test_data)``
    """
    checkpoint = load_checkpoint(model_file)
    config = checkpoint["config"]
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    dataset, train_data, valid_data, test_data = prepare(config)
    model = load_into_model(build_model(config, train_data), checkpoint)
    return config, model, dataset, train_data, valid_data, test_data


def run_rating_baseline(model="WideDeep", dataset="ml-100k", config_dict=None, config_file_list=None,
                        include_support=True, saved=True, command_line=True):
    """Train a RecBole rating model (default WideDeep) on the episodic split and evaluate it on
    the same validation, test and scenario tasks as MetaLLMRec / MeLU (no local adaptation).

    ``include_support``: the model is trained on the support sets of the evaluation tasks too
    (see ``EpisodicDataset.rating_baseline_data``). Returns the ``objective_function`` dict.
    """
    defaults = {"normalize_all": False, "normalize_field": None, "metrics": ["MAE"], "valid_metric": "MAE",
                "train_neg_sample_args": None, "meta_ndcg_k": 3, "threshold": None,
                "eval_args": {"split": {"RS": [0.8, 0.1, 0.1]}, "order": "RO", "group_by": None, "mode": "labeled"}}
    config = Config(model=model, dataset=dataset, config_file_list=config_file_list,
                    config_dict={**defaults, **(config_dict or {})}, command_line=command_line)
    init_seed(config["seed"], config["reproducibility"])
    set_threads(config["torch_threads"])
    data = EpisodicDataset(config)
    _, valid, test = data.prepare_dataloaders(config)
    train_data = data.rating_baseline_data(include_support)
    train = TrainDataLoader(config, train_data, None, shuffle=True)
    init_seed(config["seed"], config["reproducibility"])
    model_obj = instantiate(config, train_data)
    trainer = checkpoint_safe(RatingBaselineTrainer)(config, model_obj, data, data.rating_range())
    best_score, best_result = trainer.fit(train, valid, verbose=False, saved=saved)
    test, groups = data.evaluation_loaders(config, test)
    result = {
        "model": config["model"], "best_valid_score": best_score, "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_result, "test_result": trainer.evaluate(test, load_best_model=saved),
        "group_results": evaluate_groups(trainer, groups),
        "group_users": group_users(groups),
    }
    if saved and os.path.exists(trainer.saved_model_file):
        os.remove(trainer.saved_model_file)
    return result
