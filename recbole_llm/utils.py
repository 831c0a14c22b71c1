"""Resolution of models, trainers and datasets: the plugin's own first, RecBole's otherwise.

Plugin conventions (as in RecBole-GNN): model ``Foo`` is class ``Foo`` in
``recbole_llm/model/foo.py``; its trainer, if it needs one, is ``FooTrainer`` in
``recbole_llm/trainer/foo.py``; its dataset, if it needs one, is ``FooDataset`` in
``recbole_llm/data/dataset.py``. Modules are imported only when asked for, so ``--model=BPR`` never
pays for importing transformers.
"""
import difflib
import importlib
import importlib.util
import pkgutil

from recbole.utils import ModelType
from recbole.utils import get_model as recbole_get_model
from recbole.utils import get_trainer as recbole_get_trainer

import recbole_llm.model
from recbole_llm.trainer.checkpoint import checkpoint_safe


def plugin_model_names():
    """Names of the models this plugin defines (one module per model)."""
    names = []
    for module in pkgutil.iter_modules(recbole_llm.model.__path__):
        if module.name.startswith("_") or module.ispkg:
            continue
        mod = importlib.import_module(f"recbole_llm.model.{module.name}")
        names += [
            name for name, obj in vars(mod).items()
            if isinstance(obj, type) and name.lower() == module.name
        ]
    return sorted(names)


def _recbole_model_names():
    names = []
    for sub in ("general_recommender", "sequential_recommender", "context_aware_recommender",
                "knowledge_aware_recommender"):
        package = importlib.import_module(f"recbole.model.{sub}")
        names += [name for name in dir(package) if not name.startswith("_") and name[0].isupper()]
    return names


def get_model(model_name):
    """Model class named ``model_name``: the plugin's if it has one, else RecBole's."""
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"model name must be a non-empty string, got {model_name!r}")
    module_path = f"recbole_llm.model.{model_name.lower()}"
    if importlib.util.find_spec(module_path) is not None:
        module = importlib.import_module(module_path)
        if hasattr(module, model_name):
            return getattr(module, model_name)
    try:
        return recbole_get_model(model_name)
    except (ValueError, ImportError):  # RecBole's search imports exlib models (xgboost, lightgbm)
        known = plugin_model_names() + _recbole_model_names()
        close = difflib.get_close_matches(model_name, known, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"Unknown model '{model_name}': it is neither a recbole_llm model "
            f"({', '.join(plugin_model_names())}) nor a RecBole model.{hint}"
        ) from None


def get_trainer(model_type, model_name):
    """Trainer class for a model. Every trainer, RecBole's included, loads its checkpoints with
    ``weights_only=False`` (RecBole checkpoints pickle the Config; torch>=2.6 refuses them)."""
    module_path = f"recbole_llm.trainer.{model_name.lower()}"
    if importlib.util.find_spec(module_path) is not None:
        module = importlib.import_module(module_path)
        if hasattr(module, f"{model_name}Trainer"):
            return checkpoint_safe(getattr(module, f"{model_name}Trainer"))
    return checkpoint_safe(recbole_get_trainer(model_type, model_name))


def _dataset_class(config):
    from recbole_llm.data import dataset as plugin_datasets

    specific = getattr(plugin_datasets, f'{config["model"]}Dataset', None)
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
    add a working auto-download and the plugin's scenario splits.
    """
    from recbole_llm.data.dataset import load_saved_dataset

    dataset_class = _dataset_class(config)
    dataset = load_saved_dataset(config, dataset_class)
    if dataset is None:
        dataset = dataset_class(config)
        if config["save_dataset"]:
            dataset.save()
    return dataset


def data_preparation(config, dataset):
    """Split ``dataset`` into train/valid/test dataloaders (RecBole's ``data_preparation``), applying
    the plugin's scenario settings. Dataset classes that need their own loaders (episodic tasks)
    override ``prepare_dataloaders``."""
    return dataset.prepare_dataloaders(config)

