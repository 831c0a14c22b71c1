"""Trainers. ``<Model>Trainer`` for model ``<Model>`` lives in ``recbole_llm/trainer/<model>.py``."""
from recbole_llm.trainer.checkpoint import CheckpointSafeMixin, checkpoint_safe, load_checkpoint
