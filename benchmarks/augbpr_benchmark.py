"""AugBPR against its base models on cold-start items: BPR, NeuMF, SASRec x (base, LLM judges, embedding judge, random labels).

Every (base model, method, seed) run uses the same cold-start split (``cold_item_args`` of
``properties/model/AugBPR.yaml``: every training interaction with the newest 20% of items removed)
and the same judged pairs (sampled with ``aug_seed``, judged once and cached under ``cache_dir``).
``base`` is AugBPR with ``aug_weight: 0``, i.e. the base model trained alone on the same data and
from the same initial weights, nothing judged (``tests/test_augbpr.py`` checks that it equals a plain run).
Finished runs are stored as JSON under ``--runs_dir`` and skipped when the script is run again.

    nice -n 10 python -m benchmarks.augbpr_benchmark --dataset=ml-100k --bases BPR NeuMF SASRec --seeds 0 1 2

``--set key=value`` (yaml values) overrides every run; ``--set-SASRec key=value`` only that base's.
"""
import argparse
import json
import math
import os
import platform
import re
import time
from pathlib import Path

import numpy as np

from benchmarks.common import parse_scoped_sets, parse_sets, write_report
from recbole_llm.quick_start import objective_function

ROOT = Path(__file__).resolve().parents[1]

# method -> overrides of AugBPR; "-w<weight>" variants sweep aug_weight (the default 0.1 is AugBPR.yaml's)
METHODS = {"base": {"aug_weight": 0.0}}
# "-nn": cold-start items never sampled as training negatives (cold_item_args.negatives: false)
NO_COLD_NEGATIVES = {"cold_item_args": {"ratio": 0.2, "by": "time", "negatives": False}}
METHODS["base-nn"] = {"aug_weight": 0.0, **NO_COLD_NEGATIVES}
WEIGHTS = (0.01, 0.03, 0.3, 1.0)
CAPS = (0.5, 0.7, 1.0)
# judges: the paper's A/B LLM judge, the pointwise (PMI) LLM judge, text-embedding similarity, and
# random labels (the control: what does adding any pairs at this weight do?)
for _judge, _label in (("llm", "llm"), ("llm_pointwise", "pw"), ("embedding", "emb"), ("random", "random")):
    METHODS[f"AugBPR-{_label}"] = {"judge": _judge}
    METHODS.update({f"AugBPR-{_label}-w{w}": {"judge": _judge, "aug_weight": w} for w in WEIGHTS})
    # "-cw": each judged (user, cold item) also judged against one unseen warm item (not in the paper)
    METHODS[f"AugBPR-{_label}-cw"] = {"judge": _judge, "aug_warm_pairs_per_user": 1}
    # "-k<share>": only that share of the judged pairs, the most confident ones
    METHODS.update({f"AugBPR-{_label}-k{k}": {"judge": _judge, "aug_keep_fraction": k} for k in (0.25, 0.5)})
    METHODS[f"AugBPR-{_label}-nn"] = {"judge": _judge, **NO_COLD_NEGATIVES}
    # "-pop": the judge shown one popular history for every user (an item prior, nothing personal)
    METHODS[f"AugBPR-{_label}-pop"] = {"judge": _judge, "judge_history": "popular"}
    METHODS[f"AugBPR-{_label}-cw-nn"] = {"judge": _judge, "aug_warm_pairs_per_user": 1, **NO_COLD_NEGATIVES}
    # "-soft": the judge's probability as the BPR target (aug_label: soft), with its -pop control
    METHODS[f"AugBPR-{_label}-soft"] = {"judge": _judge, "aug_label": "soft"}
    METHODS[f"AugBPR-{_label}-soft-pop"] = {"judge": _judge, "aug_label": "soft", "judge_history": "popular"}
    # the cold-among-all-items options at other weights: how much upward push keeps warm items in place?
    for _suffix in ("cw", "nn", "cw-nn"):
        METHODS.update({f"AugBPR-{_label}-{_suffix}-w{w}": {**METHODS[f"AugBPR-{_label}-{_suffix}"], "aug_weight": w}
                        for w in WEIGHTS})
    # "-cap<r>": cold rows of the item embeddings capped at r x the mean warm norm (aug_cold_norm_cap)
    for _suffix in ("cw", "nn", "cw-nn"):
        METHODS.update({f"AugBPR-{_label}-{_suffix}-cap{r}": {**METHODS[f"AugBPR-{_label}-{_suffix}"],
                                                               "aug_cold_norm_cap": r} for r in CAPS})
    # "-items": the aux loss moves only the item-embedding tables (aug_loss_moves), not the users
    for _option in ("nn", "cw-nn", *(f"{o}-cap{r}" for o in ("nn", "cw-nn") for r in CAPS)):
        METHODS[f"AugBPR-{_label}-{_option}-items"] = {**METHODS[f"AugBPR-{_label}-{_option}"],
                                                       "aug_loss_moves": "items"}
DEFAULT_METHODS = ["base", "AugBPR-llm", "AugBPR-emb"]
# base model -> settings that keep its runs affordable on 2 CPU cores
BASES = {
    "BPR": {"epochs": 100, "stopping_step": 10},
    "NeuMF": {"epochs": 100, "stopping_step": 10},
    "SASRec": {"epochs": 30, "stopping_step": 5, "MAX_ITEM_LIST_LENGTH": 20},
}
GROUPS = ("cold_start_items@cold", "cold_start_items", "warm_start_items", "test")
METRICS = ("recall@10", "recall@50")


def run_config(base, method, dataset, seed, overrides):
    return {"model": "AugBPR", "dataset": dataset, "base_model": base, "seed": seed, "torch_threads": 1,
            "show_progress": False, "state": "ERROR", **BASES[base], **overrides, **METHODS[method]}


def run_one(base, method, dataset, seed, overrides):
    config = run_config(base, method, dataset, seed, overrides)
    began = time.time()
    result = objective_function(config_dict=config, command_line=False)
    groups = {"test": result["test_result"], **result["group_results"]}
    return {"base": base, "method": method, "dataset": dataset, "seed": seed, "config": config,
            "seconds": round(time.time() - began, 1),
            "best_valid": dict(result["best_valid_result"] or {}),
            "valid_groups": {k: dict(v) for k, v in result.get("valid_group_results", {}).items()},
            "groups": {k: dict(v) for k, v in groups.items()},
            "group_users": result.get("group_users", {}),
            "chance": {"test": result.get("chance_result"), **result.get("group_chance", {})},
            "extra": result.get("extra_results", {})}


def describe_missing(missing):
    """``[(base, method, seed), ...]`` -> "SASRec base (seeds 1, 2), ..." in the order given."""
    seeds = {}
    for base, method, seed in missing:
        seeds.setdefault((base, method), []).append(str(seed))
    return ", ".join(f"{b} {m} (seed{'s' if len(s) > 1 else ''} {', '.join(s)})" for (b, m), s in seeds.items())


def goal_verdict(cold_b, cold_o, warm_b, warm_o):
    """(relative warm change, "met"/"not met"): cold Recall@50 up, warm down by at most 2%."""
    change = (warm_o - warm_b) / warm_b if warm_b else float("nan")
    return change, "met" if cold_o > cold_b and change >= -0.02 else "not met"


def mean_std(values):
    values = np.asarray(values, dtype=float)
    return values.mean(), (values.std(ddof=1) if len(values) > 1 else 0.0)


def results_table(runs, bases, methods):
    header = "| base | method | " + " | ".join(f"{g} {m}" for g in GROUPS[:3] for m in METRICS) + " | runs |"
    lines = [header, "|---|---|" + "---|" * (len(GROUPS[:3]) * len(METRICS) + 1)]
    for base in bases:
        for method in methods:
            found = [r for r in runs if r["base"] == base and r["method"] == method]
            if not found:
                continue
            cells = []
            for group in GROUPS[:3]:
                for metric in METRICS:
                    m, s = mean_std([r["groups"][group][metric] for r in found])
                    cells.append(f"{m:.4f} ± {s:.4f}")
            lines.append(f"| {base} | {method} | " + " | ".join(cells) + f" | {len(found)} |")
    chance = next((r["chance"] for r in runs if r.get("chance", {}).get("test")), None)
    if chance:  # the split is the same for every run, so is a random ranking's expectation
        cells = [f"{chance[g][m]:.4f}" for g in GROUPS[:3] for m in METRICS]
        lines.append("| any | chance (random ranking, exact) | " + " | ".join(cells) + " | - |")
    return "\n".join(lines)


def goal_table(runs, bases, methods):
    """Cold Recall@50 up and warm Recall@50 down by at most 2% relative, paired per seed; and the
    seeds where the method's cold Recall@50 beats its item-prior control (the same judge shown a
    popular history, ``-pop``), when that was run."""
    lines = ["| base | method | cold@cold R@50: base (or base-nn) → AugBPR | cold (all items) R@50 | warm R@50 | warm change "
             "| warm change vs base | seeds cold up | seeds above its -pop control | goal |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for base in bases:
        for method in methods:
            if method.startswith("base"):
                continue
            reference = "base-nn" if "-nn" in method else "base"  # the same training data
            plain = {r["seed"]: r for r in runs if r["base"] == base and r["method"] == reference}
            ours = {r["seed"]: r for r in runs if r["base"] == base and r["method"] == method}
            seeds = sorted(set(plain) & set(ours))
            if not seeds:
                continue
            value = lambda rs, g: np.mean([rs[s]["groups"][g]["recall@50"] for s in seeds])  # noqa: E731
            cold_b, cold_o = value(plain, "cold_start_items@cold"), value(ours, "cold_start_items@cold")
            all_b, all_o = value(plain, "cold_start_items"), value(ours, "cold_start_items")
            warm_b, warm_o = value(plain, "warm_start_items"), value(ours, "warm_start_items")
            up = sum(ours[s]["groups"]["cold_start_items@cold"]["recall@50"]
                     > plain[s]["groups"]["cold_start_items@cold"]["recall@50"] for s in seeds)
            change, goal = goal_verdict(cold_b, cold_o, warm_b, warm_o)
            # "-nn" rows are compared with base-nn (the same training data); a user would otherwise serve base
            served = {r["seed"]: r for r in runs if r["base"] == base and r["method"] == "base"}
            vs_base = (f"{100 * (warm_o / value(served, 'warm_start_items') - 1):+.1f}%"
                       if set(seeds) <= set(served) else "-")
            control = {r["seed"]: r for r in runs if r["base"] == base and r["method"] == method + "-pop"}
            both = sorted(set(control) & set(ours))
            above = (f"{sum(ours[s]['groups']['cold_start_items@cold']['recall@50'] > control[s]['groups']['cold_start_items@cold']['recall@50'] for s in both)}/{len(both)}"
                     if both else "-")
            lines.append(f"| {base} | {method} | {cold_b:.4f} → {cold_o:.4f} | {all_b:.4f} → {all_o:.4f} | "
                         f"{warm_b:.4f} → {warm_o:.4f} | {100 * change:+.1f}% | {vs_base} | {up}/{len(seeds)} | {above} | {goal} |")
    return "\n".join(lines)


COLD_AMONG_ALL = ("cw", "nn", "cw-nn")


def cold_among_all_table(runs, bases):
    """Goal (c), per base model and judge: among the cold-among-all-items options (``-cw``, ``-nn``,
    ``-cw-nn``, any weight or cap), the one with the best validation cold-among-all Recall@50
    whose validation warm Recall@50 is within 2% of base's; its test figures next to chance, the
    random-label control with the same option and the served base. Interval: binomial SE over the
    group's test users (the rows are the same for every seed, so seeds do not shrink it)."""
    lines = ["| base | judge | options tried | chosen (validation) | test cold (all items) R@50 ± SE | chance | "
             "random labels, same option | test warm R@50: base → chosen | warm change | goal (c) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    mean = lambda rs, key, g: float(np.mean([r[key][g]["recall@50"] for r in rs]))  # noqa: E731
    users = next((r["group_users"]["cold_start_items"] for r in runs if r.get("group_users", {}).get("cold_start_items")),
                 None)
    for base in bases:
        plain = [r for r in runs if r["base"] == base and r["method"] == "base"]
        if not plain or not all("warm_start_items" in r["valid_groups"] for r in plain):
            continue
        seeds = {r["seed"] for r in plain}
        chance = next((r["chance"]["cold_start_items"]["recall@50"] for r in runs if r.get("chance", {}).get("cold_start_items")),
                      float("nan"))  # the same split for every run
        for label in ("llm", "pw", "emb"):
            family = {}
            for r in runs:
                option = r["method"].removeprefix(f"AugBPR-{label}-")
                if (r["base"] == base and r["seed"] in seeds and r["method"].startswith(f"AugBPR-{label}-")
                        and re.split(r"-w|-cap|-items", option)[0] in COLD_AMONG_ALL):
                    family.setdefault(r["method"], []).append(r)
            family = {m: rs for m, rs in family.items() if {r["seed"] for r in rs} == seeds}
            if not family:
                continue
            plain_warm = mean(plain, "valid_groups", "warm_start_items")
            allowed = [m for m, rs in family.items() if mean(rs, "valid_groups", "warm_start_items") >= 0.98 * plain_warm]
            method = (max(allowed, key=lambda m: mean(family[m], "valid_groups", "cold_start_items")) if allowed
                      else max(family, key=lambda m: mean(family[m], "valid_groups", "warm_start_items")))
            rs = family[method]
            cold = mean(rs, "groups", "cold_start_items")
            se = math.sqrt(cold * (1 - cold) / users) if users else float("nan")
            control = [r for r in runs if r["base"] == base and r["seed"] in seeds
                       and r["method"] == method.replace(f"AugBPR-{label}-", "AugBPR-random-", 1)]
            control_cell = (f"{mean(control, 'groups', 'cold_start_items'):.4f}"
                            if {r["seed"] for r in control} == seeds else "not run")
            warm_b, warm_o = mean(plain, "groups", "warm_start_items"), mean(rs, "groups", "warm_start_items")
            change = warm_o / warm_b - 1
            goal = "met" if cold > 0 and change >= -0.02 else "not met"
            lines.append(f"| {base} | {label} | {len(family)} | {method}{'' if allowed else ' (none within 2%: the smallest warm loss)'} | "
                         f"{cold:.4f} ± {se:.4f} | {chance:.4f} | {control_cell} | {warm_b:.4f} → {warm_o:.4f} | "
                         f"{100 * change:+.1f}% | {goal} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def judge_table(runs):
    """Judge accuracy on held-out truth pairs and judging cost, one row per judge."""
    lines = ["| judge | pairs judged | kept | judging s (first run) | pairs/s | first shown wins | orders agree | "
             "held-out accuracy (chance 0.5) | truth pairs |", "|---|---|---|---|---|---|---|---|---|"]
    judged = [r for r in runs if r["extra"].get("judging")]
    kinds = [(j, w, h) for j in ("llm", "llm_pointwise", "embedding", "random") for w in (0, 1) for h in ("own", "popular")]
    for judge, warm, history in kinds:
        found = [r for r in judged if r["config"].get("judge", "llm") == judge
                 and r["config"].get("aug_warm_pairs_per_user", 0) == warm
                 and r["config"].get("judge_history", "own") == history]
        if not found:
            continue
        first = max(found, key=lambda r: r["extra"]["judging"]["computed"])  # the run that paid for judging
        j, acc = first["extra"]["judging"], first["extra"].get("judge_accuracy", {})
        paid = j["computed"] > 0  # else every stored run read the judgements from an earlier run's cache
        seconds, rate = (j["seconds"], j["pairs_per_s"]) if paid else ("cached by an earlier run", "-")
        shown = judge + (" + warm pairs" if warm else "") + (" (popular history for everyone)" if history == "popular" else "")
        lines.append(f"| {shown} | {j['pairs']} | {j['kept']} | {seconds} | {rate} | "
                     f"{j.get('first_shown_wins', '-')} | {j.get('orders_agree', '-')} | {acc.get('accuracy', '-')} | {acc.get('pairs', '-')} |")
    return "\n".join(lines)


def valid_choice_table(runs, bases):
    """aug_weight or aug_keep_fraction chosen on validation only: per base model and judge, the
    setting with the best mean validation cold@cold Recall@50 among those whose validation warm
    Recall@50 drops by <= 2%."""
    lines = ["| base | judge | settings tried | chosen (validation) | test cold@cold R@50: base → chosen | "
             "test warm R@50: base → chosen | warm change | goal |", "|---|---|---|---|---|---|---|---|"]
    mean = lambda rs, key, g: float(np.mean([r[key][g]["recall@50"] for r in rs]))  # noqa: E731
    for base in bases:
        plain = [r for r in runs if r["base"] == base and r["method"] == "base"]
        if not plain or not all("warm_start_items" in r["valid_groups"] for r in plain):
            continue
        seeds, plain_valid_warm = {r["seed"] for r in plain}, mean(plain, "valid_groups", "warm_start_items")
        for label in ("llm", "pw", "emb", "random"):
            family = sorted({r["method"] for r in runs if r["base"] == base and (
                r["method"] in (f"AugBPR-{label}", f"AugBPR-{label}-soft")
                or r["method"].startswith((f"AugBPR-{label}-w", f"AugBPR-{label}-k")))})
            if len(family) < 2:
                continue
            candidates = []
            for method in family:
                rs = [r for r in runs if r["base"] == base and r["method"] == method and r["seed"] in seeds]
                if {r["seed"] for r in rs} != seeds:
                    continue
                warm = mean(rs, "valid_groups", "warm_start_items") / plain_valid_warm - 1
                candidates.append((warm >= -0.02, mean(rs, "valid_groups", "cold_start_items@cold"), method, rs))
            allowed = [c for c in candidates if c[0]] or candidates
            _, _, method, rs = max(allowed, key=lambda c: c[1])
            setting = (f"aug_weight {rs[0]['config'].get('aug_weight', 0.1)}, keep {rs[0]['config'].get('aug_keep_fraction', 1.0)}, "
                       f"{rs[0]['config'].get('aug_label', 'hard')} labels")
            cold_b, cold_o = mean(plain, "groups", "cold_start_items@cold"), mean(rs, "groups", "cold_start_items@cold")
            warm_b, warm_o = mean(plain, "groups", "warm_start_items"), mean(rs, "groups", "warm_start_items")
            change, goal = goal_verdict(cold_b, cold_o, warm_b, warm_o)
            lines.append(f"| {base} | {label} | {len(candidates)} | {method} ({setting}) | {cold_b:.4f} → {cold_o:.4f} | "
                         f"{warm_b:.4f} → {warm_o:.4f} | {100 * change:+.1f}% | {goal} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--bases", nargs="+", default=list(BASES), choices=list(BASES))
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=None, help="markdown table; default results/augbpr_<dataset>.md")
    parser.add_argument("--runs_dir", default=None, help="per-run JSON; default results/augbpr_runs/<dataset>")
    parser.add_argument("--set", action="append", default=[], help="key=value for every run")
    parser.add_argument("--stored_only", action="store_true",
                        help="write the report from the stored runs only; missing runs are listed, not run")
    args, rest = parser.parse_known_args()
    per_base = parse_scoped_sets(rest, BASES)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    out = Path(args.out or ROOT / "results" / f"augbpr_{args.dataset}.md")
    runs_dir = Path(args.runs_dir or ROOT / "results" / "augbpr_runs" / args.dataset)
    runs_dir.mkdir(parents=True, exist_ok=True)
    common = parse_sets(args.set)
    runs, missing = [], []
    for base in args.bases:  # cheap bases first: each finishes all its seeds before the next starts
        for seed in args.seeds:
            for method in args.methods:
                path = runs_dir / f"{base}-{method}-seed{seed}.json"
                overrides = {**common, **parse_sets(per_base[base])}
                if path.is_file():
                    run = json.loads(path.read_text())
                    if run["config"] == run_config(base, method, args.dataset, seed, overrides):
                        runs.append(run)
                        print(f"[reuse] {path.name}", flush=True)
                        continue
                if args.stored_only:
                    missing.append((base, method, seed))
                    continue
                run = run_one(base, method, args.dataset, seed, overrides)
                path.write_text(json.dumps(run, indent=1, default=str))
                runs.append(run)
                summary = "  ".join(f"{g}: {run['groups'][g]['recall@50']:.4f}" for g in GROUPS if g in run["groups"])
                print(f"[{base} {method} seed {seed}] {run['seconds']}s  recall@50 {summary}", flush=True)

    command = "nice -n 10 python -m benchmarks.augbpr_benchmark --dataset=" + args.dataset + " --bases " + \
        " ".join(args.bases) + " --methods " + " ".join(args.methods) + " --seeds " + " ".join(map(str, args.seeds))
    text = [
        f"# AugBPR vs its base models on {args.dataset}: cold-start items",
        "",
        f"Produced by `{command}` ({platform.machine()}, {os.cpu_count()} cores, one torch thread per run).",
        "Cold-start items: the newest 20% of items by first interaction; every training interaction with them is removed "
        "(validation and test keep them). `cold_start_items@cold`: test interactions with cold-start items, ranked among "
        "the cold-start items only; `cold_start_items`: the same rows ranked among all items; `warm_start_items`: the "
        f"other test rows. Values: mean ± sample std over seeds {args.seeds} (model initialisation and training; the "
        "split and the judged pairs are the same for every run).",
        f"Per-run JSON: `{runs_dir.relative_to(ROOT) if runs_dir.is_relative_to(ROOT) else runs_dir}/`.",
        *([f"Not run (yet): {describe_missing(missing)}; the `runs` column says how many seeds each row has.", ""]
          if missing else []),
        results_table(runs, args.bases, args.methods),
        "",
        "Goal check (AugBPR raises cold-item Recall@50 while warm Recall@50 drops by at most 2% relative; means over seeds):",
        "",
        goal_table(runs, args.bases, args.methods),
        "",
        "aug_weight, aug_keep_fraction and hard or soft labels chosen on the validation rows (best validation cold@cold Recall@50 among the "
        "settings whose validation warm Recall@50 drops by at most 2%), then its test numbers:",
        "",
        valid_choice_table(runs, args.bases),
        "",
        "Cold items among all items (goal (c): `cold_start_items` Recall@50 above 0, warm within 2% of base): per judge, "
        "the `-cw` / `-nn` / `-cw-nn` option (any weight, any `-cap`) chosen on the validation rows, then its test numbers:",
        "",
        cold_among_all_table(runs, args.bases),
        "",
        "Judges (the same pairs for every base model and seed; judged once, then read from the cache):",
        "",
        judge_table(runs),
        "",
        "Mean wall time per run (s, judging excluded after the first run): " + ", ".join(
            f"{b} {m} {np.mean([r['seconds'] for r in runs if r['base'] == b and r['method'] == m]):.0f}"
            for b in args.bases for m in args.methods if any(r["base"] == b and r["method"] == m for r in runs)),
        "",
    ]
    write_report(out, text)


if __name__ == "__main__":
    main()
