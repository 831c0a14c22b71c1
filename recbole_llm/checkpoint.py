"""Checkpoints: the one place that reads them, puts them into a model and writes them safely.

RecBole checkpoints pickle the whole ``Config``; ``torch.load`` now defaults to
``weights_only=True`` and refuses them, so ``evaluate(load_best_model=True)`` and
``resume_checkpoint`` crash. Our checkpoints are our own files, so we load them with
``weights_only=False``. The fix is a mixin: the plugin's trainers inherit it and
``checkpoint_safe`` applies it to any other trainer class, RecBole's included.
"""
import os
import uuid

import torch
from recbole.trainer import DecisionTreeTrainer
from torch.nn.parallel import DistributedDataParallel

from recbole_llm import distributed

_SAFE_CLASSES = {}


def load_checkpoint(path, map_location="cpu", model=None):
    """Load a RecBole-style checkpoint written by this project (trusted: may contain pickles).

    A file that is not one (truncated, another format, a dict without ``state_dict`` and
    ``config``) is refused naming the path; with ``model`` (a model name) so is a checkpoint
    written by another model.
    """
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint file not found: {path}") from None
    except Exception as error:  # truncated or not a torch file
        raise RuntimeError(f"cannot read checkpoint {path}: {error}") from error
    if not isinstance(checkpoint, dict) or not {"state_dict", "config"} <= set(checkpoint):
        found = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise RuntimeError(f"{path} is not a RecBole checkpoint (no state_dict and config; found {found})")
    written_by = checkpoint["config"]["model"]
    if model is not None and written_by != model:
        raise ValueError(f"checkpoint {path} was written by model {written_by}, not {model}")
    return checkpoint


def load_into_model(model, checkpoint):
    """Put a loaded checkpoint's weights (and RecBole's ``other_parameter``) into ``model``."""
    model.load_state_dict(checkpoint["state_dict"])
    model.load_other_parameter(checkpoint.get("other_parameter"))
    return model


class CheckpointSafeMixin:
    # False: the trainer has its own training loop that shards work and sums gradients itself
    # (``distributed``), so RecBole's DDP wrapper is not built; None: no multi-process support yet
    recbole_training_loop = True

    def __init__(self, config, model):
        if distributed.is_distributed(config):
            if self.recbole_training_loop is None:
                raise NotImplementedError(f"multi-process training (nproc > 1) is not supported for {config['model']} yet; "
                                          "run it with nproc=1")
            cpu = distributed.uses_cpu_backend(config)
            if cpu or not self.recbole_training_loop:
                # RecBole's wrapper passes device_ids, which a CPU module refuses
                with distributed.single_process_view(config):
                    super().__init__(config, model)
                if self.recbole_training_loop:
                    self.distributed_model = DistributedDataParallel(self.model)
                else:
                    distributed.broadcast_parameters(self.model, config)
            else:
                super().__init__(config, model)
        else:
            super().__init__(config, model)
        # RecBole names the best checkpoint after the model and the second training began; two
        # runs of one model started in the same second (parallel benchmark processes) would then
        # overwrite each other's file and load the other run's weights. A process id and a random
        # suffix keep RecBole's name recognisable and make it unique. All ranks of one
        # multi-process run share rank 0's name: it writes, they all read.
        if getattr(self, "saved_model_file", None):
            stem, extension = os.path.splitext(self.saved_model_file)
            self.saved_model_file = distributed.broadcast_object(
                f"{stem}-{os.getpid()}-{uuid.uuid4().hex[:6]}{extension}", config)

    def _load_best_into_model(self, model_file):
        distributed.barrier(self.config)  # rank 0 has written it
        checkpoint_file = model_file or self.saved_model_file
        load_into_model(self.model, load_checkpoint(checkpoint_file, self.device, self.config["model"]))
        self.logger.info(f"Loading model structure and parameters from {checkpoint_file}")

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if eval_data and load_best_model:
            self._load_best_into_model(model_file)
        return super().evaluate(
            eval_data, load_best_model=False, model_file=model_file, show_progress=show_progress
        )

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        # Written next to the target and renamed, so a crash mid-save never leaves a truncated
        # "best" checkpoint behind. Only rank 0 of a multi-process run writes.
        if not distributed.is_main(self.config):
            return
        target = kwargs.pop("saved_model_file", self.saved_model_file)
        partial = f"{target}.partial"
        super()._save_checkpoint(epoch, verbose=False, saved_model_file=partial, **kwargs)
        os.replace(partial, target)
        if verbose:
            self.logger.info(f"Saving current: {target}")

    def resume_checkpoint(self, resume_file):
        load_checkpoint(resume_file, model=self.config["model"])  # a clear error for a wrong file
        original_load = torch.load

        def trusted_load(*args, **kwargs):
            kwargs["weights_only"] = False
            return original_load(*args, **kwargs)

        # RecBole's resume_checkpoint restores epoch, optimizer and best score as well; reuse it
        # with the one argument it gets wrong.
        torch.load = trusted_load
        try:
            return super().resume_checkpoint(resume_file)
        finally:
            torch.load = original_load


def checkpoint_safe(trainer_class):
    """``trainer_class`` with checkpoint loading fixed; the class keeps its name for RecBole's logs.

    Decision-tree trainers (xgboost/lightgbm) keep their own file formats and are returned as is.
    """
    if issubclass(trainer_class, (CheckpointSafeMixin, DecisionTreeTrainer)):
        return trainer_class
    if trainer_class not in _SAFE_CLASSES:
        _SAFE_CLASSES[trainer_class] = type(
            trainer_class.__name__, (CheckpointSafeMixin, trainer_class),
            {"__doc__": trainer_class.__doc__, "__module__": trainer_class.__module__},
        )
    return _SAFE_CLASSES[trainer_class]
