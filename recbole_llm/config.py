"""RecBole ``Config`` that knows the plugin's models and yaml properties.

Internal yaml is layered as RecBole's own (overall, model, sample, dataset, quick-start by model
type) followed by ours: ``properties/overall.yaml``, ``properties/dataset/<dataset>.yaml``,
``properties/model/<Model>.yaml``. Model yaml (a plugin parent class's first) comes last among
ours because a model's needs (e.g. raw ratings for MetaLLMRec) must beat dataset defaults; a
wrapped base model's yaml (AugBPR's ``base_model``) comes first. Everything internal stays below the user's
config files, ``config_dict`` and ``--key=value`` command-line arguments, exactly as in RecBole.

Command-line values are read as RecBole reads them (Python literals), and where that leaves a
string that is yaml flow style (``--backbone_args="{model: GRU4Rec, epochs: 10}"``) or ``~``,
as yaml, the way the same value is written in a yaml file.

``Config(..., command_line=False)`` ignores the command line: the configuration of a run that the
plugin starts itself (a backbone trained for ALLMRec, a benchmark's runs), whose ``--key=value``
arguments belong to another run or to another program.
"""
import difflib
import os
from functools import lru_cache
from logging import getLogger
from pathlib import Path

import recbole
import yaml
from recbole.config import Config as RecBoleConfig
from recbole.utils import ModelType
from recbole.utils import argument_list

from recbole_llm import PROPERTIES_DIR, SHIPPED_DATASETS_DIR
from recbole_llm.distributed import init_device
from recbole_llm.utils import get_model


# Keys no yaml sets: read by the CLIs themselves (argparse; RecBole's parser sees them too), or
# set by RecBole's code (device, the multi-process keys its launcher and ours pass to each rank).
CODE_KEYS = {"model", "dataset", "config_files", "params_file", "output_file", "display_file", "algo",
             "max_evals", "early_stop", "device", "nproc", "world_size", "ip", "port", "offset",
             "group_offset", "local_rank", "single_spec"}


@lru_cache(maxsize=1)
def known_keys():
    """Every key some yaml of RecBole or of the plugin sets, and RecBole's argument lists."""
    keys = set(CODE_KEYS)
    for name in dir(argument_list):
        if name.endswith("_arguments"):
            keys.update(getattr(argument_list, name))
    for root in (Path(recbole.__file__).parent / "properties", PROPERTIES_DIR):
        for path in root.rglob("*.yaml"):
            loaded = yaml.safe_load(path.read_text()) or {}
            if isinstance(loaded, dict):
                keys.update(loaded)
    return keys


class Config(RecBoleConfig):
    def __init__(self, model=None, dataset=None, config_file_list=None, config_dict=None, command_line=True):
        self.command_line = command_line
        super().__init__(model=model, dataset=dataset, config_file_list=config_file_list, config_dict=config_dict)

    def _init_device(self):
        # RecBole's multi-process mode is NCCL only; a CPU run joins a gloo group (distributed.py).
        if not init_device(self):
            super()._init_device()

    def _load_cmd_line(self):
        if not self.command_line:
            return {}
        values = super()._load_cmd_line()
        for key, value in values.items():
            if isinstance(value, str):
                values[key] = self._yaml_value(key, value)
        return values

    def _yaml_value(self, key, value):
        """A command-line string RecBole left as is, read as yaml where it is ``~`` or a flow-style
        dict or list; interval strings such as ``[5,inf)`` stay strings, as RecBole wants them."""
        text = value.strip()
        if text == "~":
            return None
        if text[:1] not in ("{", "["):
            return value
        try:
            parsed = yaml.load(text, Loader=self.yaml_loader)
        except yaml.YAMLError as error:
            if text.startswith("{"):
                raise ValueError(f"--{key}={value}: neither a Python literal nor yaml flow style ({error})") from None
            return value
        return parsed if isinstance(parsed, (dict, list)) else value

    def _get_model_and_dataset(self, model, dataset):
        if model is None:
            model = self.external_config_dict.get("model")
            if model is None:
                raise KeyError(
                    "model must be given in one of: the model argument, a config file, "
                    "config_dict or the command line (--model=...)"
                )
        if isinstance(model, str):
            model_name, model_class = model, get_model(model)
        else:
            model_name, model_class = model.__name__, model
        # A model that wraps another (AugBPR) takes its type and input type from the wrapped one,
        # which only the configuration names; such a class returns a class specialised for it.
        for_config = getattr(model_class, "for_config", None)
        if for_config is not None:
            model_class = for_config(self.external_config_dict)

        if dataset is None:
            dataset = self.external_config_dict.get("dataset")
            if dataset is None:
                raise KeyError(
                    "dataset must be given in one of: the dataset argument, a config file, "
                    "config_dict or the command line (--dataset=...)"
                )
        return model_name, model_class, dataset

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        overall = PROPERTIES_DIR / "overall.yaml"
        dataset_file = PROPERTIES_DIR / "dataset" / f"{dataset}.yaml"
        # A plugin model that extends another plugin model (TALLRec < ALLMRec) starts from its
        # parents' yaml and overrides what differs.
        parents = [cls.__name__ for cls in reversed(model_class.__mro__[1:])
                   if cls.__module__.startswith("recbole_llm.model.")]
        model_files = [PROPERTIES_DIR / "model" / f"{name}.yaml" for name in dict.fromkeys(parents + [model])]
        # A wrapped base model's own defaults (RecBole's yaml, then ours) come before the wrapper's.
        base = getattr(model_class, "base_model_name", None)
        base_files = []
        if base:
            base_files = [Path(recbole.__file__).parent / "properties" / "model" / f"{base}.yaml",
                          PROPERTIES_DIR / "model" / f"{base}.yaml"]
        for path in (*base_files, overall, dataset_file, *model_files):
            if not path.is_file():
                continue
            loaded = self._update_internal_config_dict(str(path)) or {}
            if path == dataset_file:
                # Dataset keys take part in RecBole's logging and dataset-cache comparison.
                self.parameters["Dataset"] += [
                    key for key in loaded if key not in self.parameters["Dataset"]
                ]

    def _warn_unknown_keys(self):
        """RecBole accepts any key silently; a mistyped one (``--stage2_lrr``) would be ignored."""
        unknown = sorted(set(self.external_config_dict) - known_keys() - set(self.internal_config_dict))
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(known_keys()), n=2)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            getLogger().warning(f"config key '{key}' is not read by recbole_llm or RecBole (no yaml sets it){hint}")
        self.unknown_keys = unknown

    def _set_default_parameters(self):
        self._warn_unknown_keys()
        # RecBole's overall.yaml samples one training negative by default, and RecBole then refuses
        # every sequential model with CE loss (SASRec, GRU4Rec, ...) unless the user turns sampling
        # off (RecBole#1208). CE needs no negatives, so sampling is off unless the user asked for it.
        final = self.final_config_dict
        if (final.get("MODEL_TYPE") == ModelType.SEQUENTIAL and final.get("loss_type") == "CE"
                and "train_neg_sample_args" not in self.external_config_dict):
            final["train_neg_sample_args"] = None
        super()._set_default_parameters()
        # Datasets shipped inside the plugin (dataset/<name>/) are found wherever the user runs from,
        # the way RecBole finds its bundled ml-100k; a folder under the user's data_path wins.
        data_path = self.final_config_dict["data_path"]
        shipped = SHIPPED_DATASETS_DIR / self.dataset
        if not os.path.isdir(data_path) and shipped.is_dir():
            self.final_config_dict["data_path"] = str(shipped)
