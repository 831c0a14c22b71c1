"""ALLMRec against its frozen backbone, LLM-Only and TALLRec, plus ALLMRec ablations, on one split.

Every variant runs on the same dataset, split, scenarios (cold/warm items, cold users) and
evaluation users (``eval_max_users``); the backbone checkpoint is the one ALLMRec trains and
caches (content-keyed), so all variants share it. Before each evaluation the global seed is reset,
so RecBole's uni19 sampler draws the same 19 negatives for every variant. Each finished variant is
stored as JSON under ``--runs`` (skipped when run again, except that ``--groups`` adds the groups a
stored run lacks, ranking its kept weights); ``--table`` writes the markdown table.
A trained variant's weights are kept under ``<checkpoint_dir>/allmrec_compare/<runs folder name>/``, so
``--trained_from OTHER_RUNS`` evaluates them again (more users, other groups) without retraining, and
the variants of ``EVALUATED_FROM`` rank another variant's kept weights another way.

    nice -n 10 python -m benchmarks.allmrec_compare --dataset=ml-100k \\
        --variants SASRec LLM-Only ALLMRec TALLRec --table results/allmrec_ml100k.md

Variants (config overrides of ALLMRec or TALLRec) are in ``VARIANTS``; ``--set key=value`` (yaml
values) overrides every variant, after ``benchmarks/allmrec_compare.yaml``.
"""
import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import yaml
from recbole.utils import init_logger, init_seed

from benchmarks.common import cpu_description, parse_sets, write_report
from recbole_llm.checkpoint import load_checkpoint, load_into_model
from recbole_llm.config import Config
from recbole_llm.quick_start import (build_model, evaluate_seeded, evaluation_loaders, load_model, popularity_trainer,
                                     prepare)
from recbole_llm.utils import get_trainer

ROOT = Path(__file__).resolve().parents[1]

# the conditioning keys of ALLMRec-conditioned, and ALLMRec-score's additions to them
CONDITIONED = {"latent_norm": "standardise", "soft_token_norm": "word", "cold_item_text_tokens": "inference"}
SCORE = {**CONDITIONED, "candidate_score_token": True, "stage2_objective": "listwise"}
SCORE_TOKEN = {**SCORE, "score_token_layout": "separate"}  # the score in a token of its own
FROZEN_F = {"stage2_frozen_projection_samples": 10 ** 9}  # F_U and F_I frozen at their initial weights

# the prompt without soft tokens, untrained
LLM_ONLY = {"use_user_token": False, "use_item_tokens": False, "stages": []}
# the score oracle's prompt: LLM-Only's prompt with the backbone's score token after each title
SCORE_ALONE = {"use_user_token": False, "use_item_tokens": False, "candidate_score_token": True,
               "score_token_layout": "separate", "stage2_objective": "listwise", "stages": [2]}
# trained and ranked by what the soft tokens add to each title's score. Every validation point costs a
# second scoring pass, so the curve keeps only its point before stage 2 (stage2_eval_every counts
# batches: 160 batches = 640 samples, past the 320-sample budget)
PROMPT_PRIOR = {"score_calibration": "prompt_prior", "stage2_eval_every": 160}
WORD_20 = {**SCORE_ALONE, "soft_token_norm": "word", "num_candidates": 20}  # the score token alone, 20 candidates
# the score-token recipe's curriculum: 160 stage-2 samples on 5-candidate lists, then 20-candidate lists
CURRICULUM_5TO20 = {"num_candidates": 20, "stage2_curriculum_samples": 160, "stage2_curriculum_candidates": 5}
WORD_5TO20 = {**WORD_20, **CURRICULUM_5TO20}

# name -> (model, overrides, what it is)
VARIANTS = {
    "Pop": ("ALLMRec", {}, "control: RecBole's Pop (training counts of the target items), ties broken at random"),
    "SASRec": ("ALLMRec", {}, "the frozen backbone alone (its own scores)"),
    "LLM-Only": ("ALLMRec", LLM_ONLY,
                 "the same prompt without soft tokens, no training"),
    "LLM-Only-prior": ("ALLMRec", {**LLM_ONLY, "score_calibration": "title_prior"},
                       "LLM-Only with each title's score after the answer cue alone subtracted (score_calibration)"),
    "LLM-Only-choice": ("ALLMRec", {**LLM_ONLY, "score_reduction": "choice"},
                        "LLM-Only with each title's log-probability under generation constrained to the candidates "
                        "(score_reduction: choice)"),
    "ALLMRec": ("ALLMRec", {}, "both stages, paper losses"),
    "TALLRec": ("TALLRec", {}, "prompt without soft tokens, LoRA-tuned LLM on the same stage-2 samples"),
    "MLP-LLM": ("ALLMRec", {"item_embedding_source": "backbone", "stages": [2]},
                "the paper's MLP-LLM: the backbone's E_i and x_u through MLPs into the LLM, stage 2 only (no stage 1)"),
    "ALLMRec-conditioned": ("ALLMRec", CONDITIONED,
                            "ours: standardised latents, soft tokens at word-embedding norm, e_i for every item in training"),
    "ALLMRec-score": ("ALLMRec", SCORE,
                      "ours: ALLMRec-conditioned plus the backbone's standardised score in each candidate's token, "
                      "listwise stage-2 loss"),
    "ALLMRec-score-token": ("ALLMRec", SCORE_TOKEN,
                            "ours: ALLMRec-score with the score in a token of its own after each candidate's item token "
                            "(a, b at word scale, as in the score oracle)"),
    "ALLMRec-score-frozen": ("ALLMRec", {**SCORE, **FROZEN_F},
                             "ablation: ALLMRec-score with F_U and F_I frozen at their initial weights "
                             "(only the score token learns in stage 2)"),
    "ALLMRec-score-token-frozen": ("ALLMRec", {**SCORE_TOKEN, **FROZEN_F},
                                   "ablation: ALLMRec-score-token with F_U and F_I frozen at their initial weights "
                                   "(the score oracle's token inside ALLMRec's prompt)"),
    "ALLMRec-score-token-frozen-5to20": ("ALLMRec", {**SCORE_TOKEN, **FROZEN_F, **CURRICULUM_5TO20},
                                         "ALLMRec-score-token-frozen with the curriculum of LLM-score-token-word-5to20 "
                                         "(160 stage-2 samples on 5 candidates, then 20)"),
    "ALLMRec-score-token-frozen-5to20-ppt": ("ALLMRec", {**SCORE_TOKEN, **FROZEN_F, **CURRICULUM_5TO20,
                                                         **PROMPT_PRIOR},
                                             "ALLMRec-score-token-frozen-5to20 trained and ranked by what the soft tokens "
                                             "add (prompt_prior in the listwise loss too)"),
    "ALLMRec-score-token-5to20-ppt": ("ALLMRec", {**SCORE_TOKEN, **CURRICULUM_5TO20, **PROMPT_PRIOR},
                                      "ALLMRec-score-token (F_U, F_I from stage 1, trained on in stage 2) with the "
                                      "curriculum, trained and ranked by what the soft tokens add (prompt_prior)"),
    "MLP-LLM-score-token-5to20-ppt": ("ALLMRec", {**SCORE_TOKEN, **CURRICULUM_5TO20, **PROMPT_PRIOR,
                                                  "item_embedding_source": "backbone", "stages": [2]},
                                      "MLP-LLM in ALLMRec-score-token-5to20-ppt's recipe: the backbone's standardised "
                                      "E_i and x_u through MLPs trained in stage 2 only (no stage 1)"),
    "LLM-score-token": ("ALLMRec", SCORE_ALONE,
                        "ablation: the score oracle's prompt, LLM-Only's prompt with the backbone's score token after "
                        "each title (no user or item soft tokens, no rescaling; only a and b train)"),
    "LLM-score-token-word": ("ALLMRec", {**SCORE_ALONE, "soft_token_norm": "word"},
                             "ablation: LLM-score-token with the score token rescaled to word-embedding norm, "
                             "as ALLMRec-score-token-frozen rescales it"),
    "LLM-score-token-word-20": ("ALLMRec", WORD_20,
                                "ablation: LLM-score-token-word trained on 20-candidate lists (1 positive + 19 "
                                "negatives), the length it is evaluated on"),
    "LLM-score-token-word-5to20": ("ALLMRec", WORD_5TO20,
                                   "ablation: LLM-score-token-word trained on 5-candidate lists for 160 samples, then "
                                   "on 20-candidate lists (a curriculum)"),
    "LLM-score-token-word-5to20-480": ("ALLMRec", {**WORD_5TO20, "stage2_max_samples": 480},
                                       "ablation: LLM-score-token-word-5to20 with twice the 20-candidate phase "
                                       "(160 samples on 5 candidates, then 320 on 20)"),
    "LLM-score-token-word-5to20-pp": ("ALLMRec", {**WORD_5TO20, "score_calibration": "prompt_prior"},
                                      "LLM-score-token-word-5to20's weights ranked by what the score token adds: each "
                                      "candidate's score minus LLM-Only's (score_calibration: prompt_prior at inference)"),
    "LLM-score-token-word-5to20-ppt": ("ALLMRec", {**WORD_5TO20, **PROMPT_PRIOR},
                                       "LLM-score-token-word-5to20 trained and ranked by what the score token adds "
                                       "(prompt_prior in the listwise loss too)"),
    "LLM-score-token-word-20-prior": ("ALLMRec", {**WORD_20, "score_calibration": "title_prior"},
                                      "ablation: LLM-score-token-word-20 with the title prior subtracted in the "
                                      "listwise loss and in the ranking (score_calibration)"),
    "LLM-score-token-word-20-choice": ("ALLMRec", {**WORD_20, "score_reduction": "choice"},
                                       "ablation: LLM-score-token-word-20 with choice scores (generation constrained "
                                       "to the candidates) in the listwise loss and the ranking"),
    "ALLMRec-no-match": ("ALLMRec", {"match_weight": 0.0}, "ablation: no matching loss"),
    "ALLMRec-no-recon": ("ALLMRec", {"item_recon_weight": 0.0, "text_recon_weight": 0.0},
                         "ablation: no reconstruction losses"),
    "ALLMRec-no-user-token": ("ALLMRec", {"use_user_token": False}, "ablation: no user soft token"),
    "ALLMRec-SBERT-items": ("ALLMRec", {"item_embedding_source": "text"},
                            "ablation: q_i = f_T(SBERT) for every item instead of the joint e_i"),
    "ALLMRec-match-norm": ("ALLMRec", {"match_norm": "batch"}, "ours: batch-standardised matching loss"),
}
# variants that train nothing of their own: another variant's kept weights, ranked with the
# overrides that make them differ (evaluation-only; taken from the --runs folder or --trained_from)
EVALUATED_FROM = {"LLM-score-token-word-5to20-pp": "LLM-score-token-word-5to20"}
GROUPS = ("test", "cold_items", "warm_items", "cold_users")
# settings that change what is evaluated, not what is trained: --trained_from may differ in these
EVALUATION_SETTINGS = {"eval_max_users", "show_progress", "torch_threads"}
TRAINING_RECORD = ("build_seconds", "stage_seconds", "epoch_losses", "learning_curve")


def weights_path(runs_dir, name, settings):
    """Where a variant's trained weights are kept: under RecBole's ``checkpoint_dir`` (weights are
    not results), in a folder named after the runs folder."""
    return Path(settings.get("checkpoint_dir") or "saved") / "allmrec_compare" / Path(runs_dir).resolve().name / f"{name}.pth"


def differing_settings(settings, stored, ignored):
    """Keys (outside ``ignored``) whose values differ between ``settings`` and a stored run's."""
    return sorted(k for k in set(settings) | set(stored) if k not in ignored and settings.get(k) != stored.get(k))


def trained_source(name, settings, trained_from):
    """The stored run and weights to evaluate instead of training ``name`` again; refused by name
    when the run is missing, its weights are missing, or it was trained with other settings."""
    run_path = Path(trained_from) / f"{name}.json"
    if not run_path.exists():
        raise SystemExit(f"--trained_from: no stored run {run_path}")
    record = json.loads(run_path.read_text())
    differ = differing_settings(settings, record["settings"], EVALUATION_SETTINGS)
    if differ or record["overrides"] != VARIANTS[name][1]:
        raise SystemExit(f"--trained_from: {run_path} was trained with other settings "
                         f"({differ or 'the variant overrides changed'}); run it again instead")
    weights = weights_path(trained_from, name, settings)
    if not weights.exists():
        raise SystemExit(f"--trained_from: {run_path} has no stored weights ({weights}); run it again instead")
    return record, weights


def evaluate_groups(config, trainer, test_data, groups, only=None):
    results, seconds, users = {}, {}, {}
    for name, loader in {"test": test_data, **groups}.items():
        if only and name not in only:
            continue
        began = time.time()
        results[name] = dict(evaluate_seeded(trainer, loader))  # same sampled negatives for every variant
        seconds[name] = round(time.time() - began, 1)
        users[name] = len(set(loader._dataset.inter_feat[config["USER_ID_FIELD"]].tolist()))
    return results, seconds, users


def binomial_se(p, n):
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def variant_trainer(name, dataset, settings, weights=None):
    """``(config, trainer, (train, valid, test, groups) loaders, build seconds)`` of one variant,
    untrained: the frozen backbone and Pop ready to evaluate, an LLM variant freshly built, with
    ``weights`` (a kept checkpoint) loaded into it when given."""
    model_name, overrides, _ = VARIANTS[name]
    config = Config(model=model_name, dataset=dataset, config_dict={**settings, **overrides}, command_line=False)
    init_seed(config["seed"], config["reproducibility"])
    init_logger(config)
    data, train_data, valid_data, test_data = prepare(config)
    test_data, groups = evaluation_loaders(config, data, test_data)
    loaders, build_seconds = (train_data, valid_data, test_data, groups), None
    if name == "SASRec":
        backbone = load_model(config["backbone_checkpoint"], train_data._dataset).eval()
        return config, get_trainer(backbone.type, type(backbone).__name__)(config, backbone), loaders, build_seconds
    if name == "Pop":
        return config, popularity_trainer(config, train_data), loaders, build_seconds
    began = time.time()
    model = build_model(config, train_data)
    build_seconds = round(time.time() - began, 1)
    if weights:
        load_into_model(model, load_checkpoint(weights, model=model_name))
    return config, get_trainer(config["MODEL_TYPE"], model_name)(config, model), loaders, build_seconds


def run_variant(name, dataset, settings, only_groups=None, weights=None, trained=None):
    """Train (weights written to ``weights``) and evaluate one variant; with ``trained`` (a stored
    record and its weights, from ``trained_source``) only evaluate those weights."""
    model_name, overrides, _ = VARIANTS[name]
    config, trainer, (train_data, valid_data, test_data, groups), build_seconds = variant_trainer(
        name, dataset, settings, trained[1] if trained else None)
    record = {"variant": name, "model": model_name, "overrides": overrides, "settings": settings}
    if build_seconds is not None:
        record["build_seconds"] = build_seconds
        if trained:
            source, path = trained
            # another variant's learning curve was measured with that variant's ranking, not this one's
            copied = [k for k in TRAINING_RECORD if k in source and not (k == "learning_curve" and name in EVALUATED_FROM)]
            record.update({k: source[k] for k in copied}, trained_from=str(path))
        else:
            curve = bool(config["stage2_eval_every"])  # validation Hit@1 along stage 2 (learning curve)
            if weights:
                weights.parent.mkdir(parents=True, exist_ok=True)
                trainer.saved_model_file = str(weights)
            trainer.fit(train_data, valid_data if curve else None, saved=bool(weights), show_progress=False)
            record["stage_seconds"] = {str(k): round(v, 1) for k, v in trainer.stage_times.items()}
            record["epoch_losses"] = [[stage, epoch, losses] for stage, epoch, losses in trainer.epoch_losses]
            record["learning_curve"] = trainer.learning_curve
    record["results"], record["eval_seconds"], record["eval_users"] = evaluate_groups(config, trainer, test_data, groups, only_groups)
    record["machine"] = {"cpu_count": os.cpu_count(), "torch_threads": config["torch_threads"], "python": platform.python_version()}
    return record


def evaluation_mode(record):
    """``(test evaluation mode, candidates per user)`` of a stored run: uniN ranks 1 positive + N sampled
    negatives; a full (or pop-sampled) ranking has no fixed candidate list (None)."""
    mode = ((record or {}).get("settings", {}).get("eval_args") or {}).get("mode", "uni19")
    mode = mode.get("test", "uni19") if isinstance(mode, dict) else mode
    return mode, int(mode[3:]) + 1 if mode.startswith("uni") else None


def write_table(runs_dir, out, command, dataset):
    records = {}
    for path in sorted(Path(runs_dir).glob("*.json")):
        record = json.loads(path.read_text())
        records[record["variant"]] = record
    order = [v for v in VARIANTS if v in records]
    cpu, flags = cpu_description()
    shown_dir = Path(runs_dir).resolve()
    shown_dir = shown_dir.relative_to(ROOT) if shown_dir.is_relative_to(ROOT) else shown_dir
    mode, candidates = evaluation_mode(records[order[0]] if order else None)
    if candidates:
        chance = [1 / candidates, min(5 / candidates, 1.0), min(10 / candidates, 1.0)]
        title = f"{mode} Hit@1 (1 positive + {candidates - 1} sampled negatives)"
    else:  # full (or pop-sampled) ranking: no fixed candidate list, chance is ~1 / #items
        title = f"Hit@1 ranked by `eval_args.mode: {mode}`"
    threads = sorted({str(r.get("machine", {}).get("torch_threads") or 1) for r in records.values()})
    threads = f"{' or '.join(threads)} CPU thread{'' if threads == ['1'] else 's'} (each run's JSON: `machine`)"
    lines = [f"# ALLMRec on {dataset}: {title}", "",
             f"Table written by `{command}` from every run stored in `{shown_dir}` (each variant's JSON holds its "
             "settings; the variants were run by earlier invocations listed in the notes).", "",
             f"Hit@1 ± binomial standard error per group (the same users and sampled negatives for every variant); "
             f"train and evaluation seconds on {threads} ({cpu} with {', '.join(flags)}, for the runs made "
             "since 2026-12-02; earlier runs: see the notes).", "",
             "| variant | what | " + " | ".join(GROUPS) + " | Hit@5 / Hit@10 (test) | train s (stage 1 / 2) "
             "| test eval s per user |",
             "|---|---|" + "---|" * len(GROUPS) + "---|---|---|"]
    if candidates:
        lines.append(f"| chance | a uniformly random order of the {candidates} candidates | "
                     + " | ".join(f"{chance[0]:.3f}" for _ in GROUPS) + f" | {chance[1]:.3f} / {chance[2]:.3f} | - | - |")
    for name in order:
        r = records[name]
        hits = [f"{r['results'][g]['hit@1']:.3f} ± {binomial_se(r['results'][g]['hit@1'], r['eval_users'][g]):.3f}"
                if g in r["results"] else "-" for g in GROUPS]
        stages = r.get("stage_seconds", {})
        train = " / ".join(str(stages.get(s, "-")) for s in ("1", "2")) if stages else "-"
        test = r["results"].get("test")  # absent when only other groups were evaluated (--groups)
        test_hits = f"{test['hit@5']:.3f} / {test['hit@10']:.3f}" if test else "-"
        per_user = f"{r['eval_seconds']['test'] / r['eval_users']['test']:.2f}" if test else "-"
        lines.append(f"| {name} | {VARIANTS[name][2]} | " + " | ".join(hits) + f" | {test_hits} | {train} | {per_user} |")
    users = {g: records[order[0]]["eval_users"].get(g) for g in GROUPS} if order else {}
    lines += ["", f"Evaluation users per group: {users}.", ""]
    curves = {name: records[name]["learning_curve"] for name in order if records[name].get("learning_curve")}
    if curves:
        lines += ["Learning curves (`stage2_eval_every`): validation Hit@1 ± binomial SE of the same seeded "
                  "validation users and negatives before stage 2 and along it, with the mean stage-2 loss of the "
                  "batches since the previous point.", "",
                  "| variant | stage-2 samples | validation Hit@1 (users) | Hit@5 | train loss |", "|---|---|---|---|---|"]
        for name, curve in curves.items():
            lines += [f"| {name} | {p['stage2_samples']} | {p['hit@1']:.3f} ± {binomial_se(p['hit@1'], p['users']):.3f} ({p['users']}) | "
                      f"{p.get('hit@5', float('nan')):.3f} | {p.get('train_loss', '-')} |" for p in curve]
        lines.append("")
    write_report(out, lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--variants", nargs="*", default=["Pop", "SASRec", "LLM-Only", "ALLMRec", "TALLRec"])
    parser.add_argument("--config", default=str(ROOT / "benchmarks" / "allmrec_compare.yaml"))
    parser.add_argument("--runs", default=None, help="folder of per-variant JSON (default results/allmrec_runs/<dataset>)")
    parser.add_argument("--table", default=None, help="markdown table to write from every stored run")
    parser.add_argument("--set", nargs="*", default=[], help="key=value overrides for every variant")
    parser.add_argument("--groups", nargs="*", default=None,
                        help=f"evaluate only these of {GROUPS} (default all); a stored run gets those it lacks")
    parser.add_argument("--trained_from", default=None,
                        help="a --runs folder whose trained variants are evaluated here instead of training them again "
                             f"(same settings except {sorted(EVALUATION_SETTINGS)})")
    args = parser.parse_args()
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    settings = yaml.safe_load(Path(args.config).read_text()) or {}
    settings.update(parse_sets(args.set))
    runs_dir = Path(args.runs or ROOT / "results" / "allmrec_runs" / args.dataset)
    runs_dir.mkdir(parents=True, exist_ok=True)
    command = "nice -n 10 python -m benchmarks.allmrec_compare " + shlex.join(sys.argv[1:])  # quoted, so the command can be pasted
    for name in args.variants:
        path = runs_dir / f"{name}.json"
        stored, groups = json.loads(path.read_text()) if path.exists() else None, args.groups
        if stored:  # evaluated before: only groups named by --groups and missing from the run are added
            groups = [g for g in args.groups or [] if g not in stored["results"]]
            if not groups:
                print(f"{name}: stored in {path}, skipped")
                continue
            differ = differing_settings(settings, stored["settings"], {"show_progress", "torch_threads"})
            if differ:
                raise SystemExit(f"{path} was evaluated with other settings ({differ}); use another --runs folder")
        trains = name not in ("Pop", "SASRec") and {**settings, **VARIANTS[name][1]}.get("stages", [1, 2]) != []
        if name in EVALUATED_FROM:
            trained, weights = trained_source(EVALUATED_FROM[name], settings, args.trained_from or runs_dir), None
        else:
            source = args.trained_from or (runs_dir if stored else None)  # a stored run ranks its kept weights
            trained = trained_source(name, settings, source) if source and trains else None
            weights = weights_path(runs_dir, name, settings) if trains else None
        record = run_variant(name, args.dataset, settings, groups, weights, trained)
        if stored:
            for key in ("results", "eval_seconds", "eval_users"):
                stored[key].update(record[key])
            record = stored
        path.write_text(json.dumps(record, indent=1, default=str))
        print(f"{name}: {record['results']} -> {path}", flush=True)
    if args.table:
        write_table(runs_dir, Path(args.table), command, args.dataset)


if __name__ == "__main__":
    main()
