"""Config layering, plugin-first resolution and clear errors for bad names."""
import subprocess
import sys

import pytest
from recbole.model.general_recommender import BPR
from recbole.trainer import Trainer

from conftest import ML_TINY_YAML, tiny_config
from recbole_llm.config import Config
from recbole_llm.checkpoint import CheckpointSafeMixin
from recbole_llm.utils import create_dataset, get_model, get_trainer


def test_plugin_yaml_is_layered_over_recbole_and_under_the_user():
    config = Config(model="BPR", dataset="ml-100k")
    assert config["text_encoder"] == "all-MiniLM-L6-v2"            # properties/overall.yaml
    assert config["item_text_template"].startswith("{movie_title}")  # properties/dataset/ml-100k.yaml
    assert config["embedding_size"] == 64                            # RecBole's model/BPR.yaml
    assert config["MODEL_TYPE"].name == "GENERAL"
    config = Config(model="BPR", dataset="ml-100k", config_dict={"text_encoder": "x", "embedding_size": 8})
    assert config["text_encoder"] == "x" and config["embedding_size"] == 8


def test_command_line_overrides_files_and_dict(monkeypatch, tmp_path):
    yaml_file = tmp_path / "user.yaml"
    yaml_file.write_text("llm: from-file\ncache_dir: from-file\n")
    monkeypatch.setattr(sys, "argv", ["prog", "--llm=from-cmd", "--learning_rate=0.5"])
    config = Config(model="BPR", dataset="ml-100k", config_file_list=[str(yaml_file)],
                    config_dict={"llm": "from-dict"})
    assert config["llm"] == "from-cmd"
    assert config["cache_dir"] == "from-file"
    assert config["learning_rate"] == 0.5


def test_config_for_a_run_the_plugin_starts_ignores_the_command_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["prog", "--learning_rate=0.5", "--seeds", "0", "1"])
    assert Config(model="BPR", dataset="ml-100k")["learning_rate"] == 0.5
    assert Config(model="BPR", dataset="ml-100k", command_line=False)["learning_rate"] == 0.001


def test_plugin_trainers_and_datasets_follow_the_model_lineage():
    from recbole_llm.data.dataset import EpisodicDataset, SequentialDataset
    from recbole_llm.trainer import ALLMRecTrainer, EpisodicTrainer
    from recbole_llm.utils import dataset_class

    for model, trainer in (("ALLMRec", ALLMRecTrainer), ("TALLRec", ALLMRecTrainer), ("MeLU", EpisodicTrainer),
                           ("MetaLLMRec", EpisodicTrainer), ("SupportMedian", EpisodicTrainer)):
        assert get_trainer(get_model(model).type, model) is trainer
    assert dataset_class(Config(model="MeLU", dataset="ml-100k")) is EpisodicDataset
    assert dataset_class(Config(model="TALLRec", dataset="ml-100k")) is SequentialDataset


def test_meta_family_shares_its_yaml():
    melu, metallmrec = Config(model="MeLU", dataset="ml-100k"), Config(model="MetaLLMRec", dataset="ml-100k")
    for key in ("local_lr", "learning_rate", "metrics", "eval_args", "clip_grad_norm", "train_batch_size"):
        assert melu[key] == metallmrec[key] is not None, key
    assert (melu["local_update"], metallmrec["local_update"]) == (1, 5)
    assert Config(model="SupportMedian", dataset="ml-100k")["metrics"] == ["MAE"]


def test_model_yaml_beats_dataset_yaml(monkeypatch, tmp_path):
    import recbole_llm.config as config_module

    properties = tmp_path / "properties"
    (properties / "model").mkdir(parents=True)
    (properties / "dataset").mkdir()
    (properties / "overall.yaml").write_text("llm: overall\ncache_dir: overall\n")
    (properties / "dataset" / "ml-100k.yaml").write_text("llm: dataset\ncache_dir: dataset\n")
    (properties / "model" / "BPR.yaml").write_text("llm: model\n")
    monkeypatch.setattr(config_module, "PROPERTIES_DIR", properties)
    config = Config(model="BPR", dataset="ml-100k")
    assert config["llm"] == "model" and config["cache_dir"] == "dataset"


def test_recbole_models_resolve_with_checkpoint_safe_trainers():
    assert get_model("BPR") is BPR
    trainer_class = get_trainer(get_model("BPR").type, "BPR")
    assert issubclass(trainer_class, CheckpointSafeMixin) and issubclass(trainer_class, Trainer)
    assert trainer_class.__name__ == "Trainer"
    assert get_trainer(BPR.type, "BPR") is trainer_class  # built once


def test_unknown_model_error_names_it_and_suggests():
    with pytest.raises(ValueError, match=r"Unknown model 'SASRek'.*SASRec"):
        get_model("SASRek")
    with pytest.raises(ValueError, match="non-empty"):
        get_model("")


def test_unknown_dataset_error_names_it():
    config = Config(model="BPR", dataset="no-such-dataset", config_dict={"data_path": "nowhere"})
    with pytest.raises(ValueError, match="no-such-dataset"):
        create_dataset(config)


def test_shipped_dataset_is_found_from_any_directory():
    config = Config(model="BPR", dataset="amazon-beauty-sample")
    dataset = create_dataset(config)
    assert dataset.inter_num == 445 and config["data_path"].endswith("amazon-beauty-sample")


def test_user_data_path_wins_over_shipped_copy(tmp_path):
    import shutil

    from recbole_llm import SHIPPED_DATASETS_DIR

    shutil.copytree(SHIPPED_DATASETS_DIR / "amazon-beauty-sample", tmp_path / "dataset" / "amazon-beauty-sample")
    config = Config(model="BPR", dataset="amazon-beauty-sample", config_dict={"data_path": str(tmp_path / "dataset")})
    assert config["data_path"] == str(tmp_path / "dataset" / "amazon-beauty-sample")


def test_tiny_fixture_config_loads():
    config = Config(model="SASRec", config_file_list=[ML_TINY_YAML], config_dict=tiny_config())
    assert config["dataset"] == "ml-tiny" and config["eval_args"]["order"] == "TO"


def test_resolving_recbole_models_leaves_autograd_anomaly_mode_as_it_was():
    # RecBole's sine.py turns anomaly detection on when its sequential models are imported; a
    # fresh process shows both RecBole's side effect (the control) and that get_model undoes it.
    def anomaly_after(code):
        out = subprocess.run([sys.executable, "-c", f"{code}; import torch; print(torch.is_anomaly_enabled())"],
                             capture_output=True, text=True, check=True)
        return out.stdout.split()[-1]

    assert anomaly_after("import recbole.model.sequential_recommender") == "True"
    assert anomaly_after("from recbole_llm.utils import get_model; get_model('SASRec')") == "False"
    assert anomaly_after("import torch; torch.autograd.set_detect_anomaly(True); "
                         "from recbole_llm.utils import get_model; get_model('SASRec')") == "True"


def test_a_mistyped_key_is_named_with_a_suggestion(monkeypatch, caplog):
    monkeypatch.setattr(sys, "argv", ["prog", "--stage2_lrr=0.1", "--epochs=2"])
    with caplog.at_level("WARNING"):
        config = Config(model="ALLMRec", dataset="ml-100k", config_dict={"stage2_max_samples": 4, "n_layers": 1})
    assert config.unknown_keys == ["stage2_lrr"]  # plugin keys, RecBole keys and model keys are known
    assert "'stage2_lrr' is not read" in caplog.text and "stage2_lr" in caplog.text
