"""Per-user training histories, for prompts that list what a user interacted with.

Works on the training split of any RecBole dataset: a general one (one row per interaction) or a
sequential one after RecBole's data augmentation (one row per prefix, ``item_id_list`` + target).
Histories hold internal item ids in chronological order; id 0 (padding) never appears. A
sequential split only keeps the last ``MAX_ITEM_LIST_LENGTH`` + 1 items of each user, which is
plenty for prompts (they list the last few).
"""
import numpy as np


def user_histories(train_dataset):
    """``histories[u]`` = numpy array of user ``u``'s training items, oldest first (empty if none).

    ``train_dataset`` is the built training split (``train_data.dataset``); its rows are in
    RecBole's order, which is chronological within a user under ``order: TO``.
    """
    feat = train_dataset.inter_feat
    uid_field, iid_field = train_dataset.uid_field, train_dataset.iid_field
    histories = [np.zeros(0, dtype=np.int64) for _ in range(train_dataset.user_num)]
    users = feat[uid_field].numpy()
    items = feat[iid_field].numpy()
    list_field = getattr(train_dataset, "item_id_list_field", None)
    if list_field is not None and list_field in feat:
        # Sequential: the user's last (longest) prefix plus its target is the training history.
        lengths = feat[train_dataset.item_list_length_field].numpy()
        sequences = feat[list_field].numpy()
        longest = {}
        for row, (user, length) in enumerate(zip(users, lengths)):
            if user not in longest or length >= lengths[longest[user]]:
                longest[user] = row
        for user, row in longest.items():
            histories[user] = np.append(sequences[row, : lengths[row]], items[row]).astype(np.int64)
        return histories
    order = np.argsort(users, kind="stable")
    users, items = users[order], items[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    for user, chunk in zip(users[starts], np.split(items, starts[1:])):
        histories[user] = chunk.astype(np.int64)
    return histories



def popular_history(histories, length):
    """The ``length`` items with the most training interactions in ``histories``, most popular
    first: one history for every user, so a judge shown it can only express an item prior."""
    counts = np.bincount(np.concatenate([np.zeros(0, dtype=np.int64), *histories]))
    counts[:1] = 0  # padding
    return np.argsort(-counts, kind="stable")[:length].astype(np.int64)
