"""Trainers of the plugin's models, found by ``recbole_llm.utils.get_trainer`` through a model's
lineage (``<Name>Trainer`` for the model or the plugin class it derives from)."""
from recbole_llm.trainer.allmrec import ALLMRecTrainer
from recbole_llm.trainer.episodic import EpisodicTrainer, RatingBaselineTrainer

__all__ = ["ALLMRecTrainer", "EpisodicTrainer", "RatingBaselineTrainer"]
