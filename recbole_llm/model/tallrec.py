"""TALLRec-style baseline: the ALLMRec prompt without soft tokens, the LLM tuned with LoRA (peft).

Same prompt words, candidates, target and scoring as ``ALLMRec`` (it is ALLMRec with
``use_user_token`` and ``use_item_tokens`` off, no stage 1 and ``lora_args`` set, see
``properties/model/TALLRec.yaml``), so the two are compared on equal terms. It trains with
``ALLMRecTrainer`` (found through its parent class) and needs no backbone.
"""
from recbole_llm.model.allmrec import ALLMRec


class TALLRec(ALLMRec):
    def __init__(self, config, dataset):
        if not config["lora_args"]:
            raise ValueError("TALLRec tunes the LLM with LoRA: set lora_args, e.g. {r: 8, lora_alpha: 16}")
        super().__init__(config, dataset)
