"""python run_hyper.py --config_files=fixed.yaml --params_file=space.hyper [--algo=exhaustive|random|bayes]"""
from recbole_llm.cli import hyper_main

if __name__ == "__main__":
    hyper_main()
