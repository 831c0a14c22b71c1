"""Resolution of models, trainers and datasets: the plugin's own first, RecBole's otherwise.

Plugin conventions (as in RecBole-GNN): model ``Foo`` is class ``Foo`` in
``recbole_llm/model/foo.py``. Its trainer is the first of ``<Name>Trainer`` in
``recbole_llm.trainer`` over the classes ``Foo`` derives from (``Foo``, then its parents, a
``Recommender`` suffix dropped), so a model that extends another trains like it (TALLRec with
``ALLMRecTrainer``, MeLU and MetaLLMRec with ``EpisodicTrainer``) without a file of its own; then
RecBole's trainer for the model. Datasets follow the same rule with ``<Name>Dataset`` in
``recbole_llm/data/dataset.py``, then the plugin's version of RecBole's class for the model type.
Model modules are imported by name only when asked for, so ``--model=BPR`` never pays for
importing transformers.
"""
import contextlib
import difflib
import importlib
import importlib.util
import pkgutil

import torch
from recbole.utils import ModelType
from recbole.utils import get_model as recbole_get_model
from recbole.utils import get_trainer as recbole_get_trainer

from recbole_llm.checkpoint import checkpoint_safe
from recbole_llm.data import dataset as plugin_datasets

MODEL_PACKAGE = "recbole_llm.model"
TRAINER_PACKAGE = "recbole_llm.trainer"


def plugin_model_names():
    """Names of the models this plugin defines (one module per model)."""
    names = []
    locations = importlib.util.find_spec(MODEL_PACKAGE).submodule_search_locations
    for module in pkgutil.iter_modules(locations):
        if module.name.startswith("_") or module.ispkg:
            continue
        mod = importlib.import_module(f"{MODEL_PACKAGE}.{module.name}")
        names += [
            name for name, obj in vars(mod).items()
            if isinstance(obj, type) and name.lower() == module.name
        ]
    return sorted(names)


@contextlib.contextmanager
def _anomaly_mode_kept():
    """Importing RecBole's sequential models (``recbole/model/sequential_recommender/sine.py``)
    switches autograd anomaly detection on for the whole process. It checks every gradient for
    NaN and records a Python stack per operation: a SASRec training step on ml-100k took 2.5x as
    long, and every plugin model's backward (ALLMRec's through the LLM) paid the same. RecBole's
    model packages are imported inside this context, which restores the caller's setting."""
    enabled = torch.is_anomaly_enabled()
    try:
        yield
    finally:
        torch.autograd.set_detect_anomaly(enabled)


def _recbole_model_names():
    names = []
    for sub in ("general_recommender", "sequential_recommender", "context_aware_recommender",
                "knowledge_aware_recommender"):
        with _anomaly_mode_kept():
            package = importlib.import_module(f"recbole.model.{sub}")
        names += [name for name in dir(package) if not name.startswith("_") and name[0].isupper()]
    return names


def _plugin_model(model_name):
    module_path = f"{MODEL_PACKAGE}.{model_name.lower()}"
    if importlib.util.find_spec(module_path) is None:
        return None
    return getattr(importlib.import_module(module_path), model_name, None)


def get_model(model_name):
    """Model class named ``model_name``: the plugin's if it has one, else RecBole's."""
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"model name must be a non-empty string, got {model_name!r}")
    plugin = _plugin_model(model_name)
    if plugin is not None:
        return plugin
    try:
        with _anomaly_mode_kept():
            return recbole_get_model(model_name)
    except (ValueError, ImportError):  # RecBole's search imports exlib models (xgboost, lightgbm)
        known = plugin_model_names() + _recbole_model_names()
        close = difflib.get_close_matches(model_name, known, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"Unknown model '{model_name}': it is neither a recbole_llm model "
            f"({', '.join(plugin_model_names())}) nor a RecBole model.{hint}"
        ) from None


def _by_lineage(model_class, namespace, suffix):
    """``namespace.<Name><suffix>`` for the first of ``model_class`` and its plugin parents that has one."""
    for cls in model_class.__mro__:
        if not cls.__module__.startswith(MODEL_PACKAGE):
            continue
        name = cls.__name__.removesuffix("Recommender") + suffix
        if hasattr(namespace, name):
            return getattr(namespace, name)
    return None


def get_trainer(model_type, model_name):
    """Trainer class for a model. Every trainer, RecBole's included, loads its checkpoints with
    ``weights_only=False`` (RecBole checkpoints pickle the Config; torch>=2.6 refuses them)."""
    model_class = _plugin_model(model_name)
    if model_class is not None:
        trainer = _by_lineage(model_class, importlib.import_module(TRAINER_PACKAGE), "Trainer")
        if trainer is not None:
            return checkpoint_safe(trainer)
    return checkpoint_safe(recbole_get_trainer(model_type, model_name))


def dataset_class(config):
    """The dataset class a run builds: the model's own (by lineage) or the plugin's version of
    RecBole's class for the model type."""
    model_class = _plugin_model(config["model"])
    specific = _by_lineage(model_class, plugin_datasets, "Dataset") if model_class is not None else None
    if specific is not None:
        return specific
    by_type = {
        ModelType.SEQUENTIAL: plugin_datasets.SequentialDataset,
        ModelType.KNOWLEDGE: plugin_datasets.KnowledgeBasedDataset,
    }
    return by_type.get(config["MODEL_TYPE"], plugin_datasets.Dataset)


def create_dataset(config):
    """Build (or reuse RecBole's pickled copy of) the dataset for ``config``.

    Same contract as ``recbole.data.create_dataset``, with the plugin's dataset classes, which
    add a working auto-download, the plugin's scenario splits and text side information.
    """
    cls = dataset_class(config)
    dataset = plugin_datasets.load_saved_dataset(config, cls)
    if dataset is None:
        dataset = cls(config)
        if config["save_dataset"]:
            dataset.save()
    return dataset


def data_preparation(config, dataset):
    """Split ``dataset`` into train/valid/test dataloaders (RecBole's ``data_preparation``), applying
    the plugin's scenario settings. Dataset classes that need their own loaders (episodic tasks)
    override ``prepare_dataloaders``."""
    return dataset.prepare_dataloaders(config)
