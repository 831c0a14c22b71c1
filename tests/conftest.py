"""Shared test setup.

Every test runs in its own temporary working directory (RecBole writes ./log, ./saved,
./log_tensorboard), with the model home (tiny random models, dequantised GGUF copies) in a
per-session temporary folder, the hub offline, and a clean ``sys.argv`` (RecBole's Config reads
``--key=value`` arguments from it).
"""
import os
import sys
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
DATA_DIR = TESTS_DIR / "data"
ML_TINY_YAML = str(DATA_DIR / "ml-tiny.yaml")

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def model_home(tmp_path_factory):
    return tmp_path_factory.mktemp("model_home")


@pytest.fixture(autouse=True)
def isolated_run(tmp_path, monkeypatch, model_home):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RECBOLE_LLM_HOME", str(model_home))
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])
    yield tmp_path


def tiny_config(**overrides):
    """config_dict for runs on tests/data/ml-tiny (files via ``config_file_list=[ML_TINY_YAML]``)."""
    config = {"data_path": str(DATA_DIR), "checkpoint_dir": "saved", "cache_dir": "saved/cache"}
    config.update(overrides)
    return config
