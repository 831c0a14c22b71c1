"""Tuning with RecBole's HyperTuning and the plugin's objective function."""
import re

from conftest import DATA_DIR, ML_TINY_YAML
from recbole_llm.cli import hyper_main


def test_exhaustive_grid_runs_every_trial_and_exports(tmp_path):
    fixed = tmp_path / "fixed.yaml"
    fixed.write_text(f"model: BPR\ndata_path: {DATA_DIR}\n")
    space = tmp_path / "space.hyper"
    space.write_text("learning_rate choice [0.01,0.002]\nembedding_size choice [8,16]\n")
    out = tmp_path / "results.txt"
    tuner = hyper_main([f"--config_files={ML_TINY_YAML} {fixed}", f"--params_file={space}",
                        f"--output_file={out}", "--algo=exhaustive"])
    assert len(tuner.params2result) == 4
    text = out.read_text()
    trials = re.findall(r"embedding_size:(\d+), learning_rate:([\d.]+)", text)
    assert sorted(trials) == [("16", "0.002"), ("16", "0.01"), ("8", "0.002"), ("8", "0.01")]
    assert text.count("Test result:") == 4
    assert not list(tmp_path.glob("saved/*.pth"))


def test_random_search_respects_max_evals(tmp_path):
    fixed = tmp_path / "fixed.yaml"
    fixed.write_text(f"model: BPR\ndata_path: {DATA_DIR}\n")
    space = tmp_path / "space.hyper"
    space.write_text("learning_rate loguniform -6,-3\n")
    tuner = hyper_main([f"--config_files={ML_TINY_YAML} {fixed}", f"--params_file={space}",
                        f"--output_file={tmp_path / 'r.txt'}", "--algo=random", "--max_evals=2"])
    assert len(tuner.params2result) == 2
