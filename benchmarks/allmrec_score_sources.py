"""What does a trained ALLMRec variant rank by? Its candidate scores next to LLM-Only's (the same
prompt's title prior), the frozen backbone's and Pop's, on the same seeded uni19 candidates.

The variant's weights are the ones ``allmrec_compare`` kept for ``--runs``; nothing trains. Each
model's score of every (user, candidate) is recorded from ``predict`` during RecBole's seeded
evaluation (the same users and negatives as the comparison tables) and stored per model under
``--scores_dir`` (reused when run again, so the LLM models can run in parallel with ``--kinds``).
Prints per-user Spearman and top-1 agreement with each control, a within-user regression of the
trained scores on LLM-Only's and the backbone's, and Hit@1 of each score and of the trained score
minus LLM-Only's (what the variant's tokens add to each title's log-likelihood).

    nice -n 10 python -m benchmarks.allmrec_score_sources --runs results/allmrec_runs/ml-100k-score-sum-bb10 \\
        --variant LLM-score-token-word-5to20 --users 300 --out results/allmrec_score_sources_ml-100k.md
"""
import argparse
import json
import math
import pickle
import shlex
import sys
from pathlib import Path

import numpy as np
import yaml
from scipy.stats import spearmanr

from benchmarks.allmrec_compare import EVALUATION_SETTINGS, ROOT, variant_trainer, weights_path
from benchmarks.common import cpu_description, parse_sets, write_report
from recbole_llm.quick_start import evaluate_seeded

KINDS = ("pop", "sasrec", "llm_only", "trained")


def record_scores(kind, dataset, settings, runs, variant):
    """``({(user, item): score}, {user: test item})`` of one model on the seeded test candidates."""
    name = {"pop": "Pop", "sasrec": "SASRec", "llm_only": "LLM-Only", "trained": variant}[kind]
    weights = weights_path(runs, variant, settings) if kind == "trained" else None
    config, trainer, (_, _, test_data, _), _ = variant_trainer(name, dataset, settings, weights)
    model, batches = trainer.model, []
    predict = model.predict

    def recording_predict(interaction):
        scores = predict(interaction)
        batches.append((interaction[config["USER_ID_FIELD"]].tolist(), interaction[config["ITEM_ID_FIELD"]].tolist(),
                        scores.detach().float().cpu().tolist()))
        return scores

    model.predict = recording_predict
    result = evaluate_seeded(trainer, test_data)
    print(kind, dict(result), flush=True)
    table = {(u, i): s for users, items, scores in batches for u, i, s in zip(users, items, scores)}
    inter = test_data._dataset.inter_feat
    positives = dict(zip(inter[config["USER_ID_FIELD"]].tolist(), inter[config["ITEM_ID_FIELD"]].tolist()))
    return table, positives


def analyse(tables, positives):
    by_user = {}
    for u, i in tables["trained"]:
        by_user.setdefault(u, []).append(i)
    column = lambda kind, u: np.array([tables[kind][(u, i)] for i in by_user[u]])  # noqa: E731
    lines = ["| compared with | per-user Spearman (mean ± SE) | top-1 agreement |", "|---|---|---|"]
    for other in ("llm_only", "sasrec", "pop"):
        rhos = [spearmanr(column("trained", u), column(other, u)).correlation for u in by_user]
        agree = [by_user[u][column("trained", u).argmax()] == by_user[u][column(other, u).argmax()] for u in by_user]
        lines.append(f"| {other} | {np.nanmean(rhos):.3f} ± {np.nanstd(rhos) / math.sqrt(len(rhos)):.3f} | "
                     f"{np.mean(agree):.3f} |")
    standard = lambda v: (v - v.mean()) / (v.std() + 1e-9)  # noqa: E731
    X = np.concatenate([np.stack([standard(column("llm_only", u)), standard(column("sasrec", u))], 1) for u in by_user])
    y = np.concatenate([standard(column("trained", u)) for u in by_user])
    lines += ["", "| trained scores regressed on (standardised within user) | R² | coefficients |", "|---|---|---|"]
    for name, cols in (("llm_only", [0]), ("sasrec", [1]), ("llm_only + sasrec", [0, 1])):
        coef = np.linalg.lstsq(X[:, cols], y, rcond=None)[0]
        lines.append(f"| {name} | {1 - ((y - X[:, cols] @ coef) ** 2).sum() / (y ** 2).sum():.3f} | "
                     f"{np.round(coef, 3).tolist()} |")
    added = lambda u: column("trained", u) - column("llm_only", u)  # noqa: E731  what the tokens add
    rhos = [spearmanr(added(u), column("sasrec", u)).correlation for u in by_user]
    lines += ["", f"What the tokens add to each title's score (trained minus llm_only) against the backbone's score: "
              f"per-user Spearman {np.nanmean(rhos):.3f} ± {np.nanstd(rhos) / math.sqrt(len(rhos)):.3f}."]

    def hit_at_1(name, score):  # score(u): one value per candidate of by_user[u]
        hits = [by_user[u][int(np.argmax(score(u)))] == positives[u] for u in by_user]
        p = float(np.mean(hits))
        return f"| {name} | {p:.3f} ± {math.sqrt(p * (1 - p) / len(hits)):.3f} |"

    lines += ["", "| ranked by | Hit@1 ± binomial SE |", "|---|---|"]
    lines += [hit_at_1(kind, lambda u, k=kind: column(k, u)) for kind in KINDS]
    # how much of the prior to take out (1: score_calibration prompt_prior); read as a curve, not tuned on test
    lines += [hit_at_1(f"trained minus {w} x llm_only", lambda u, w=w: column("trained", u) - w * column("llm_only", u))
              for w in (0.5, 1, 1.5)]
    # no-training control: does the LLM's own title prior add anything to the backbone's ranking?
    lines += [hit_at_1(f"sasrec + {w} x llm_only (each standardised within user)",
                       lambda u, w=w: standard(column("sasrec", u)) + w * standard(column("llm_only", u)))
              for w in (0.1, 0.25, 0.5, 1)]
    lines += ["", f"Users: {len(by_user)}; candidates per user: {max(len(v) for v in by_user.values())}."]
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--runs", required=True, help="an allmrec_compare --runs folder holding the variant")
    parser.add_argument("--variant", required=True)
    parser.add_argument("--users", type=int, default=300, help="eval_max_users of the evaluation")
    parser.add_argument("--kinds", nargs="*", default=list(KINDS), help=f"record only these of {KINDS}, then stop")
    parser.add_argument("--scores_dir", default=str(ROOT / "saved" / "allmrec_score_sources"))
    parser.add_argument("--out", default=None, help="markdown report to write")
    parser.add_argument("--set", nargs="*", default=[],
                        help="key=value overrides of the settings that do not change the scores (torch_threads, show_progress)")
    args = parser.parse_args()
    record = json.loads((Path(args.runs) / f"{args.variant}.json").read_text())
    settings = {**(yaml.safe_load((ROOT / "benchmarks" / "allmrec_compare.yaml").read_text()) or {}),
                **record["settings"], "eval_max_users": args.users}
    overrides, allowed = parse_sets(args.set), EVALUATION_SETTINGS - {"eval_max_users"}
    if set(overrides) - allowed:
        raise SystemExit(f"--set {sorted(set(overrides) - allowed)}: only {sorted(allowed)} may differ from the "
                         "variant's stored settings")
    settings.update(overrides)
    tables, positives = {}, None
    for kind in args.kinds:
        path = Path(args.scores_dir) / f"{Path(args.runs).name}-{args.variant}-{args.users}-{kind}.pkl"
        if path.exists():
            tables[kind], found = pickle.loads(path.read_bytes())
        else:
            tables[kind], found = record_scores(kind, args.dataset, settings, args.runs, args.variant)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(pickle.dumps((tables[kind], found)))
        positives = found or positives  # the test item of each user (LLM-Only's file may hold none)
    if set(tables) != set(KINDS):
        return
    command = "nice -n 10 python -m benchmarks.allmrec_score_sources " + shlex.join(sys.argv[1:])
    cpu, flags = cpu_description()
    candidates = max(len([k for k in tables["trained"] if k[0] == u]) for u in positives)
    lines = [f"# What {args.variant} ranks by", "", f"Produced by `{command}` ({cpu} with {', '.join(flags)}). "
             f"Chance Hit@1: {1 / candidates:.3f} (1 positive among {candidates} candidates).", "",
             *analyse(tables, positives)]
    if args.out:
        write_report(args.out, lines)
    else:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
