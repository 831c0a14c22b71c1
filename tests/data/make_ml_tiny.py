"""Regenerate tests/data/ml-tiny/ from RecBole's bundled ml-100k: a real but tiny MovieLens slice.

Users whose id is a multiple of 16, items with at least 100 ratings in ml-100k; all their
interactions, item and user attributes. Run: python tests/data/make_ml_tiny.py
"""
import os
from pathlib import Path

import pandas as pd
import recbole

SOURCE = Path(recbole.__file__).parent / "dataset_example" / "ml-100k"
TARGET = Path(__file__).parent / "ml-tiny"


def main():
    read = lambda suffix: pd.read_csv(SOURCE / f"ml-100k.{suffix}", sep="\t", dtype=str, keep_default_na=False)
    inter, item, user = read("inter"), read("item"), read("user")
    popular = inter["item_id:token"].value_counts()
    items = set(popular[popular >= 100].index)
    users = {u for u in inter["user_id:token"].unique() if int(u) % 16 == 0}
    inter = inter[inter["item_id:token"].isin(items) & inter["user_id:token"].isin(users)]
    os.makedirs(TARGET, exist_ok=True)
    inter.to_csv(TARGET / "ml-tiny.inter", sep="\t", index=False)
    item[item["item_id:token"].isin(items)].to_csv(TARGET / "ml-tiny.item", sep="\t", index=False)
    user[user["user_id:token"].isin(users)].to_csv(TARGET / "ml-tiny.user", sep="\t", index=False)
    print(f"{len(inter)} interactions, {inter['user_id:token'].nunique()} users, {len(items)} items")


if __name__ == "__main__":
    main()
