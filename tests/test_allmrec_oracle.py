"""The oracle benchmark ranks the way the model's ``score_calibration`` says."""
import torch

from benchmarks.allmrec_oracle import MatchingTokens, candidate_sets, last_transitions, scores
from conftest import ML_TINY_YAML, TINY_ALLMREC, TINY_SASREC, tiny_config
from recbole_llm.config import Config
from recbole_llm.quick_start import build_model, prepare


class NoTokens:
    """The oracle prompt without any soft token."""

    def tokens(self, model, sample, row, marked_item, candidates):
        return None, None, None


def test_matching_oracle_with_prompt_prior_ranks_by_what_its_tokens_add():
    settings = {**TINY_ALLMREC, "backbone_args": TINY_SASREC, "num_candidates": 4, "stages": []}
    config = Config(model="ALLMRec", config_file_list=[ML_TINY_YAML], config_dict=tiny_config(**settings))
    _, train_data, _, _ = prepare(config)
    model = build_model(config, train_data).eval()
    oracle, sample = MatchingTokens(model).to(model.device), last_transitions(train_data, model)[torch.arange(3)]
    candidates = candidate_sets(model, sample, torch.Generator().manual_seed(0))
    targets = list(sample[model.ITEM_ID])
    with torch.no_grad():
        raw = scores(model, oracle, sample, range(3), candidates, targets)
        without_tokens = scores(model, NoTokens(), sample, range(3), candidates, targets)
        model.score_calibration = "prompt_prior"
        calibrated = scores(model, oracle, sample, range(3), candidates, targets)
    assert raw.shape == (3, 4) and not torch.allclose(raw, without_tokens)
    torch.testing.assert_close(calibrated, raw - without_tokens, rtol=1e-4, atol=1e-4)
