"""The ALLMRec comparison table follows the evaluation mode its runs were made with."""
import json

import pytest

from benchmarks.allmrec_compare import write_table


def _run(folder, variant, mode, hit1):
    record = {"variant": variant, "settings": {"eval_args": {"mode": mode}},
              "results": {"test": {"hit@1": hit1, "hit@5": 0.5, "hit@10": 0.8}},
              "eval_users": {"test": 100}, "eval_seconds": {"test": 10.0}}
    (folder / f"{variant}.json").write_text(json.dumps(record))


@pytest.mark.parametrize("mode, title, chance", [
    ({"valid": "uni4", "test": "uni4"}, "uni4 Hit@1 (1 positive + 4 sampled negatives)",
     "| chance | a uniformly random order of the 5 candidates | 0.200"),
    ("uni19", "uni19 Hit@1 (1 positive + 19 sampled negatives)", "| 0.050 | 0.050 |"),
    ("full", "Hit@1 ranked by `eval_args.mode: full`", None),
])
def test_table_title_and_chance_row_follow_the_runs_evaluation_mode(tmp_path, mode, title, chance):
    _run(tmp_path, "Pop", mode, 0.25)
    _run(tmp_path, "SASRec", mode, 0.5)
    out = tmp_path / "table.md"
    write_table(tmp_path, out, "python -m benchmarks.allmrec_compare", "ml-100k")
    text = out.read_text()
    assert text.splitlines()[0] == f"# ALLMRec on ml-100k: {title}"
    assert "| SASRec |" in text and "0.500 ± 0.050" in text  # binomial SE of 0.5 on 100 users
    assert (chance in text) if chance else ("| chance |" not in text)
