"""ALLMRec stage 2 in one process against N processes on the same cores (``nproc``, gloo).

Each configuration trains stage 2 only (``stages: [2]``, stage-1 modules as initialised: the cost
of a stage-2 step does not depend on them) on ``--samples`` users of ml-100k, with the same cores
in use: one process with ``--cores`` torch threads, against ``--cores`` processes with one thread
each. The configurations alternate (``--repeats`` rounds), so a machine that slows down affects
both; the table gives each run's stage-2 seconds and the ratio of the means.

    python -m benchmarks.distributed_scaling --samples 16 --repeats 2
"""
import argparse
import os
import statistics
import sys
import time

from benchmarks.common import cpu_description, write_report
from recbole_llm.quick_start import run_recbole_llm


def stage2_seconds(nproc, threads, samples, dataset):
    settings = {"stages": [2], "stage2_max_samples": samples, "stage2_batch_size": 4, "eval_max_users": 4,
                "torch_threads": threads, "show_progress": False, "state": "ERROR", "eval_step": 0,
                "eval_item_groups": None, "cold_user_args": None, "eval_controls": []}
    began = time.time()
    result = run_recbole_llm(model="ALLMRec", dataset=dataset, config_dict=settings, saved=False, nproc=nproc)
    return result["stage_seconds"][2], time.time() - began


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--samples", type=int, default=16, help="stage-2 samples (the global batch is 4)")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="results/distributed_scaling.md")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    configurations = {f"1 process x {args.cores} threads": (1, args.cores),
                      f"{args.cores} processes x 1 thread": (args.cores, 1)}
    seconds = {name: [] for name in configurations}
    for round_ in range(args.repeats):
        for name, (nproc, threads) in configurations.items():
            stage2, total = stage2_seconds(nproc, threads, args.samples, args.dataset)
            seconds[name].append(stage2)
            print(f"round {round_}: {name}: stage 2 {stage2:.1f}s (run {total:.1f}s)", flush=True)
    model, flags = cpu_description()
    single, multi = (statistics.mean(v) for v in seconds.values())
    lines = [
        f"# ALLMRec stage 2: one process vs {args.cores} (torch.distributed, gloo) on {args.dataset}", "",
        f"Command: `python -m benchmarks.distributed_scaling {' '.join(argv if argv is not None else sys.argv[1:])}`. "
        f"Machine: {model} ({', '.join(flags) or 'no listed matmul flags'}), {os.cpu_count()} cores. "
        f"{args.samples} stage-2 samples, global batch 4, the embedded SmolLM2; runs alternate.", "",
        "| configuration | stage-2 seconds per run | mean | per sample |", "|---|---|---|---|",
        *[f"| {name} | {', '.join(f'{s:.1f}' for s in values)} | {statistics.mean(values):.1f} | "
          f"{statistics.mean(values) / args.samples:.2f} |" for name, values in seconds.items()],
        "", f"Speed-up of {args.cores} processes over one process with {args.cores} threads: **{single / multi:.2f}x**.",
    ]
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
