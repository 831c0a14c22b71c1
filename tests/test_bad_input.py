"""Rows of the bad-input table (docs/bad_input.md) that no other test file covers: each bad input
gets an error that names the culprit (file, line, field, value or key), or a stated fallback."""
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import DATA_DIR, ML_TINY_YAML, tiny_config
from recbole_llm.checkpoint import load_checkpoint
from recbole_llm.config import Config
from recbole_llm.llm.encoder import embed_from_config
from recbole_llm.quick_start import build_model, load_model, prepare, run_recbole_llm
from recbole_llm.utils import create_dataset, get_trainer


def _data_copy(tmp_path):
    """A private copy of tests/data/ml-tiny to damage: returns ``(data_path, dataset folder)``."""
    shutil.copytree(DATA_DIR / "ml-tiny", tmp_path / "data" / "ml-tiny")
    return str(tmp_path / "data"), tmp_path / "data" / "ml-tiny"


def _config(model="BPR", **overrides):
    return Config(model=model, config_file_list=[ML_TINY_YAML], config_dict=tiny_config(**overrides))


def _edit_column(path, row, column, value):
    lines = path.read_text().split("\n")
    fields = lines[row].split("\t")
    fields[column] = value
    lines[row] = "\t".join(fields)
    path.write_text("\n".join(lines))


def test_missing_atomic_file_is_named(tmp_path):
    data_path, folder = _data_copy(tmp_path)
    (folder / "ml-tiny.item").unlink()
    dataset = create_dataset(_config(data_path=data_path))
    with pytest.raises(FileNotFoundError, match=r"ml-tiny\.item"):
        dataset.texts("item", "item_text_template")


def test_non_numeric_rating_names_file_line_field_and_value(tmp_path):
    data_path, folder = _data_copy(tmp_path)
    _edit_column(folder / "ml-tiny.inter", 3, 2, "three")
    with pytest.raises(ValueError, match=r"ml-tiny\.inter: line 4, field \[rating\] \(float\): 'three' is not a number"):
        create_dataset(_config(data_path=data_path))


def test_whitespace_only_texts_get_the_fallback_with_a_warning(tmp_path, caplog):
    data_path, folder = _data_copy(tmp_path)
    _edit_column(folder / "ml-tiny.item", 1, 1, "   ")  # item 1's title
    dataset = create_dataset(_config(data_path=data_path, item_text_template="{movie_title}"))
    with caplog.at_level(logging.WARNING):
        texts = dataset.texts("item", "item_text_template")
    internal = dataset.token2id(dataset.iid_field, "1")
    assert texts[internal] == "item 1"
    assert "item_text_template" in caplog.text and "['1']" in caplog.text and "text_fallback" in caplog.text


def test_truncated_embedding_cache_is_moved_aside_and_recomputed(tmp_path, caplog):
    config = _config(cache_dir=str(tmp_path / "cache"))
    texts = ["a movie", "another movie", "a third one"]
    first = embed_from_config(config, texts)
    (entry,) = (tmp_path / "cache").rglob("*.pt")
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        again = embed_from_config(config, texts)
    assert torch.equal(first, again)
    assert str(entry) in caplog.text and entry.with_name(entry.name + ".corrupt").exists()


def _trained_bpr():
    run_recbole_llm(model="BPR", config_file_list=[ML_TINY_YAML], config_dict=tiny_config())
    (checkpoint,) = Path("saved").glob("BPR-*.pth")
    return checkpoint


def test_truncated_or_foreign_checkpoints_are_named(tmp_path):
    checkpoint = _trained_bpr()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(checkpoint.read_bytes()[:1000])
    with pytest.raises(RuntimeError, match=r"cannot read checkpoint .*truncated\.pth"):
        load_checkpoint(truncated)
    foreign = tmp_path / "weights.pth"
    torch.save({"weight": torch.zeros(2)}, foreign)
    with pytest.raises(RuntimeError, match=r"weights\.pth is not a RecBole checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(ValueError, match=r"written by model BPR, not NeuMF"):
        load_checkpoint(checkpoint, model="NeuMF")
    # resuming another model's checkpoint is refused before anything is loaded
    config = _config(model="NeuMF")
    dataset, train_data, _, _ = prepare(config)
    trainer = get_trainer(config["MODEL_TYPE"], "NeuMF")(config, build_model(config, train_data))
    with pytest.raises(ValueError, match="written by model BPR, not NeuMF"):
        trainer.resume_checkpoint(str(checkpoint))
    assert load_model(str(checkpoint), dataset) is not None  # the intact file still loads


def test_unwritable_output_folders_are_named_before_anything_runs(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for key in ("checkpoint_dir", "cache_dir"):
        config = _config(**{key: str(blocker / "sub")})
        with pytest.raises(PermissionError, match=rf"{key}=.*a-file/sub.*not a writable folder"):
            prepare(config)


def test_more_candidates_than_items_is_refused_naming_the_key():
    config = _config(model="TALLRec", num_candidates=10_000, cold_user_args=None, eval_item_groups=None,
                     torch_threads=1)
    _, train_data, _, _ = prepare(config)
    with pytest.raises(ValueError, match=r"num_candidates=10000 does not fit: user .* has only \d+ items"):
        build_model(config, train_data)


def test_histories_shorter_than_history_len_use_the_items_there_are():
    config = _config(model="TALLRec", history_len=50, cold_user_args=None, eval_item_groups=None,
                     torch_threads=1, num_candidates=3)
    _, train_data, _, test_data = prepare(config)
    model = build_model(config, train_data)
    batch = next(iter(test_data))[0].to(model.device)
    lengths = batch[model.ITEM_SEQ_LEN]
    row = int(lengths.argmin())
    assert int(lengths[row]) < 50
    assert len(model.history(batch, row)) == int(lengths[row])
    assert torch.isfinite(model.predict(batch)).all()


def test_every_test_the_table_names_exists():
    table = (Path(__file__).resolve().parents[1] / "docs" / "bad_input.md").read_text()
    named = re.findall(r"`(test_\w+\.py)::(test_\w+)`", table)
    assert len(named) >= 14
    for file, function in named:
        assert f"def {function}(" in (Path(__file__).parent / file).read_text(), f"{file}::{function}"
