"""RecBole dataset classes with a working auto-download, the plugin's scenario splits and the
text side information of their users and items (rendered texts and frozen text embeddings).

RecBole 1.2.1 downloads a missing dataset and then calls ``torch.distributed.barrier()``, which
crashes in an ordinary single-process run (RecBole#1989). It also downloads straight into the
dataset folder, so an interrupted download leaves a folder that blocks every later attempt.
Here the archive is fetched into a temporary folder next to the target, extracted, renamed to
the dataset's name and only then moved into place.
"""
import os
import pickle
import shutil
import tempfile
from logging import getLogger

import recbole.data
import recbole.data.dataset as recbole_datasets
import torch
from recbole.data.interaction import Interaction
from recbole.utils.argument_list import dataset_arguments
from recbole.utils.url import download_url, extract_zip, rename_atomic_files

from recbole_llm.data import scenarios
from recbole_llm.data.episodes import SCENARIOS, TEST, TRAIN, VALID, TaskDataLoader, build_episodes
from recbole_llm.data.text import TextSideInformation
from recbole_llm.llm.encoder import embed_from_config


class PluginDatasetMixin:
    """Shared behaviour of every dataset built through ``recbole_llm``."""

    def _get_download_url(self, url_file, allow_none=False):
        if url_file == "url" and self.config["download_url"]:
            return self.config["download_url"]
        return super()._get_download_url(url_file, allow_none)

    def _download(self):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if self.config["local_rank"] == 0:
                self._download_into_place()
            torch.distributed.barrier()
        else:
            self._download_into_place()

    def _download_into_place(self):
        url = self._get_download_url("url")
        self.logger.info(f"Downloading dataset [{self.dataset_name}] from [{url}].")
        parent = os.path.dirname(os.path.abspath(self.dataset_path))
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{self.dataset_name}-download-", dir=parent)
        try:
            archive = download_url(url, staging)
            extract_zip(archive, staging)
            os.unlink(archive)
            _flatten_single_folder(staging)
            basename = os.path.splitext(os.path.basename(archive))[0]
            rename_atomic_files(staging, basename, self.dataset_name)
            if not any(name.endswith(".inter") for name in os.listdir(staging)):
                raise RuntimeError(
                    f"the archive at {url} holds no .inter file for dataset "
                    f"[{self.dataset_name}]: {sorted(os.listdir(staging))}"
                )
            os.replace(staging, self.dataset_path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.logger.info(f"Dataset [{self.dataset_name}] is in [{self.dataset_path}].")

    def _load_feat(self, filepath, source):
        """RecBole's loader; a value its declared type cannot hold is named with file, line and field."""
        try:
            return super()._load_feat(filepath, source)
        except ValueError as error:
            culprit = _first_bad_number(filepath, self.config["field_separator"] or "\t",
                                        self.config["seq_separator"] or " ")
            if culprit is None:
                raise
            raise ValueError(f"{filepath}: {culprit}") from error

    def build(self):
        """RecBole's split, with the configured scenarios applied around it (see ``scenarios``)."""
        scenarios.before_split(self)
        built = super().build()
        return scenarios.after_split(self, built)

    def prepare_dataloaders(self, config):
        """Train/valid/test dataloaders; subclasses with their own loaders override this."""
        loaders = recbole.data.data_preparation(config, self)
        scenarios.keep_cold_items_out_of_negatives(config, self, loaders[0])
        return loaders

    # -- text side information (UniSRec's ``dataset.plm_embedding``, for any template and encoder)

    def texts(self, kind, template_key):
        """``["", text of internal id 1, ...]``: the ``kind`` ("item" or "user") texts rendered
        from the atomic file with the template under config key ``template_key``."""
        cache = self.__dict__.setdefault("_texts", {})
        if (kind, template_key) not in cache:
            cache[kind, template_key] = TextSideInformation(self.config, self).texts(kind, template_key)
        return cache[kind, template_key]

    def text_embeddings(self, kind, template_key, encoder_key="text_encoder"):
        """float32 ``[number of ids, dim]`` frozen embeddings of ``texts(kind, template_key)`` by the
        model under config key ``encoder_key`` (row 0, padding, is zeros); cached on disk by
        content under ``cache_dir``, so every model and run with the same texts shares them."""
        cache = self.__dict__.setdefault("_text_embeddings", {})
        key = (kind, template_key, encoder_key)
        if key not in cache:
            rows = embed_from_config(self.config, self.texts(kind, template_key)[1:], encoder_key=encoder_key).float()
            cache[key] = torch.cat([torch.zeros(1, rows.shape[1]), rows])
        return cache[key]


def _first_bad_number(path, separator, seq_separator):
    """``"line N, field [f] (float): 'x' is not a number"`` for the first value of a float or
    float_seq column that is not a number, or None."""
    with open(path, encoding="utf-8") as lines:
        header = next(lines).rstrip("\n").split(separator)
        numeric = {k: field.split(":") for k, field in enumerate(header) if field.endswith((":float", ":float_seq"))}
        for number, line in enumerate(lines, start=2):
            values = line.rstrip("\n").split(separator)
            for k, (name, kind) in numeric.items():
                raw = values[k] if k < len(values) else ""
                for part in (raw.split(seq_separator) if kind == "float_seq" else [raw]):
                    try:
                        if part.strip():
                            float(part)
                    except ValueError:
                        return f"line {number}, field [{name}] ({kind}): {raw!r} is not a number"
    return None


def _flatten_single_folder(folder):
    """Archives that wrap their files in one top-level folder are unwrapped."""
    entries = [e for e in os.listdir(folder) if not e.startswith(".")]
    if len(entries) == 1 and os.path.isdir(os.path.join(folder, entries[0])):
        inner = os.path.join(folder, entries[0])
        for name in os.listdir(inner):
            shutil.move(os.path.join(inner, name), os.path.join(folder, name))
        os.rmdir(inner)


class Dataset(PluginDatasetMixin, recbole_datasets.Dataset):
    pass


class SequentialDataset(PluginDatasetMixin, recbole_datasets.SequentialDataset):
    pass


class KnowledgeBasedDataset(PluginDatasetMixin, recbole_datasets.KnowledgeBasedDataset):
    pass


def load_saved_dataset(config, dataset_class):
    """RecBole's pickled filtered dataset (``save_dataset: True``) if its arguments still match."""
    default_file = os.path.join(config["checkpoint_dir"], f'{config["dataset"]}-{dataset_class.__name__}.pth')
    file = config["dataset_save_path"] or default_file
    if not os.path.exists(file):
        return None
    try:
        with open(file, "rb") as f:
            dataset = pickle.load(f)
    except Exception as error:
        getLogger().warning(f"Ignoring unreadable saved dataset {file}: {error}")
        return None
    for arg in dataset_arguments + ["seed", "repeatable"]:
        if config[arg] != dataset.config[arg]:
            return None
    # The pickle carries the config it was saved with; the plugin's own settings (scenarios, tasks,
    # templates) are read from the dataset's config at build time, so they must be this run's.
    dataset.config = config
    getLogger().info(f"Load filtered dataset from: [{file}]")
    return dataset


class EpisodicDataset(PluginDatasetMixin, recbole_datasets.Dataset):
    """Episodic tasks for meta-learned rating prediction (``recbole_llm/data/episodes.py``).

    The attribute fields named by ``meta_user_fields`` / ``meta_item_fields`` (MeLU's inputs, the
    item year used for cold items) are added to ``load_col``, so one dataset yaml serves every
    model. Loaders: meta-train / validation / test tasks of warm users on warm items; the four
    scenario test loaders come from ``evaluation_loaders``.
    """

    def _get_load_and_unload_col(self, source):
        load_col, unload_col = super()._get_load_and_unload_col(source)
        source = getattr(source, "value", source)
        extra = {"user": self.config["meta_user_fields"], "item": self.config["meta_item_fields"]}.get(source)
        if load_col is not None and extra:
            id_field = self.config["USER_ID_FIELD"] if source == "user" else self.config["ITEM_ID_FIELD"]
            load_col = set(load_col) | set(extra) | {id_field}
        return load_col, unload_col

    @property
    def episodes(self):
        if getattr(self, "_episodes", None) is None:
            if not isinstance(self.inter_feat, Interaction):
                self._change_feat_format()  # what RecBole's build() does first: DataFrames -> Interactions
            self._episodes = build_episodes(self)
        return self._episodes

    def train_rating_mean(self):
        """Mean rating over the meta-training tasks (start of the estimator's output bias)."""
        ratings = [torch.cat([t.support_ratings, t.query_ratings]) for t in self.episodes[TRAIN]]
        return float(torch.cat(ratings).mean())

    def rating_range(self):
        ratings = self.inter_feat[self.config["RATING_FIELD"]]
        return float(ratings.min()), float(ratings.max())

    def rating_baseline_data(self, include_support=True):
        """Training rows for a non-meta rating model (e.g. RecBole's WideDeep), as a dataset copy.

        Rows: every rating of the meta-training tasks and, with ``include_support``, the support
        sets of all validation, test and scenario tasks (what such a model can know at test time;
        a meta model adapts on the same ratings). Query ratings are never included. The label
        ``LABEL_FIELD`` is the rating min-max scaled to [0, 1].
        """
        rows = [torch.cat([t.support_rows, t.query_rows]) for t in self.episodes[TRAIN]]
        if include_support:
            rows += [t.support_rows for name, tasks in self.episodes.items() if name != TRAIN for t in tasks]
        rows = torch.unique(torch.cat(rows))
        low, high = self.rating_range()
        inter = self.inter_feat[rows]
        scaled = (inter[self.config["RATING_FIELD"]].float() - low) / (high - low)
        inter.update(Interaction({self.config["LABEL_FIELD"]: scaled}))
        return self.copy(inter)

    def prepare_dataloaders(self, config):
        episodes = self.episodes
        return (
            TaskDataLoader(config, self, episodes[TRAIN], shuffle=config["shuffle"]),
            TaskDataLoader(config, self, episodes[VALID]),
            TaskDataLoader(config, self, episodes[TEST]),
        )

    def evaluation_loaders(self, config, test_loader):
        """The warm-warm test loader and one loader per scenario (``episodes.SCENARIOS``)."""
        groups = {}
        for name in SCENARIOS:
            tasks = self.episodes[name]
            if tasks:
                groups[name] = TaskDataLoader(config, self, tasks)
            else:
                getLogger().warning(f"Scenario [{name}] has no task; skipped.")
        return test_loader, groups

