"""RecBole dataset classes with a working auto-download and the plugin's scenario splits.

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
from recbole.utils.argument_list import dataset_arguments
from recbole.utils.url import download_url, extract_zip, rename_atomic_files

from recbole_llm.data import scenarios


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

    def build(self):
        """RecBole's split, with the configured scenarios applied around it (see ``scenarios``)."""
        scenarios.before_split(self)
        built = super().build()
        return scenarios.after_split(self, built)

    def prepare_dataloaders(self, config):
        """Train/valid/test dataloaders; subclasses with their own loaders override this."""
        return recbole.data.data_preparation(config, self)


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
    getLogger().info(f"Load filtered dataset from: [{file}]")
    return dataset
