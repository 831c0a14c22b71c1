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


# Tiny settings every model test shares.
TINY_SASREC = {"hidden_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 1, "train_batch_size": 256}
TINY_META = dict(
    meta_user_fields=["age", "gender", "occupation"],
    meta_item_fields=["release_year", "class"],
    meta_args={"query_num": 10, "min_inter": 13, "max_inter": 100, "valid_test_ratio": [0.2, 0.2]},
    meta_scenario_args={"item_cold_by": "year", "item_year_field": "release_year",
                        "item_cold_from_year": 1996, "user_cold_ratio": 0.3},
    torch_threads=1, epochs=1, train_batch_size=4, proj_dim=8, embedding_size=8, mlp_hidden_size=[16, 16],
)
TINY_ALLMREC = {"latent_dim": 16, "history_len": 3, "stage1_epochs": 2, "stage2_epochs": 1, "stage2_max_samples": 4,
                "stage2_batch_size": 2, "sbert_finetune": "frozen", "eval_max_users": 4, "torch_threads": 1,
                "cold_user_args": None, "eval_item_groups": None,
                "backbone_args": {"model": "SASRec", "epochs": 1, "hidden_size": 16, "inner_size": 32,
                                  "n_layers": 1, "n_heads": 1}}


def tiny_config(**overrides):
    """config_dict for runs on tests/data/ml-tiny (files via ``config_file_list=[ML_TINY_YAML]``)."""
    config = {"data_path": str(DATA_DIR), "checkpoint_dir": "saved", "cache_dir": "saved/cache"}
    config.update(overrides)
    return config
