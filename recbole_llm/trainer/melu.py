"""MeLU trains and evaluates exactly like MetaLLMRec (episodic MAML, task evaluation)."""
from recbole_llm.trainer.metallmrec import MetaLLMRecTrainer


class MeLUTrainer(MetaLLMRecTrainer):
    pass
