"""Run, tune and reload models through the plugin (RecBole's quick start, plugin-aware).

RecBole's own ``recbole.quick_start`` resolves models by name inside RecBole only, imports ray and
profiles FLOPs; none of that is used here.
"""
import logging
import os
import sys
from logging import getLogger

from recbole.utils import init_logger, init_seed, set_color
from recbole.utils.utils import dict2str

from recbole_llm.config import Config
from recbole_llm.data import scenarios
from recbole_llm.llm.models import set_threads
from recbole_llm.trainer.checkpoint import load_checkpoint
from recbole_llm.utils import create_dataset, data_preparation, get_model, get_trainer


def _prepare(config):
    init_seed(config["seed"], config["reproducibility"])
    set_threads(config["torch_threads"])
    dataset = create_dataset(config)
    getLogger().info(dataset)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    return dataset, train_data, valid_data, test_data


def _build_model(config, train_data):
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
    return model


def _evaluation_loaders(config, dataset, test_data):
    hook = getattr(dataset, "evaluation_loaders", None)
    if hook is not None:
        return hook(config, test_data)
    return scenarios.group_loaders(config, dataset, test_data)


def _train_and_test(config, saved, verbose):
    logger = getLogger()
    dataset, train_data, valid_data, test_data = _prepare(config)
    model = _build_model(config, train_data)
    logger.info(model)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, verbose=verbose, saved=saved, show_progress=config["show_progress"] and verbose
    )
    test_data, groups = _evaluation_loaders(config, dataset, test_data)
    test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=config["show_progress"] and verbose)
    group_results = _evaluate_groups(trainer, groups)
    result = {
        "model": config["model"],
        "best_valid_score": best_valid_score,
        "valid_score_bigger": config["valid_metric_bigger"],
        "best_valid_result": best_valid_result,
        "test_result": test_result,
        "group_results": group_results,
    }
    if groups and config["eval_valid_groups"] and not hasattr(dataset, "evaluation_loaders"):
        # The same groups on the validation rows, so settings can be chosen per group without
        # looking at test numbers.
        result["valid_group_results"] = _evaluate_groups(trainer, scenarios.group_loaders(config, dataset, valid_data)[1])
    report = getattr(model, "extra_results", None)
    if report is not None:  # model-specific figures (e.g. AugBPR's judge quality and timing)
        result["extra_results"] = report(train_data, valid_data, test_data)
    return trainer, result


def _evaluate_groups(trainer, loaders):
    return {name: trainer.evaluate(loader, load_best_model=False, show_progress=False)
            for name, loader in loaders.items()}


def format_results(result):
    """A plain-text table: one row for the overall test result, one per evaluation group."""
    rows = {"test": result["test_result"], **result.get("group_results", {})}
    metrics = list(result["test_result"])
    width = max(len(name) for name in rows)
    cols = [max(10, len(m)) for m in metrics]
    lines = [" " * width + "  " + "  ".join(f"{m:>{c}}" for m, c in zip(metrics, cols))]
    for name, values in rows.items():
        cells = [f"{values[m]:>{c}.4f}" if m in values else f"{'-':>{c}}" for m, c in zip(metrics, cols)]
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def run_recbole_llm(model=None, dataset=None, config_file_list=None, config_dict=None, saved=True):
    """Train and test one model on one dataset, as ``recbole.quick_start.run_recbole`` does.

    Args:
        model (str or class): a recbole_llm model (ALLMRec, AugBPR, MetaLLMRec, MeLU) or any RecBole model.
        dataset (str): dataset name; its atomic files are under ``data_path`` or shipped with the plugin.
        config_file_list (list of str): yaml files, applied over the plugin's properties.
        config_dict (dict): parameters applied over the files; ``--key=value`` arguments win over both.
        saved (bool): keep the best checkpoint and test it (True) or test the final weights.

    Returns:
        dict with ``best_valid_score``, ``valid_score_bigger``, ``best_valid_result``,
        ``test_result`` and ``group_results`` (one result per evaluation group / scenario).
    """
    config = Config(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    logger = getLogger()
    logger.info(sys.argv)
    logger.info(config)
    _, result = _train_and_test(config, saved=saved, verbose=True)
    logger.info(set_color("best valid ", "yellow") + f": {dict2str(result['best_valid_result'])}")
    logger.info(set_color("test result", "yellow") + f": {dict2str(result['test_result'])}")
    for name, values in result["group_results"].items():
        logger.info(set_color(f"test [{name}]", "yellow") + f": {dict2str(values)}")
    for name, values in result.get("extra_results", {}).items():
        logger.info(set_color(name, "yellow") + f": {values}")
    logger.info("\n" + format_results(result))
    return result


def objective_function(config_dict=None, config_file_list=None, saved=True):
    """One trial for RecBole's ``HyperTuning``: train, validate, test, quietly.

    Returns the five keys ``HyperTuning.trial`` reads (``model``, ``best_valid_score``,
    ``valid_score_bigger``, ``best_valid_result``, ``test_result``) plus ``group_results``.
    With ``saved`` the best-validation checkpoint is tested and then deleted, so a search leaves
    no checkpoint per trial behind.
    """
    config = Config(config_dict=config_dict, config_file_list=config_file_list)
    init_seed(config["seed"], config["reproducibility"])
    logging.basicConfig(level=logging.ERROR)
    trainer, result = _train_and_test(config, saved=saved, verbose=False)
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
    dataset, train_data, valid_data, test_data = _prepare(config)
    model = _build_model(config, train_data)
    model.load_state_dict(checkpoint["state_dict"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    return config, model, dataset, train_data, valid_data, test_data
