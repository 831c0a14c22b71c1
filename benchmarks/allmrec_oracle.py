"""Can ALLMRec's soft-token pathway carry information to this LLM? Two oracles on one split.

* ``marker``: the target candidate's token is a learned vector m+, every other candidate's m-
  (two trained vectors, nothing else). Pass: Hit@1 >= 0.6 among ``num_candidates`` = 5; moving the
  marker to a negative must move the choice (``moved``: how often the marked negative wins, and
  the target).
* ``matching``: the user token is F_U(E_target), the candidates' tokens F_I(E_i) (E: the frozen
  backbone's item embeddings, standardised per dimension); F_U and F_I are trained. Pass: Hit@1
  >= 0.5 of 5; with the user token of another random item (``moved``) the target should fall to
  chance.

* ``score`` (not an oracle): each candidate's token carries the frozen backbone's score of it for
  this user (standardised over the candidate list). Reference: the backbone's own Hit@1 on the
  same candidates; ``moved`` swaps the target's score with a negative's.

All train with the listwise loss (softmax over the candidates' title log-likelihoods, what
``predict`` ranks by) on users' last training transitions and report Hit@1 on held-out users
against steps (a learning curve); ``--eval_on valid`` scores those users' validation items instead,
which the backbone never trained on. The prompt is ALLMRec's own (``ALLMRec.prompt_embeddings`` with
the oracle's tokens in place of the soft tokens); ``item_token_position`` puts each token after
(the paper) or before its title; ``--set score_calibration=prompt_prior`` ranks and trains by each
title's log-likelihood minus its log-likelihood under the same prompt without soft tokens (the
model's option; not for ``marker``, whose model has no soft tokens of its own). Each run is stored as JSON under ``--runs`` (skipped when it
exists); ``--table`` writes the markdown table from every stored run.

    python -m benchmarks.allmrec_oracle --oracle marker --position after --table results/allmrec_oracle.md
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from recbole.utils import init_seed

from benchmarks.common import cpu_description, parse_sets, write_report
from recbole_llm.config import Config
from recbole_llm.llm.models import input_word_scale
from recbole_llm.llm.scoring import branch_log_likelihoods
from recbole_llm.model.allmrec import ScoreToken, mlp_projector, seeded_word_vectors
from recbole_llm.quick_start import build_model, prepare

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"num_candidates": 5, "history_len": 3, "torch_threads": 2, "show_progress": False,
            "eval_item_groups": None, "cold_user_args": None, "score_reduction": "sum", "score_calibration": "none"}


def last_transitions(train_data, model):
    """``(interaction rows, users)``: each user's newest training transition (the official code's sample)."""
    feat = train_data._dataset.inter_feat
    last = {}
    for row, user in enumerate(feat[model.USER_ID].tolist()):
        last[user] = row
    rows = torch.tensor(sorted(last.values()))
    return feat[rows].to(model.device)


class MarkerTokens(torch.nn.Module):
    """m+ on the target candidate, m- on the others; both start as word embeddings of the LLM (kept
    in its table's units and scaled as its embedding module scales words, like ``ScoreToken``)."""

    def __init__(self, llm):
        super().__init__()
        embed = llm.get_input_embeddings()
        self.positive, self.negative = seeded_word_vectors(embed.weight, seed=0)
        self.scale = input_word_scale(embed)

    def tokens(self, model, sample, row, marked_item, candidates):
        marked = (candidates == marked_item).unsqueeze(-1)
        return None, None, torch.where(marked, self.positive, self.negative) * self.scale


class MatchingTokens(torch.nn.Module):
    """User token F_U(E_target), candidate tokens F_I(E_i), E standardised over all items."""

    def __init__(self, model):
        super().__init__()
        table = model.backbone.item_embeddings(torch.arange(1, model.n_items, device=model.device)).detach()
        self.mean, self.std = table.mean(0), table.std(0).clamp(min=1e-6)
        hidden = model.llm.config.hidden_size
        self.user_proj = mlp_projector(table.shape[1], hidden, torch.nn.LeakyReLU())
        self.item_proj = mlp_projector(table.shape[1], hidden, torch.nn.GELU())

    def tokens(self, model, sample, row, marked_item, candidates):
        E = (model.backbone.item_embeddings(torch.cat([marked_item.view(1), candidates])).detach() - self.mean) / self.std
        return self.user_proj(E[0]), None, self.item_proj(E[1:])


class ScoreTokens(torch.nn.Module):
    """Not an oracle: each candidate's token is a + z * b, z the frozen backbone's score of that
    candidate for this user, standardised over the candidate list (a, b trained). Information
    the model has at inference; can the LLM pass the backbone's ranking through? The ``moved``
    input swaps the target's score with a negative's."""

    def __init__(self, llm):
        super().__init__()
        self.token = ScoreToken(llm.get_input_embeddings(), seed=0)

    @staticmethod
    def backbone_scores(model, sample, row, candidates):
        user = model._user_vectors(sample[torch.tensor([row])])[0]
        scores = model.backbone.item_embeddings(candidates) @ user
        return (scores - scores.mean()) / scores.std().clamp(min=1e-6)

    def tokens(self, model, sample, row, marked_item, candidates):
        z = self.backbone_scores(model, sample, row, candidates).detach()
        target = int((candidates == sample[model.ITEM_ID][row]).nonzero()[0, 0])
        marked = int((candidates == marked_item).nonzero()[0, 0])
        z = z.clone()
        z[target], z[marked] = z[marked].clone(), z[target].clone()
        return None, None, self.token(z)


ORACLES = {"marker": lambda model: MarkerTokens(model.llm), "matching": MatchingTokens,
           "score": lambda model: ScoreTokens(model.llm)}


def candidate_sets(model, sample, generator):
    """Per user: the target and ``num_candidates - 1`` negatives in a random order."""
    users, targets = sample[model.USER_ID], sample[model.ITEM_ID]
    negatives = model.sample_negatives(users, model.num_candidates - 1, generator, targets.unsqueeze(1).tolist())
    out = []
    for row in range(len(users)):
        candidates = torch.cat([targets[row:row + 1], negatives[row]])
        out.append(candidates[torch.randperm(len(candidates), generator=generator)])
    return out


def scores(model, oracle, sample, rows, candidates, marked):
    """Title log-likelihood scores ``[len(rows), num_candidates]`` (with gradients)."""
    histories = [model.history(sample, row) for row in rows]
    prompts = [model.prompt_embeddings(None, history, candidates[k],
                                       tokens=oracle.tokens(model, sample, row, marked[k], candidates[k]))
               for k, (row, history) in enumerate(zip(rows, histories))]
    titles = [[model.title_token_ids(int(i)) for i in c] for c in candidates]
    per_token = branch_log_likelihoods(model.llm, prompts, titles)
    summed = torch.stack([torch.stack([t.sum() for t in row]) for row in per_token])
    if model.score_calibration == "prompt_prior":  # rank by what the oracle's tokens add, as ``predict`` would
        return summed - torch.stack(model.prompt_prior(histories, candidates, titles))
    return summed


@torch.no_grad()
def evaluate(model, oracle, sample, candidates, batch=4):
    """Hit@1 of the target with the oracle's input on the target, and with it moved to a negative
    (for ``matching``: the user token of the moved item): ``{"hit@1", "moved_to_marked", "moved_hit@1"}``."""
    targets = sample[model.ITEM_ID]
    generator = torch.Generator().manual_seed(1)
    hits, moved_marked, moved_hits = [], [], []
    for start in range(0, len(targets), batch):
        rows = list(range(start, min(start + batch, len(targets))))
        cands = [candidates[r] for r in rows]
        best = scores(model, oracle, sample, rows, cands, [targets[r] for r in rows]).argmax(1)
        hits += [bool(cands[k][best[k]] == targets[r]) for k, r in enumerate(rows)]
        moved = []
        for k, r in enumerate(rows):
            negatives = cands[k][cands[k] != targets[r]]
            moved.append(negatives[torch.randint(len(negatives), (1,), generator=generator)][0])
        best = scores(model, oracle, sample, rows, cands, moved).argmax(1)
        moved_marked += [bool(cands[k][best[k]] == moved[k]) for k in range(len(rows))]
        moved_hits += [bool(cands[k][best[k]] == targets[r]) for k, r in enumerate(rows)]
    mean = lambda xs: sum(xs) / len(xs)
    return {"hit@1": mean(hits), "moved_to_marked": mean(moved_marked), "moved_hit@1": mean(moved_hits)}


def run(args, overrides):
    settings = {**SETTINGS, "item_token_position": args.position, **overrides}
    needs_backbone = args.oracle in ("matching", "score")
    config = Config(model="ALLMRec", dataset=args.dataset, config_dict={
        **settings, "use_user_token": needs_backbone, "use_item_tokens": needs_backbone, "stages": []},
        command_line=False)
    init_seed(config["seed"], config["reproducibility"])
    dataset, train_data, valid_data, _ = prepare(config)
    model = build_model(config, train_data).eval()
    oracle = ORACLES[args.oracle](model).to(model.device)
    sample = last_transitions(train_data, model)
    generator = torch.Generator().manual_seed(int(config["seed"]))
    order = torch.randperm(len(sample), generator=generator)
    held_out, train_rows = order[: args.eval_users], order[args.eval_users:]
    eval_sample = sample[held_out]
    if args.eval_on == "valid":  # the same users' next (validation) item: a target the backbone never trained on
        users = set(eval_sample[model.USER_ID].tolist())
        feat = valid_data._dataset.inter_feat
        eval_sample = feat[torch.tensor([r for r, u in enumerate(feat[model.USER_ID].tolist()) if u in users])].to(model.device)
    eval_candidates = candidate_sets(model, eval_sample, generator)
    reference = None
    if args.oracle == "score":  # what the backbone's own ranking of these candidates reaches
        with torch.no_grad():
            reference = sum(bool(c[ScoreTokens.backbone_scores(model, eval_sample, r, c).argmax()] == eval_sample[model.ITEM_ID][r])
                            for r, c in enumerate(eval_candidates)) / len(eval_candidates)
    optimizer = torch.optim.Adam(oracle.parameters(), lr=args.lr)
    curve, losses, began = [], [], time.time()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            curve.append({"step": step, "samples": step * args.batch_size, **evaluate(model, oracle, eval_sample, eval_candidates),
                          "train_loss": sum(losses[-args.eval_every:]) / max(len(losses[-args.eval_every:]), 1),
                          "seconds": round(time.time() - began, 1)})
            print(json.dumps(curve[-1]), flush=True)
        if step == args.steps:
            break
        index = train_rows[torch.randint(len(train_rows), (args.batch_size,), generator=generator)]
        batch = sample[index]
        candidates = candidate_sets(model, batch, generator)
        targets = batch[model.ITEM_ID]
        logits = scores(model, oracle, batch, range(len(targets)), candidates, list(targets))
        position = torch.stack([(c == t).nonzero()[0, 0] for c, t in zip(candidates, targets)])
        loss = F.cross_entropy(logits, position)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return {"oracle": args.oracle, "position": args.position, "llm": config["llm"], "llm_dtype": str(model.llm.dtype),
            "settings": {**settings, "lr": args.lr, "batch_size": args.batch_size, "steps": args.steps},
            "eval_on": args.eval_on, "eval_users": len(eval_sample), "chance": 1 / config["num_candidates"], "backbone_hit@1": reference, "curve": curve,
            "seconds": round(time.time() - began, 1)}


def se(p, n):
    return math.sqrt(p * (1 - p) / n)


def write_table(runs_dir, out, command):
    cpu, flags = cpu_description()
    lines = ["# ALLMRec oracles: can a soft token carry information to the LLM?", "",
             f"Command: `{command}` (one run per oracle and token position; the table is rebuilt from every "
             f"run stored in `{Path(runs_dir).resolve().relative_to(ROOT) if Path(runs_dir).resolve().is_relative_to(ROOT) else runs_dir}`).", "",
             f"Machine: {cpu} ({', '.join(flags)}). Hit@1 among 5 candidates (chance 0.2) on held-out users, "
             "± binomial standard error; `moved`: the oracle's input put on a random negative instead "
             "(marker: that negative's token is m+; matching: the user token of that negative; score: the target's backbone score swapped with that negative's).", "",
             "| oracle | token | LLM | settings (besides 5 candidates, 3 history titles, lr 0.01) | samples seen | Hit@1 (target marked) | moved: marked negative chosen | moved: target chosen | train loss | backbone Hit@1 | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(Path(runs_dir).glob("*.json")):
        record = json.loads(path.read_text())
        n = record["eval_users"]
        settings = record["settings"]
        shown = [f"{k}={v}" for k, v in settings.items() if k in SETTINGS and k != "torch_threads" and SETTINGS[k] != v]
        shown += [f"lr={settings['lr']}"] if settings.get("lr", 1e-2) != 1e-2 else []
        shown += [f"eval_on={record['eval_on']}"] if record.get("eval_on", "train") != "train" else []
        setting = ", ".join(shown) or "-"
        for point in record["curve"]:
            lines.append(f"| {record['oracle']} | {record['position']} | {record['llm']} ({record['llm_dtype'].replace('torch.', '')}) "
                         f"| {setting} | {point['samples']} | {point['hit@1']:.3f} ± {se(point['hit@1'], n):.3f} "
                         f"| {point['moved_to_marked']:.3f} | {point['moved_hit@1']:.3f} | {point['train_loss']:.3f} "
                         f"| {'-' if record.get('backbone_hit@1') is None else format(record['backbone_hit@1'], '.3f')} | {point['seconds']} |")
    write_report(out, lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--oracle", choices=sorted(ORACLES))
    parser.add_argument("--position", choices=["after", "before"], default="after")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--eval_users", type=int, default=60)
    parser.add_argument("--eval_every", type=int, default=30)
    parser.add_argument("--eval_on", choices=["train", "valid"], default="train",
                        help="held-out users' last training transitions (the backbone's score is in-sample there) "
                             "or their validation items (unseen by the backbone)")
    parser.add_argument("--runs", default="results/runs/allmrec_oracle")
    parser.add_argument("--table", default=None, help="write the markdown table of every stored run here")
    parser.add_argument("--set", nargs="*", default=[], help="ALLMRec config overrides, key=value (yaml values)")
    args = parser.parse_args(argv)
    overrides = parse_sets(args.set)
    if args.oracle:
        changed = [f"{k}={getattr(args, k)}" for k in ("steps", "batch_size", "lr", "eval_on") if getattr(args, k) != parser.get_default(k)]
        tag = "-".join([args.oracle, args.position, *changed, *(f"{k}={v}" for k, v in sorted(overrides.items()))])
        path = Path(args.runs) / f"{tag.replace('/', '_')}.json"
        if path.exists():
            print(f"{path} exists; skipped")
        else:
            record = run(args, overrides)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=1))
    if args.table:
        write_table(args.runs, args.table, "python -m benchmarks.allmrec_oracle " + " ".join(argv if argv is not None else sys.argv[1:]))


if __name__ == "__main__":
    main()
