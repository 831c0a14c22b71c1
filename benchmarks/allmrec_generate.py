"""ALLMRec's free-text answers (the paper's §5.4.4 favourite-genre task) against their controls.

    python -m benchmarks.allmrec_generate --checkpoint saved/ALLMRec-<date>.pth

For seeded test users of a trained ALLMRec checkpoint, the LLM completes ``--question`` twice with
greedy decoding: with the user's soft tokens in the prompt (ALLMRec) and with the same prompt
without any soft token (LLM-Only). The genres named in each answer are read with a small word
list and compared with the genres of the user's whole training history:

- ``top-1 named``: the user's most frequent genre is among the genres named;
- ``precision``: the share of named genres that are among the user's 3 most frequent genres
  (answers that name no genre are left out and counted in ``names a genre``).

Controls, scored the same way: a fixed answer naming the 3 most frequent genres of all training
interactions (popularity), 3 random genres (exact expectation), and the 3 most frequent genres of
the history titles shown in the prompt (what a perfect reader of the prompt would answer).
"""
import argparse
import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import write_report
from recbole_llm.quick_start import load_data_and_model

ROOT = Path(__file__).resolve().parents[1]
TOP = 3
# genre -> words that name it in free text (word-boundary matches, case-insensitive)
ALIASES = {"Sci-Fi": ["sci-fi", "science fiction", "sci fi"], "Children's": ["children's", "children", "kids", "family"],
           "Film-Noir": ["film-noir", "film noir", "noir"], "Musical": ["musical", "musicals"],
           "Romance": ["romance", "romantic"], "Comedy": ["comedy", "comedies"],
           "Documentary": ["documentary", "documentaries"], "Animation": ["animation", "animated"],
           "Mystery": ["mystery", "mysteries"], "Thriller": ["thriller", "thrillers"], "Drama": ["drama", "dramas"],
           "Western": ["western", "westerns"], "Horror": ["horror"], "Action": ["action"],
           "Adventure": ["adventure", "adventures"], "Crime": ["crime"], "War": ["war"], "Fantasy": ["fantasy"]}


def named_genres(answer, genres):
    """The genres of ``genres`` that ``answer`` names (by the genre's own name or an alias)."""
    text = answer.lower()
    return {g for g in genres
            if any(re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", text) for w in [g.lower(), *ALIASES.get(g, [])])}


def item_genres(config, dataset, field):
    """Per item id, its list of genre names: the item file's ``field`` rendered by the dataset's
    text templates (a genre name holds no space or comma)."""
    config["item_genre_template"] = "{" + field + "}"
    return [[g for g in re.split(r"[,\s]+", text) if g] for text in dataset.texts("item", "item_genre_template")]


def top_genres(items, genres_of, order):
    """The ``TOP`` most frequent genres of ``items``; ties broken by the global order."""
    counts = Counter(g for i in items for g in genres_of[i])
    return sorted(counts, key=lambda g: (-counts[g], order.index(g)))[:TOP]


def score(named, truth):
    """(names a genre, top-1 named, precision or None)."""
    if not named:
        return 0, int(False), None
    return 1, int(truth[0] in named), len(named & set(truth)) / len(named)


def summarise(rows):
    named = np.array([r[0] for r in rows])
    top1 = np.array([r[1] for r in rows])
    precision = np.array([r[2] for r in rows if r[2] is not None])
    n = len(rows)
    se = lambda x: float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")  # noqa: E731
    return {"names a genre": float(named.mean()), "top-1 named": float(top1.mean()), "top-1 se": se(top1),
            "precision": float(precision.mean()) if len(precision) else float("nan"), "precision se": se(precision),
            "users": n}


def test_rows(test_data):
    """The first row of every user of the test loader (its history is the prompt's)."""
    seen, rows = set(), []
    for batch in test_data:
        interaction = batch[0]
        users = interaction[test_data._dataset.uid_field].tolist()
        for index, user in enumerate(users):
            if user not in seen:
                seen.add(user)
                rows.append((user, interaction[torch.tensor([index])]))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a trained ALLMRec checkpoint (saved/ALLMRec-*.pth)")
    parser.add_argument("--question", default="The movie genres this user likes most are",
                        help="text after the history; SmolLM2-135M-Instruct ends its answer at once after a "
                             "question without a chat template, so the default is a sentence to complete")
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--max_new_tokens", type=int, default=40)
    parser.add_argument("--genre_field", default="class")
    parser.add_argument("--examples", type=int, default=5, help="answers shown in full in the report")
    parser.add_argument("--out", default=str(ROOT / "results" / "allmrec_generate_ml-100k.md"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    config, model, dataset, train_data, _, test_data = load_data_and_model(args.checkpoint)
    model.eval()
    genres_of = item_genres(config, dataset, args.genre_field)
    known = sorted({g for genres in genres_of for g in genres} - {"unknown"})
    train_items = train_data._dataset.inter_feat[train_data._dataset.iid_field].tolist()
    order = [g for g, _ in Counter(g for i in train_items for g in genres_of[i]).most_common()] + known
    popular = set(order[:TOP])

    # users whose training history has genres (cold users of a cold-user scenario may have none)
    candidates = [(user, row) for user, row in test_rows(test_data)
                  if top_genres(model.history_sets[user], genres_of, order)]
    pick = np.random.default_rng(int(config["seed"])).permutation(len(candidates))[: args.users]
    records = []
    for k, index in enumerate(sorted(pick)):
        user, row = candidates[index]
        truth = top_genres(model.history_sets[user], genres_of, order)
        shown = model.history(row, 0).tolist()
        answers = {name: model.generate(row.to(model.device), args.question, args.max_new_tokens,
                                        soft_tokens=tokens)[0]
                   for name, tokens in (("ALLMRec", True), ("LLM-Only", False))}
        records.append({"user": dataset.id2token(dataset.uid_field, user), "truth": truth,
                        "shown": [model.titles[i] for i in shown], "shown_top": top_genres(shown, genres_of, order),
                        "answers": answers, "named": {k: sorted(named_genres(a, known)) for k, a in answers.items()}})
        print(f"[{k + 1}/{len(pick)}] user {records[-1]['user']}: truth {truth}; "
              + "; ".join(f"{name}: {sorted(named)}" for name, named in records[-1]["named"].items()), flush=True)

    results = {name: summarise([score(set(r["named"][name]), r["truth"]) for r in records])
               for name in ("ALLMRec", "LLM-Only")}
    results["popular genres"] = summarise([score(popular, r["truth"]) for r in records])
    results["genres of the shown titles"] = summarise([score(set(r["shown_top"]), r["truth"]) for r in records])
    random_top1 = TOP / len(known)  # 3 random genres contain the user's top genre / are in its top 3
    runs = ROOT / "results" / "runs" / "allmrec_generate"
    runs.mkdir(parents=True, exist_ok=True)
    (runs / (Path(args.out).stem + ".json")).write_text(json.dumps({"args": vars(args), "results": results,
                                                                    "records": records}, indent=1))

    lines = [
        "# ALLMRec free text: which genres does this user like?",
        "",
        f"Command: `python -m benchmarks.allmrec_generate --checkpoint {args.checkpoint} --users {args.users} "
        f"--max_new_tokens {args.max_new_tokens}`",
        "",
        f"Checkpoint: {config['model']} on {config['dataset']}, LLM {config['llm']}, stages {config['stages']}, "
        f"{config['stage2_max_samples']} stage-2 samples, history of {config['history_len']} titles. "
        f"Question: \"{args.question}\"; greedy decoding, at most {args.max_new_tokens} new tokens. "
        f"{len(records)} seeded test users (of those whose training history is not empty). Truth: the user's {TOP} most frequent genres over the whole training "
        "history (ties broken by overall frequency). Per-user answers: "
        f"`results/runs/allmrec_generate/{Path(args.out).stem}.json`.",
        "",
        "| answer | names a genre | top-1 named ± SE | precision (named genres in the user's top 3) ± SE |",
        "|---|---|---|---|",
        *(f"| {name} | {r['names a genre']:.2f} | {r['top-1 named']:.2f} ± {r['top-1 se']:.2f} | "
          f"{r['precision']:.2f} ± {r['precision se']:.2f} |" for name, r in results.items()),
        f"| random {TOP} genres (exact expectation) | 1.00 | {random_top1:.2f} | {random_top1:.2f} |",
        "",
        f"Popular genres: {', '.join(order[:TOP])}.",
        "",
        f"Examples (the first {args.examples} of the seeded users, in id order):",
        "",
        "| user | shown titles (last 3) | user's top genres | ALLMRec | LLM-Only |",
        "|---|---|---|---|---|",
        *(f"| {r['user']} | {'; '.join(r['shown'][-3:])} | {', '.join(r['truth'])} | "
          f"{r['answers']['ALLMRec'].replace('|', '/').replace(chr(10), ' ')} | "
          f"{r['answers']['LLM-Only'].replace('|', '/').replace(chr(10), ' ')} |" for r in records[: args.examples]),
    ]
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
