"""TALLRec-style baseline: the ALLMRec prompt without soft tokens, the LLM tuned with LoRA (peft).

Same prompt words, candidates, target and scoring as ``ALLMRec`` (it is ALLMRec with
``use_user_token`` and ``use_item_tokens`` off, no stage 1 and ``lora_args`` set, see
``properties/model/TALLRec.yaml``), so the two are compared on equal terms.
"""
from recbole_llm.model.allmrec import ALLMRec


class TALLRec(ALLMRec):
    pass
