"""The faster kernels swapped into RecBole's layers compute what RecBole's do."""
import copy

import torch
from recbole.model.layers import FeedForward

from conftest import ML_TINY_YAML, TINY_SASREC, tiny_config
from recbole_llm.config import Config
from recbole_llm.fast_kernels import RandDropout, use_fast_kernels
from recbole_llm.quick_start import build_model, prepare


def _tiny_sasrec(**overrides):
    config = Config(model="SASRec", config_file_list=[ML_TINY_YAML],
                    config_dict=tiny_config(**{**TINY_SASREC, "n_layers": 2, **overrides}), command_line=False)
    dataset, train_data, _, _ = prepare(config)
    return build_model(config, train_data), train_data


def test_built_models_get_the_fused_gelu_and_rand_dropout_unless_switched_off():
    fast, _ = _tiny_sasrec()
    plain, _ = _tiny_sasrec(fast_kernels=False)
    fast_layers = [m for m in fast.modules() if isinstance(m, FeedForward)]
    assert len(fast_layers) == 2 and all(m.intermediate_act_fn is torch.nn.functional.gelu for m in fast_layers)
    assert any(isinstance(m, RandDropout) for m in fast.modules())
    assert not any(isinstance(m, RandDropout) for m in plain.modules())
    assert all(m.intermediate_act_fn.__func__ is FeedForward.gelu for m in plain.modules() if isinstance(m, FeedForward))


def test_fast_kernels_give_recbole_scores_in_eval_mode():
    plain, train_data = _tiny_sasrec(fast_kernels=False)
    fast = copy.deepcopy(plain)
    changed = use_fast_kernels(fast)
    assert changed["gelu"] == 2 and changed["dropout"] >= 7
    assert use_fast_kernels(fast) == {"gelu": 0, "dropout": 0}  # idempotent
    batch = next(iter(train_data)).to(plain.device)
    plain.eval(), fast.eval()
    with torch.no_grad():
        expected = plain.full_sort_predict(batch)
        got = fast.full_sort_predict(batch)
    assert not torch.equal(expected, torch.zeros_like(expected))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_rand_dropout_keeps_the_expected_fraction_and_scale():
    torch.manual_seed(0)
    x = torch.ones(200_000)
    dropout = RandDropout(0.3).train()
    y = dropout(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.01
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.7))
    assert torch.equal(RandDropout(0.3).eval()(x), x)
    assert torch.equal(RandDropout(0.0).train()(x), x)
    assert torch.equal(RandDropout(1.0).train()(x), torch.zeros_like(x))


def test_swapped_dropout_keeps_the_mode_of_the_layer_it_replaces():
    model, _ = _tiny_sasrec(fast_kernels=False)
    model.eval()  # e.g. a frozen backbone
    use_fast_kernels(model)
    swapped = [m for m in model.modules() if isinstance(m, RandDropout)]
    assert swapped and not any(m.training for m in swapped)


def test_modules_of_other_libraries_are_left_alone():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
    assert use_fast_kernels(model) == {"gelu": 0, "dropout": 0}
    assert type(model[1]) is torch.nn.Dropout
