"""python run_recbole_llm.py --model=ALLMRec --dataset=ml-100k [--config_files="a.yaml b.yaml"] [--key=value ...]"""
from recbole_llm.cli import main

if __name__ == "__main__":
    main()
