"""Multi-process training (``nproc=2``, gloo on the CPU) against the one-process run with the same
global batch: the plugin's own loops (episodic, ALLMRec's stages) must compute the same updates;
RecBole's own loop (BPR) must run under our gloo group; checkpoints are written once; chunked
cache work (LLM judgements, text embeddings) is split over the ranks."""
from pathlib import Path

import pytest
import torch

from conftest import ML_TINY_YAML, TINY_ALLMREC, TINY_META, tiny_config
from recbole_llm.quick_start import run_recbole_llm


def _run(settings, nproc):
    """``(result, the checkpoint this run wrote)``."""
    before = set(Path("saved").glob("*.pth"))
    result = run_recbole_llm(config_file_list=[ML_TINY_YAML], config_dict=tiny_config(gpu_id="", **settings), nproc=nproc)
    written = set(Path("saved").glob("*.pth")) - before
    assert len(written) == 1, f"expected one checkpoint from the {nproc}-process run, found {sorted(written)}"
    return result, written.pop()


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_two_processes_meta_train_exactly_as_one():
    settings = {"model": "MetaLLMRec", **{**TINY_META, "epochs": 2}}
    one, one_file = _run(settings, 1)
    two, two_file = _run(settings, 2)
    assert two["test_result"] == pytest.approx(one["test_result"], abs=1e-4)
    for scenario, values in one["group_results"].items():
        assert two["group_results"][scenario] == pytest.approx(values, abs=1e-4)
    a, b = _weights(one_file), _weights(two_file)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_two_processes_train_allmrec_stages_exactly_as_one():
    settings = {"model": "ALLMRec", **TINY_ALLMREC}
    one, one_file = _run(settings, 1)
    two, two_file = _run(settings, 2)
    a, b = _weights(one_file), _weights(two_file)
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    # evaluation is sharded by user; RecBole samples each batch's uni19 negatives, so the metrics
    # agree in expectation, not bit for bit
    assert set(two["test_result"]) == set(one["test_result"])
    assert all(0 <= v <= 1 for v in two["test_result"].values())


def test_recbole_models_train_in_two_processes_on_the_cpu():
    result, _ = _run({"model": "BPR", "epochs": 2}, 2)
    assert 0 <= result["test_result"]["recall@10"] <= 1


def test_two_processes_split_the_judging_and_agree_on_every_judgement():
    settings = {"model": "AugBPR", "base_model": "BPR", "judge": "embedding", "aug_users_per_item": 2,
                "judge_chunk_size": 3, "judge_eval_pairs": 20, "epochs": 1}
    one, _ = _run({**settings, "cache_dir": "saved/cache-one"}, 1)
    two, _ = _run({**settings, "cache_dir": "saved/cache-two"}, 2)
    judged_one, judged_two = one["extra_results"]["judging"], two["extra_results"]["judging"]
    assert judged_one["computed"] == judged_one["pairs"] > 6
    # rank 0 judged chunks 0, 2, 4, ... of 3 pairs: about half
    assert 0 < judged_two["computed"] <= judged_two["pairs"] // 2 + 3
    assert {k: judged_two[k] for k in ("pairs", "kept", "first_shown_wins")} == \
        {k: judged_one[k] for k in ("pairs", "kept", "first_shown_wins")}
    assert two["extra_results"]["judge_accuracy"]["accuracy"] == one["extra_results"]["judge_accuracy"]["accuracy"]
    one_file = next(Path("saved/cache-one/judgements").glob("embedding-*.pt"))
    two_file = Path("saved/cache-two/judgements") / one_file.name
    assert torch.equal(torch.load(one_file), torch.load(two_file)), "the same judgements, assembled from two ranks"
    assert not list(Path("saved/cache-two").rglob("*.parts/*.pt")), "the parts are replaced by the whole"


def test_more_processes_than_gpus_are_refused_by_name(monkeypatch):
    from recbole_llm.config import Config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a one-GPU machine
    with pytest.raises(ValueError, match="nproc=2 processes need one GPU each, gpu_id=0 names fewer"):
        Config(model="BPR", config_file_list=[ML_TINY_YAML], command_line=False,
               config_dict=tiny_config(gpu_id=0, nproc=2, local_rank=0, world_size=2, ip="localhost", port=1))
