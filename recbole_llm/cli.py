"""Command lines: ``run_recbole_llm.py`` (train and test) and ``run_hyper.py`` (tuning).

Both follow RecBole's scripts: named arguments for model, dataset and config files; every other
``--key=value`` is read by the Config from the command line and overrides everything else.
"""
import argparse

from recbole.trainer import HyperTuning

from recbole_llm.quick_start import objective_function, run_recbole_llm


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train and test a recbole_llm or RecBole model.")
    parser.add_argument("--model", "-m", type=str, default="ALLMRec", help="model name")
    parser.add_argument("--dataset", "-d", type=str, default="ml-100k", help="dataset name")
    parser.add_argument("--config_files", type=str, default=None, help="space-separated yaml files")
    # RecBole's multi-process arguments (recbole_llm/distributed.py)
    parser.add_argument("--nproc", type=int, default=1, help="processes on this machine")
    parser.add_argument("--world_size", type=int, default=-1, help="processes in all (default: nproc)")
    parser.add_argument("--ip", type=str, default="localhost", help="address of rank 0")
    parser.add_argument("--port", type=str, default=None, help="port of rank 0 (default: a free one)")
    parser.add_argument("--group_offset", type=int, default=0, help="rank of this machine's first process")
    args, _ = parser.parse_known_args(argv)
    config_files = args.config_files.strip().split(" ") if args.config_files else None
    run_recbole_llm(model=args.model, dataset=args.dataset, config_file_list=config_files, nproc=args.nproc,
                    world_size=args.world_size, ip=args.ip, port=args.port, group_offset=args.group_offset)


def hyper_main(argv=None):
    parser = argparse.ArgumentParser(description="Hyper-parameter search with RecBole's HyperTuning.")
    parser.add_argument("--config_files", type=str, default=None, help="space-separated fixed yaml files")
    parser.add_argument("--params_file", type=str, required=True, help="search space, RecBole .hyper format")
    parser.add_argument("--output_file", type=str, default="hyper_results.txt", help="where results go")
    parser.add_argument("--display_file", type=str, default=None, help="optional plotly html of the search")
    parser.add_argument("--algo", choices=["exhaustive", "random", "bayes"], default="exhaustive")
    parser.add_argument("--max_evals", type=int, default=100, help="trials for random/bayes search")
    parser.add_argument("--early_stop", type=int, default=10, help="stop after N trials without progress")
    args, _ = parser.parse_known_args(argv)

    config_files = args.config_files.strip().split(" ") if args.config_files else None
    tuner = HyperTuning(
        objective_function, algo=args.algo, early_stop=args.early_stop, max_evals=args.max_evals,
        params_file=args.params_file, fixed_config_file_list=config_files, display_file=args.display_file,
    )
    tuner.run()
    tuner.export_result(output_file=args.output_file)
    print("best params:", tuner.best_params)
    print("best result:", tuner.params2result[tuner.params2str(tuner.best_params)])
    print(f"{len(tuner.params2result)} trials written to {args.output_file}")
    return tuner
