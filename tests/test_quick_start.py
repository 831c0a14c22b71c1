"""Running RecBole's own models through the plugin: train, reload the best checkpoint, tune."""
import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import DATA_DIR, ML_TINY_YAML, tiny_config
from recbole_llm.config import Config
from recbole_llm.quick_start import (chance_result, control_trainers, full_sort_chance, load_data_and_model, objective_function, prepare,
                                     run_recbole_llm)

REPO = Path(__file__).resolve().parents[1]
RESULT_KEYS = {"model", "best_valid_score", "valid_score_bigger", "best_valid_result", "test_result"}


@pytest.mark.parametrize("model, extra", [
    ("BPR", {}),
    ("SASRec", {"hidden_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 1, "train_batch_size": 256}),
])
def test_objective_function_contract(model, extra):
    result = objective_function(tiny_config(model=model, **extra), [ML_TINY_YAML])
    assert RESULT_KEYS <= set(result)
    assert result["model"] == model
    assert set(result["test_result"]) >= {"recall@10", "ndcg@10"}
    assert not list(Path("saved").glob("*.pth")), "a tuning trial must not leave its checkpoint behind"


def test_best_checkpoint_reloads_and_matches_load_data_and_model():
    result = run_recbole_llm("BPR", config_file_list=[ML_TINY_YAML], config_dict=tiny_config(epochs=2))
    checkpoints = list(Path("saved").glob("BPR-*.pth"))
    assert len(checkpoints) == 1
    config, model, dataset, train_data, valid_data, test_data = load_data_and_model(str(checkpoints[0]))
    saved = torch.load(checkpoints[0], weights_only=False)["state_dict"]
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    from recbole_llm.utils import get_trainer

    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    again = trainer.evaluate(test_data, load_best_model=False)
    assert again == pytest.approx(result["test_result"])


def test_resume_checkpoint_restores_training_state():
    from recbole_llm.config import Config
    from recbole_llm.utils import create_dataset, data_preparation, get_model, get_trainer

    config = Config(model="BPR", config_file_list=[ML_TINY_YAML], config_dict=tiny_config(epochs=1))
    dataset = create_dataset(config)
    train, valid, _ = data_preparation(config, dataset)
    model = get_model("BPR")(config, train._dataset).to(config["device"])
    trainer = get_trainer(config["MODEL_TYPE"], "BPR")(config, model)
    trainer.fit(train, valid, saved=True, show_progress=False)
    resumed = get_trainer(config["MODEL_TYPE"], "BPR")(config, get_model("BPR")(config, train._dataset).to(config["device"]))
    resumed.resume_checkpoint(trainer.saved_model_file)
    assert resumed.start_epoch == 1
    assert all(torch.equal(a, b) for a, b in zip(resumed.model.parameters(), trainer.model.parameters()))


def test_two_trainers_of_one_model_never_share_a_checkpoint_file():
    """Parallel benchmark processes start runs of one model in the same second; RecBole's
    model-and-second file name made one run load the other's weights (found in a benchmark)."""
    from recbole_llm.config import Config
    from recbole_llm.utils import create_dataset, data_preparation, get_model, get_trainer

    config = Config(model="BPR", config_file_list=[ML_TINY_YAML], config_dict=tiny_config(epochs=1))
    train, _, _ = data_preparation(config, create_dataset(config))
    first, second = (get_trainer(config["MODEL_TYPE"], "BPR")(config, get_model("BPR")(config, train._dataset))
                     for _ in range(2))
    assert first.saved_model_file != second.saved_model_file
    assert Path(first.saved_model_file).name.startswith("BPR-") and first.saved_model_file.endswith(".pth")


def test_cli_trains_and_prints_test_result(tmp_path):
    command = [sys.executable, str(REPO / "run_recbole_llm.py"), "--model=BPR", "--dataset=ml-tiny",
               f"--config_files={ML_TINY_YAML}", f"--data_path={DATA_DIR}", "--epochs=1", "--state=INFO"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "test result" in done.stdout + done.stderr
    assert list((tmp_path / "saved").glob("BPR-*.pth"))


def test_plugin_never_imports_recbole_quick_start():
    code = "import sys, recbole_llm.quick_start, recbole_llm.cli; print('recbole.quick_start' in sys.modules, 'ray' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "False False", done.stderr[-2000:]


def test_chance_level_of_sampled_evaluation_by_hand():
    config = {"eval_args": {"mode": {"valid": "uni19", "test": "uni19"}}}
    chance = chance_result(config, ["hit@1", "hit@5", "ndcg@2", "mrr@3", "recall@10"])
    assert chance == pytest.approx({"hit@1": 1 / 20, "hit@5": 5 / 20, "ndcg@2": (1 + 1 / math.log2(3)) / 20,
                                    "mrr@3": (1 + 1 / 2 + 1 / 3) / 20})
    assert chance_result({"eval_args": {"mode": "pop4"}}, ["hit@10"]) == {"hit@10": 1.0}
    assert chance_result({"eval_args": {"mode": "full"}}, ["hit@1"]) is None


def _enumerated_metrics(n, positives, k):
    """Exact expectations over every ordering of n candidates whose first ``positives`` are relevant."""
    totals = dict.fromkeys(("recall", "precision", "hit", "ndcg", "mrr"), 0.0)
    orders = list(itertools.permutations(range(n)))
    ideal = sum(1 / math.log2(r + 2) for r in range(min(positives, k)))
    for order in orders:
        top = [item < positives for item in order[:k]]
        totals["recall"] += sum(top) / positives
        totals["precision"] += sum(top) / k
        totals["hit"] += any(top)
        totals["ndcg"] += sum(1 / math.log2(r + 2) for r, rel in enumerate(top) if rel) / ideal
        totals["mrr"] += next((1 / (r + 1) for r, rel in enumerate(top) if rel), 0.0)
    return {name: total / len(orders) for name, total in totals.items()}


class _FullSortBatches(list):
    """Batches shaped like RecBole's full-sort loader: (users, (history rows, items), positive rows, items)."""

    def __init__(self, item_num, batches):
        super().__init__(batches)
        self._dataset = type("D", (), {"item_num": item_num})()


def test_full_ranking_chance_equals_enumerating_every_ordering():
    # items 1..7 (0 is padding). user 0: history {1, 2}, positives {3, 4}: 5 candidates, 2 relevant.
    # user 1: history {5}, positive {6}: 6 candidates, 1 relevant. user 2 (second batch): no history,
    # positives {1, 2, 3}: 7 candidates.
    t = torch.tensor
    loader = _FullSortBatches(8, [
        (None, (t([0, 0, 1]), t([1, 2, 5])), t([0, 0, 1]), t([3, 4, 6])),
        (None, None, t([0, 0, 0]), t([1, 2, 3])),
    ])
    metrics = ["recall@3", "precision@3", "hit@3", "ndcg@3", "mrr@3", "recall@10"]
    chance = full_sort_chance(loader, metrics)
    users = [(5, 2), (6, 1), (7, 3)]
    for metric in metrics:
        name, _, k = metric.partition("@")
        expected = sum(_enumerated_metrics(n, p, int(k))[name] for n, p in users) / len(users)
        assert chance[metric] == pytest.approx(expected), metric


def test_unknown_control_is_named():
    config = Config(model="BPR", config_file_list=[ML_TINY_YAML], config_dict=tiny_config(eval_controls=["Popp"]),
                    command_line=False)
    _, train_data, _, _ = prepare(config)
    with pytest.raises(ValueError, match="unknown control 'Popp'"):
        control_trainers(config, train_data)


def test_a_checkpoint_written_on_another_device_loads_on_this_runs_device():
    """A backbone trained on a GPU machine must load on a CPU one (its pickled config names cuda)."""
    from recbole_llm.quick_start import load_model
    from recbole_llm.utils import create_dataset, data_preparation, get_model, get_trainer

    config = Config(model="BPR", config_file_list=[ML_TINY_YAML], config_dict=tiny_config(epochs=1))
    train, valid, _ = data_preparation(config, create_dataset(config))
    trainer = get_trainer(config["MODEL_TYPE"], "BPR")(config, get_model("BPR")(config, train._dataset).to(config["device"]))
    trainer.fit(train, valid, saved=True, show_progress=False)
    checkpoint = torch.load(trainer.saved_model_file, weights_only=False)
    checkpoint["config"]["device"] = torch.device("cuda", 7)  # a GPU this machine does not have
    torch.save(checkpoint, trainer.saved_model_file)
    model = load_model(trainer.saved_model_file, train._dataset)
    assert {p.device for p in model.parameters()} == {torch.device(config["device"])}
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(model.parameters(), trainer.model.parameters()))
