"""TALLRec trains like ALLMRec's stage 2 (``stages: [2]``): LoRA weights instead of projectors."""
from recbole_llm.trainer.allmrec import ALLMRecTrainer


class TALLRecTrainer(ALLMRecTrainer):
    pass
