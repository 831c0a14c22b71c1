"""Can a preference judge tell what THIS user wants, or only what is popular?

Proxy pairs on warm items, training rows only (no validation or test row is read): for every
user with more than ``aug_min_history`` training items, the positive is the user's last training
item and the judge sees only the items before it; the negative is a warm item the user never
interacted with, drawn at random (``random`` set) or with the training count closest to the
positive's among 50 random candidates (``popularity-matched`` set, where an item prior cannot
help). Every judge is asked with three histories:

* ``own``: the user's own earlier items;
* ``other user``: the history of a random other user (a permutation of the users);
* ``popular``: the same history for everyone, the 10 most popular training items
  (a user-independent judge).

``own - other user`` is what personalisation adds; the goal of issue 15 is >= 0.05 with a 95%
interval that excludes 0. A popularity judge (training counts before each user's last item) is
the item-prior control. Accuracy counts ties as one half; for a pairwise judge that is the AUC of
its pair score (P(score of the positive > score of the negative)). Intervals: binomial standard
error; paired differences: 95% normal interval over pairs.

    python -m benchmarks.judge_quality --judges llm_pointwise embedding --pairs 600
    python -m benchmarks.judge_quality --judges llm --pairs 300

Each (judge, pairs) run is stored as JSON under ``--runs`` (skipped when it exists); the table in
``--out`` is rebuilt from every stored run. Judgements are cached under ``cache_dir``.
"""
import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import cpu_description, write_report
from recbole_llm.config import Config
from recbole_llm.data.history import popular_history, user_histories
from recbole_llm.llm import judge as judges
from recbole_llm.quick_start import prepare

ROOT = Path(__file__).resolve().parents[1]
HISTORIES = ("own", "other user", "popular")
SETS = ("random", "popularity-matched")


def proxy_pairs(histories, known, counts, min_history, n_pairs, seed):
    """``{set: [n, 3] pairs}`` and the users, one pair per user per set (see module doc)."""
    rng = np.random.default_rng(seed)
    warm = np.flatnonzero(counts > 0)
    users = [u for u, h in enumerate(histories) if len(h) > min_history]
    users = sorted(rng.choice(users, size=min(n_pairs, len(users)), replace=False).tolist())
    random_rows, matched_rows = [], []
    for user in users:
        positive = int(histories[user][-1])
        unseen = [int(i) for i in rng.choice(warm, size=80) if int(i) not in known[user]]
        random_rows.append((user, positive, unseen[0]))
        candidates = unseen[1:51]
        gap = np.abs(np.log1p(counts[candidates]) - np.log1p(counts[positive]))
        matched_rows.append((user, positive, candidates[int(gap.argmin())]))
    return {"random": torch.tensor(random_rows), "popularity-matched": torch.tensor(matched_rows)}, users


def history_variants(before, users, popular, seed):
    """``{variant: histories}``: own, a random other user's (a derangement of ``users``), popular."""
    rng = np.random.default_rng(seed + 1)
    order = np.array(users)
    shifted = order[(np.arange(len(order)) + 1 + rng.integers(len(order) - 1)) % len(order)]  # never oneself
    mapping = dict(zip(order.tolist(), shifted.tolist()))
    other = [before[mapping[u]] if u in mapping else h for u, h in enumerate(before)]
    return {"own": before, "other user": other, "popular": [popular if len(h) else h for h in before]}


def judge_for(kind, config, histories, titles, texts, counts):
    if kind == "popularity":
        return judges.PopularityJudge(counts, "training-before-last")
    config["judge"] = kind
    return judges.judge_from_config(config, histories, titles, texts)


def accuracy(probs):
    p = probs.float().mean(1)
    return ((p > 0.5).float() + 0.5 * (p == 0.5).float()).numpy()


def run(args):
    config = Config(model="AugBPR", dataset=args.dataset, config_dict={
        "base_model": "BPR", "aug_weight": 0.0, "show_progress": False, "torch_threads": args.threads,
        "eval_item_groups": None, **({"llm": args.llm} if args.llm else {})}, command_line=False)
    dataset, train_data, valid_data, test_data = prepare(config)
    train = train_data._dataset
    histories = user_histories(train)
    known = [set(h.tolist()) for h in histories]
    for loader in (valid_data, test_data):  # never offer an item the user did interact with
        feat = loader._dataset.inter_feat
        for user, item in zip(feat[train.uid_field].tolist(), feat[train.iid_field].tolist()):
            known[user].add(item)
    before = [h[:-1] for h in histories]
    counts = np.bincount(np.concatenate([b for b in before] + [np.zeros(0, dtype=np.int64)]), minlength=train.item_num)
    counts[0] = 0
    min_history = int(config["aug_min_history"])
    pair_sets, users = proxy_pairs(histories, known, counts, min_history, args.pairs, args.seed)
    popular = popular_history(before, int(config["judge_history_len"]))
    variants = history_variants(before, users, popular, args.seed)
    title_key = "item_title_template" if config["item_title_template"] else "item_text_template"
    titles, texts = dataset.texts("item", title_key), dataset.texts("item", "item_text_template")
    # a user's pairs of both sets side by side: the pointwise judge scores a user's items in one pass
    everything = torch.stack([pair_sets[name] for name in SETS], dim=1).reshape(-1, 3)
    record = {"judge": args.judge, "dataset": args.dataset, "pairs_per_set": len(users), "seed": args.seed,
              "llm": config["llm"], "judge_item_text": config["judge_item_text"], "results": {}}
    for variant, variant_histories in variants.items():
        judge = judge_for(args.judge, config, variant_histories, titles, texts, counts)
        began = time.time()
        probs, _ = judges.judge_pairs(judge, everything, config["cache_dir"], show_progress=False)
        per_set = dict(zip(SETS, accuracy(probs).reshape(-1, len(SETS)).T.tolist()))
        record["results"][variant] = {"correct": per_set, "seconds": round(time.time() - began, 1)}
        print(f"{args.judge} / {variant}: " + ", ".join(f"{s} {np.mean(v):.3f}" for s, v in per_set.items()), flush=True)
        if args.judge == "popularity":
            break  # a popularity judge ignores histories
    return record


def write_table(runs_dir, out, command):
    cpu, flags = cpu_description()
    lines = ["# Judge quality: personal preference or item prior?", "", f"Command: `{command}`; "
             f"table rebuilt from every run in `{runs_dir}`.", "",
             f"Machine: {cpu} ({', '.join(flags)}). Proxy pairs on warm items from training rows only (see "
             "`benchmarks/judge_quality.py`). Accuracy (= pair AUC, ties one half) ± binomial SE; chance 0.5. "
             "`own - other` is paired per pair, with a 95% interval.", "",
             "| judge | pair set | pairs | own history | other user's history | popular history (user-independent) | own - other (95% CI) |",
             "|---|---|---|---|---|---|---|"]
    for path in sorted(Path(runs_dir).glob("*.json")):
        record = json.loads(path.read_text())
        for pair_set in SETS:
            cells, correct = [], {}
            for variant in HISTORIES:
                found = record["results"].get(variant)
                if found is None:
                    cells.append("-")
                    continue
                values = np.array(found["correct"][pair_set])
                correct[variant] = values
                cells.append(f"{values.mean():.3f} ± {math.sqrt(values.mean() * (1 - values.mean()) / len(values)):.3f}")
            if "other user" in correct:
                diff = correct["own"] - correct["other user"]
                gain = f"{diff.mean():+.3f} ± {1.96 * diff.std(ddof=1) / math.sqrt(len(diff)):.3f}"
            else:
                gain = "- (ignores histories)"
            name = record["judge"] + (f" ({record['llm']}, {record['judge_item_text']})" if record["judge"].startswith("llm") else "")
            lines.append(f"| {name} | {pair_set} | {record['pairs_per_set']} | " + " | ".join(cells) + f" | {gain} |")
    write_report(out, lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--judges", nargs="+", default=["popularity", "embedding", "llm_pointwise"],
                        choices=["popularity", *judges.JUDGES])
    parser.add_argument("--pairs", type=int, default=600, help="users (one pair per user per set)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llm", default=None, help="the LLM judges' model (default: AugBPR's `llm`)")
    parser.add_argument("--runs", default="results/runs/judge_quality")
    parser.add_argument("--out", default="results/judge_quality_ml-100k.md")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for kind in args.judges:
        llm = f"-{args.llm}" if args.llm and kind.startswith("llm") else ""
        path = Path(args.runs) / f"{args.dataset}-{kind}{llm}-{args.pairs}-seed{args.seed}.json"
        if path.exists():
            print(f"{path} exists; skipped")
            continue
        args.judge = kind
        record = run(args)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))
    write_table(args.runs, args.out, "python -m benchmarks.judge_quality " + " ".join(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    main()
