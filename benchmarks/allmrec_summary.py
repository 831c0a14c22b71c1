"""Where ALLMRec stands on ml-100k: the headline rows of the ``allmrec_compare`` tables side by side,
read from their stored runs (nothing trains or evaluates here).

Each section is one protocol (backbone, stage-2 budget, users); its columns are (runs folder, group)
pairs, so the two LLMs and the user groups sit next to each other. Every cell is Hit@1 ± binomial SE
of that run; the last columns give each row's difference from ``Pop`` on the same users in units of
the unpaired SE of the difference (how the issue's goal, "two SE above Pop", is read). A row that was
not run in a folder says so. Learning curves, timings and notes stay in each folder's own table.

    python -m benchmarks.allmrec_summary --out results/allmrec_ml-100k_summary.md
"""
import argparse
import json
import math
from pathlib import Path

import yaml

from benchmarks.allmrec_compare import ROOT, VARIANTS, binomial_se, evaluation_mode
from benchmarks.common import cpu_description, write_report

RUNS = ROOT / "results" / "allmrec_runs"
SCORE_RECIPE_ROWS = ["Pop", "SASRec", "LLM-Only", "TALLRec", "MLP-LLM-score-token-5to20-ppt",
                     "ALLMRec-score-token-5to20-ppt", "ALLMRec-score-token-frozen-5to20-ppt",
                     "LLM-score-token-word-5to20", "LLM-score-token-word-5to20-pp", "LLM-score-token-word-5to20-ppt"]
# (title, the tables it comes from, rows, columns: (runs folder, group), the columns compared with Pop)
SECTIONS = [
    ("The score-token recipe: 10-epoch SASRec backbone, 320 stage-2 samples (160 on 5 candidates, then 20), "
     "listwise loss, lr 0.01", ["allmrec_ml-100k_score_sum_bb10.md", "allmrec_ml-100k_score_sum_bb10_groups.md",
                                "allmrec_ml-100k_score_sum_bb10_gemma.md", "allmrec_ml-100k_score_sum_bb10_gemma_groups.md"],
     SCORE_RECIPE_ROWS,
     [("ml-100k-score-sum-bb10", "test"), ("ml-100k-score-sum-bb10-groups", "cold_items"),
      ("ml-100k-score-sum-bb10-groups", "warm_items"), ("ml-100k-score-sum-bb10-groups", "cold_users"),
      ("ml-100k-score-sum-bb10-gemma", "test"), ("ml-100k-score-sum-bb10-gemma-groups", "cold_items")],
     [("ml-100k-score-sum-bb10", "test"), ("ml-100k-score-sum-bb10-gemma", "test")]),
    ("The paper's recipe: 2-epoch SASRec backbone, paper losses, one stage-2 pass over the training users",
     ["allmrec_ml-100k.md"], ["Pop", "SASRec", "LLM-Only", "TALLRec", "MLP-LLM", "ALLMRec"],
     [("ml-100k", g) for g in ("test", "cold_items", "warm_items", "cold_users")], [("ml-100k", "test")]),
]


def load_runs(folder):
    return {path.stem: json.loads(path.read_text()) for path in sorted(Path(folder).glob("*.json"))}


def column_label(runs, folder, group, default_llm):
    """``('<LLM> <group>', users)`` from the folder's runs; refused when they disagree on either."""
    llms = {r["settings"].get("llm") or default_llm for r in runs.values()}
    users = {r["eval_users"][group] for r in runs.values() if group in r.get("eval_users", {})}
    if len(llms) > 1 or len(users) > 1:
        raise SystemExit(f"{folder}: runs differ in LLM {sorted(llms)} or {group} users {sorted(users)}")
    return f"{next(iter(llms), default_llm)} {group}", next(iter(users), "?")


def cell(record, group):
    if record is None:
        return "not run"
    if group not in record["results"]:
        return "-"
    p, n = record["results"][group]["hit@1"], record["eval_users"][group]
    return f"{p:.3f} ± {binomial_se(p, n):.3f}"


def versus_pop(record, pop, group):
    """Hit@1 minus Pop's on the same users, in SEs of the unpaired difference."""
    if record is None or pop is None or group not in record["results"] or group not in pop["results"]:
        return "-"
    p, q, n = record["results"][group]["hit@1"], pop["results"][group]["hit@1"], record["eval_users"][group]
    se = math.sqrt(binomial_se(p, n) ** 2 + binomial_se(q, n) ** 2)
    return f"{p - q:+.3f} ({(p - q) / se:+.1f} SE)" if se else f"{p - q:+.3f}"


def chance(runs):
    """Hit@1 of a random order of one column's candidates (its runs' evaluation mode)."""
    candidates = {evaluation_mode(r)[1] for r in runs.values()}
    if len(candidates) != 1 or None in candidates:
        return "-"
    return f"{1 / candidates.pop():.3f}"


def section_lines(runs_root, title, tables, rows, columns, compared, default_llm):
    runs = {folder: load_runs(Path(runs_root) / folder) for folder in {f for f, _ in columns}}
    labels = {(f, g): column_label(runs[f], f, g, default_llm) for f, g in columns}
    headers = [f"{labels[c][0]} ({labels[c][1]} users)" for c in columns]
    compared_headers = [f"{labels[c][0]} minus Pop" for c in compared]
    lines = [f"## {title}", "", "From " + ", ".join(f"[{t}]({t})" for t in tables) + " (learning curves, timings, "
             "commands and notes there).", "",
             "| variant | " + " | ".join(headers + compared_headers) + " | what |",
             "|---|" + "---|" * (len(headers) + len(compared_headers) + 1)]
    lines.append("| chance | " + " | ".join([chance(runs[f]) for f, _ in columns] + ["-"] * len(compared))
                 + " | a uniformly random order of each user's candidates |")
    for name in rows:
        cells = [cell(runs[f].get(name), g) for f, g in columns]
        against = [versus_pop(runs[f].get(name), runs[f].get("Pop"), g) if name != "Pop" else "-" for f, g in compared]
        lines.append(f"| {name} | " + " | ".join(cells + against) + f" | {VARIANTS[name][2]} |")
    return lines + [""]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "results" / "allmrec_ml-100k_summary.md"))
    parser.add_argument("--runs", default=str(RUNS), help="the folder holding the runs folders of SECTIONS")
    args = parser.parse_args()
    default_llm = yaml.safe_load((ROOT / "properties" / "overall.yaml").read_text())["llm"]
    cpu, flags = cpu_description()
    lines = ["# ALLMRec on ml-100k: where it stands", "",
             "Written by `python -m benchmarks.allmrec_summary` from the runs stored under `results/allmrec_runs/` "
             f"(each run's JSON holds its settings; run on {cpu} with {', '.join(flags)}, fp32 LLMs, threads per run "
             "in each source table). Hit@1 ± binomial SE; every row of a column ranks the same "
             "users and the same seeded negatives. The oracles (can a soft token carry information into the "
             "LLM at all?) are in [allmrec_oracle.md](allmrec_oracle.md); what the best row ranks by is in "
             "[allmrec_score_sources_ml-100k.md](allmrec_score_sources_ml-100k.md).", ""]
    for section in SECTIONS:
        lines += section_lines(args.runs, *section, default_llm)
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
