"""A run killed by a real signal (SIGTERM, SIGKILL) loses nothing it finished.

Each test starts a child process that does one long step of a run (text encoding, LLM judging,
backbone training, ALLMRec's stage 2), lets it finish part of the work, and kills it from here while it is in the
middle of the next part: no exception handler, ``finally`` or ``atexit`` runs. The step is then run
again in this process: it reuses what was saved, recomputes only the rest, and ends with what an
uninterrupted run gives (stage 2 through ``resume_checkpoint``, as a user resumes a run).
tests/test_llm.py covers ``Cache.chunked`` on exceptions.
"""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ML_TINY_YAML, TINY_ALLMREC, TINY_SASREC, tiny_config
from recbole_llm.checkpoint import CheckpointSafeMixin, load_checkpoint
from recbole_llm.config import Config
from recbole_llm.llm import encoder, judge as judges
from recbole_llm.quick_start import build_model, prepare, resolve_prerequisites
from recbole_llm.utils import get_trainer

REPO = Path(__file__).resolve().parents[1]
TEXTS = [f"item number {i}" for i in range(10)]
PAIRS = [[u, u + 1, u + 2] for u in range(10)]

# The child replaces one function by a version that, on its ``call``-th call (before or after doing
# the real work), writes the ``ready`` file and waits to be killed.
CHILD = """
import json, sys, time
from pathlib import Path
step, cache_dir, ready = sys.argv[1], sys.argv[2], Path(sys.argv[3])

def stall_on(owner, name, call, after=False):
    real, calls = getattr(owner, name), []
    def stalling(*args, **kwargs):
        calls.append(1)
        result = real(*args, **kwargs) if after else None
        if len(calls) == call:
            ready.write_text("kill me now")
            time.sleep(600)
        return result if after else real(*args, **kwargs)
    setattr(owner, name, stalling)

if step == "encoding":
    from recbole_llm.llm import encoder
    stall_on(encoder.TextEmbedder, "encode", 3)
    encoder.embed_texts(json.loads(sys.argv[4]), "tiny-random-sentence", cache_dir, chunk_size=2, show_progress=False)
elif step == "judging":
    import torch
    from recbole_llm.llm import judge
    stall_on(judge.RandomJudge, "score", 3)
    judge.judge_pairs(judge.RandomJudge(0), torch.tensor(json.loads(sys.argv[4])), cache_dir, chunk_size=2,
                      show_progress=False)
elif step == "backbone":
    from recbole_llm.checkpoint import CheckpointSafeMixin
    from recbole_llm.config import Config
    from recbole_llm.quick_start import resolve_prerequisites
    stall_on(CheckpointSafeMixin, "_save_checkpoint", 1, after=True)  # the first best epoch is on disk
    files, settings = json.loads(sys.argv[4])
    resolve_prerequisites(Config(model="ALLMRec", config_file_list=files, config_dict=settings))
elif step == "stage2":
    from recbole_llm.checkpoint import CheckpointSafeMixin
    from recbole_llm.config import Config
    from recbole_llm.quick_start import build_model, prepare, resolve_prerequisites
    from recbole_llm.utils import get_trainer
    files, settings, checkpoint_name = json.loads(sys.argv[4])
    config = Config(model="ALLMRec", config_file_list=files, config_dict=settings)
    resolve_prerequisites(config)
    _, train_data, _, _ = prepare(config)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, build_model(config, train_data))
    Path(checkpoint_name).write_text(trainer.saved_model_file)
    stall_on(CheckpointSafeMixin, "_save_checkpoint", 2, after=True)  # stage 1 and the first stage-2 epoch on disk
    trainer.fit(train_data, saved=True)
"""


def _kill_midway(step, cache_dir, sig, payload, ready):
    """Run ``step`` in a child and kill it with ``sig`` while it is stalled mid-way."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, step, str(cache_dir), str(ready), json.dumps(payload)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not ready.exists():
            if child.poll() is not None:
                pytest.fail(f"the {step} child ended before it could be killed:\n{child.stderr.read()[-3000:]}")
            if time.time() > deadline:
                pytest.fail(f"the {step} child never reached the point where it is killed")
            time.sleep(0.05)
        child.send_signal(sig)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -sig, child.stderr.read()[-3000:]


def _parts(cache_dir):
    return sorted(p.name for p in Path(cache_dir).rglob("*.parts/*.pt"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_text_encoding_resumes_at_the_first_unfinished_chunk(tmp_path, monkeypatch, sig):
    cache = tmp_path / "cache"
    _kill_midway("encoding", cache, sig, TEXTS, tmp_path / "ready")
    assert len(_parts(cache)) == 2, "the two finished chunks survive the kill"

    encoded, real = [], encoder.TextEmbedder.encode
    monkeypatch.setattr(encoder.TextEmbedder, "encode",
                        lambda self, texts, batch_size: encoded.append(list(texts)) or real(self, texts, batch_size))
    resumed = encoder.embed_texts(TEXTS, "tiny-random-sentence", cache, chunk_size=2, show_progress=False)
    assert [t for chunk in encoded for t in chunk] == TEXTS[4:], "only the unfinished chunks are encoded"
    monkeypatch.setattr(encoder.TextEmbedder, "encode", real)
    uninterrupted = encoder.embed_texts(TEXTS, "tiny-random-sentence", tmp_path / "fresh", chunk_size=2,
                                        show_progress=False)
    torch.testing.assert_close(resumed, uninterrupted)
    assert _parts(cache) == [], "the parts are removed once the whole result is saved"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_judging_resumes_at_the_first_unfinished_chunk(tmp_path, sig):
    cache = tmp_path / "cache"
    _kill_midway("judging", cache, sig, PAIRS, tmp_path / "ready")
    pairs = torch.tensor(PAIRS)
    probs, report = judges.judge_pairs(judges.RandomJudge(0), pairs, cache, chunk_size=2, show_progress=False)
    assert (report["reused"], report["computed"]) == (4, 6)
    uninterrupted, _ = judges.judge_pairs(judges.RandomJudge(0), pairs, tmp_path / "fresh", chunk_size=2,
                                          show_progress=False)
    assert torch.equal(probs, uninterrupted)


def test_killed_backbone_training_is_retrained_not_reused(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    settings = tiny_config(backbone_args={**TINY_SASREC, "epochs": 2}, cache_dir=str(cache), torch_threads=1)
    _kill_midway("backbone", cache, signal.SIGKILL, [[ML_TINY_YAML], settings], tmp_path / "ready")
    assert [p.suffix for p in (cache / "allmrec-backbones").iterdir()] == [".training"], \
        "a checkpoint of unfinished training is never where a rerun looks for a finished one"
    config = Config(model="ALLMRec", config_file_list=[ML_TINY_YAML], config_dict=settings)
    saves, save = [], CheckpointSafeMixin._save_checkpoint
    monkeypatch.setattr(CheckpointSafeMixin, "_save_checkpoint", lambda self, *a, **k: saves.append(1) or save(self, *a, **k))
    resolve_prerequisites(config)
    assert saves, "the backbone is trained again"
    assert load_checkpoint(config["backbone_checkpoint"])["config"]["model"] == "SASRec"


def _allmrec_run(settings):
    config = Config(model="ALLMRec", config_file_list=[ML_TINY_YAML], config_dict=settings)
    resolve_prerequisites(config)
    _, train_data, _, test_data = prepare(config)
    model = build_model(config, train_data)
    return model, get_trainer(config["MODEL_TYPE"], config["model"])(config, model), train_data, test_data


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_allmrec_stage_two_resumes_from_its_checkpoint_to_the_same_model(tmp_path, sig):
    settings = tiny_config(**{**TINY_ALLMREC, "cache_dir": str(tmp_path / "cache"),
                              "checkpoint_dir": str(tmp_path / "saved"), "stage1_epochs": 1, "stage2_epochs": 2,
                              "stage2_lr": 0.05})
    model, trainer, train_data, test_data = _allmrec_run(settings)  # also trains the backbone the child reuses
    trainer.fit(train_data, saved=True)
    batch = next(iter(test_data))[0].to(model.device)
    uninterrupted = model.predict(batch)

    name = tmp_path / "checkpoint_name"
    _kill_midway("stage2", tmp_path / "cache", sig, [[ML_TINY_YAML], settings, str(name)], tmp_path / "ready")
    model, resumed, train_data, _ = _allmrec_run(settings)
    resumed.resume_checkpoint(name.read_text())
    assert resumed.start_epoch == 2, "the killed run had saved stage 1 and the first stage-2 epoch"
    resumed.fit(train_data, saved=True)
    assert [stage for stage, _, _ in resumed.epoch_losses] == [2], "only the missing stage-2 epoch runs"
    torch.testing.assert_close(model.predict(batch), uninterrupted)
