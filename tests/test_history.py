"""Per-user training histories agree between general and sequential datasets."""
import numpy as np

from conftest import ML_TINY_YAML, tiny_config
from recbole_llm.config import Config
from recbole_llm.data.history import user_histories
from recbole_llm.utils import create_dataset, data_preparation

SASREC = {"hidden_size": 16, "inner_size": 32, "n_layers": 1, "n_heads": 1}
LEAVE_ONE_OUT = {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"}


def _histories(model, **extra):
    config = Config(model=model, config_file_list=[ML_TINY_YAML], config_dict=tiny_config(eval_args=LEAVE_ONE_OUT, **extra))
    dataset = create_dataset(config)
    train, _, _ = data_preparation(config, dataset)
    return dataset, user_histories(train.dataset)


def test_histories_are_chronological_training_items():
    dataset, histories = _histories("BPR")
    df = dataset.inter_feat
    uid, iid, time = dataset.uid_field, dataset.iid_field, dataset.time_field
    user = int(df[uid][0])
    rows = (df[uid] == user).numpy()
    times, items = df[time].numpy()[rows], df[iid].numpy()[rows]
    expected = items[np.argsort(times, kind="stable")][:-2]  # leave-one-out keeps 2 for valid/test
    assert histories[0].size == 0  # padding user
    np.testing.assert_array_equal(histories[user], expected)


def test_sequential_histories_match_general_ones_up_to_the_sequence_length():
    _, general = _histories("BPR")
    _, sequential = _histories("SASRec", MAX_ITEM_LIST_LENGTH=20, **SASREC)
    assert len(general) == len(sequential)
    assert any(len(g) > 21 for g in general)
    for user, (g, s) in enumerate(zip(general, sequential)):
        np.testing.assert_array_equal(s, g[-21:], err_msg=f"user {user}")
