"""Where do cold-start items end up after AugBPR training? A diagnostic for the cold-among-all-items options.

Trains BPR under the given ``augbpr_benchmark`` methods (seed 0 by default, the same configuration as
that benchmark) and reports, from the trained item embeddings: the mean norm of cold and of warm
items, and the share of every user's top 50 (among all items) taken by cold items. The
benchmark's Recall@50 says *whether* cold items reach the top; this says how far the aux loss
moved them and how much of the top they take from warm items.

    python -m benchmarks.augbpr_cold_items --methods base base-nn AugBPR-emb-nn-w0.01 AugBPR-emb-nn
"""
import argparse
import logging
import os

import torch
from recbole.utils import init_seed

from benchmarks.augbpr_benchmark import METHODS, run_config
from benchmarks.common import cpu_description, write_report
from recbole_llm.config import Config
from recbole_llm.quick_start import train_and_test


def cold_item_placement(model, top_k=50):
    """Mean cold / warm item-embedding norm and cold items' share of every user's top ``top_k``."""
    items = model.base.item_embedding.weight.detach()
    users = model.base.user_embedding.weight.detach()[1:]  # row 0 is padding
    cold = torch.zeros(len(items), dtype=torch.bool)
    cold[model.cold_items] = True
    scores = users @ items.T
    scores[:, 0] = -torch.inf
    top = scores.topk(top_k, dim=1).indices
    return {"cold norm": items[cold].norm(dim=1).mean().item(),
            "warm norm": items[model.warm_items].norm(dim=1).mean().item(),
            f"cold share of top {top_k}": cold[top].float().mean().item(),
            "cold share of items": cold[1:].float().mean().item()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--methods", nargs="+", required=True, choices=list(METHODS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--last_epoch", action="store_true",
                        help="measure the model after the last epoch instead of the best validation epoch")
    parser.add_argument("--out", default=None, help="default: results/augbpr_cold_items_<dataset>[_last_epoch].md")
    args = parser.parse_args()
    out = args.out or f"results/augbpr_cold_items_{args.dataset}{'_last_epoch' if args.last_epoch else ''}.md"
    logging.basicConfig(level=logging.ERROR)
    rows = []
    for method in args.methods:
        config = Config(config_dict=run_config("BPR", method, args.dataset, args.seed, {}), command_line=False)
        init_seed(config["seed"], config["reproducibility"])
        # saved: tested (and measured here) at the best validation epoch, as in the benchmark
        trainer, result = train_and_test(config, saved=not args.last_epoch, verbose=False)
        if not args.last_epoch:
            os.remove(trainer.saved_model_file)
        placement = cold_item_placement(trainer.model)
        warm = result["group_results"]["warm_start_items"]["recall@50"]
        cold_all = result["group_results"]["cold_start_items"]["recall@50"]
        rows.append(f"| {method} | {placement['cold norm']:.2f} | {placement['warm norm']:.2f} | "
                    f"{placement['cold share of top 50']:.3f} | {placement['cold share of items']:.3f} | "
                    f"{cold_all:.4f} | {warm:.4f} |")
        print(rows[-1], flush=True)
    command = (f"python -m benchmarks.augbpr_cold_items --dataset={args.dataset} --seed {args.seed} "
               f"{'--last_epoch ' if args.last_epoch else ''}--methods {' '.join(args.methods)}")
    when = "after the last epoch" if args.last_epoch else "at its best validation epoch (the model the benchmark tests)"
    cpu, flags = cpu_description()
    write_report(out, [
        "# AugBPR (BPR): where cold-start items end up", "", f"Command: `{command}`", "",
        f"Machine: {cpu} ({', '.join(flags)}). One seed (no interval): a diagnostic of the mechanism; the "
        "3-seed numbers with chance are in results/augbpr_ml-100k.md. `base` and `base-nn` are the controls.", "",
        f"Item embeddings of BPR {when}, seed as above: mean norm of cold and warm items, the share of every "
        "user's top 50 among all items taken by cold items, and the runs' test Recall@50 (cold items among all "
        "items; warm items).", "",
        "| method | cold norm | warm norm | cold share of users' top 50 | cold share of items | cold (all items) R@50 | warm R@50 |",
        "|---|---|---|---|---|---|---|", *rows])


if __name__ == "__main__":
    main()
