"""Two-stage trainer of ALLMRec: stage 1 (collaborative-text alignment), then stage 2 (LLM alignment).

``stages`` chooses what one ``fit`` runs (``[1, 2]``, ``[1]``, ``[2]`` or ``[]``). Epochs are
numbered across stages (stage-1 epochs first), so a checkpoint written after any epoch resumes
in the right stage (``resume_checkpoint``). Checkpoints hold ALLMRec's trainable weights only
(``ALLMRec.state_dict``) plus the optimizer of the stage that wrote them.

Samples: by default one per user and epoch, the user's last training transition (the official
code); ``train_samples: all`` uses every training prefix in stage 1 (the paper's A-LLMRec_all).
Stage 2 uses at most ``stage2_max_samples`` of the users per epoch (seeded), because every sample
is a forward and backward pass through the LLM.

Frozen projections: with ``stage2_frozen_projection_samples: N`` > 0, F_U and F_I keep their
initial weights for the first N stage-2 samples while the score token (and LoRA) learn, so the
LLM first learns to read the one signal it can follow (results/allmrec_oracle.md) before the
projections start to move the item tokens under it. N larger than the whole budget freezes them
throughout (an ablation).

Curriculum: with ``stage2_curriculum_samples: N`` > 0, the first N stage-2 samples show
``stage2_curriculum_candidates`` candidates per prompt (an easier choice: results/allmrec_ml-100k_score_sum_uni4.md,
the score token is read on 5 candidates and not learned on 20), the rest ``num_candidates``.

Learning curve: with ``stage2_eval_every: N`` > 0 and validation data, the validation metrics of
``stage2_eval_users`` seeded users are computed before stage 2 and after every N stage-2 batches
(``trainer.learning_curve``, ``result["learning_curve"]``). The same users and sampled negatives
at every point, and the training's random streams untouched: the weights equal a run without it.
"""
import contextlib
import random
import time
from collections import OrderedDict

import numpy as np
import torch
from recbole.trainer import Trainer
from recbole.utils import init_seed, set_color
from tqdm import tqdm

from recbole_llm import distributed
from recbole_llm.checkpoint import CheckpointSafeMixin, load_checkpoint, load_into_model
from recbole_llm.data.scenarios import limit_users


class ALLMRecTrainer(CheckpointSafeMixin, Trainer):
    # multi-process: every rank walks the same seeded batches and computes the loss of its share of
    # each (ALLMRec.loss_shard); the gradients are summed over the ranks
    recbole_training_loop = False
    def __init__(self, config, model):
        super().__init__(config, model)
        self.stages = [int(s) for s in (config["stages"] if config["stages"] is not None else [1, 2])]
        if any(s not in (1, 2) for s in self.stages):
            raise ValueError(f"stages must list 1 and/or 2, got {config['stages']!r}")
        if 1 in self.stages and not (model.use_user_token or model.use_item_tokens):
            raise ValueError("stage 1 aligns the backbone with text for the soft tokens: enable use_user_token or "
                             "use_item_tokens, or train stage 2 only (stages: [2])")
        self.plan = [(1, e) for e in range(int(config["stage1_epochs"])) if 1 in self.stages]
        self.plan += [(2, e) for e in range(int(config["stage2_epochs"])) if 2 in self.stages]
        self.stage_times = {}
        self._resumed_optimizer = None
        self.curriculum_candidates = int(config["stage2_curriculum_candidates"] or 0)
        if int(config["stage2_curriculum_samples"] or 0) > 0 and not 2 <= self.curriculum_candidates <= model.num_candidates:
            raise ValueError(f"stage2_curriculum_candidates must be between 2 and num_candidates={model.num_candidates} "
                             f"when stage2_curriculum_samples > 0, got {config['stage2_curriculum_candidates']!r}")

    # -- optimisers -------------------------------------------------------------------------------

    def _stage_parameters(self, stage):
        model = self.model
        if stage == 1:
            modules = [model.item_encoder, model.item_decoder, model.text_encoder, model.text_decoder]
            if model.sbert is not None:
                modules.append(model.sbert)
        else:
            modules = [m for m in (getattr(model, "user_proj", None), getattr(model, "item_proj", None),
                                   getattr(model, "score_proj", None), model.llm) if m is not None]
        params = [p for m in modules for p in m.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"stage {stage} has nothing to train with this configuration")
        return params

    def _begin_stage(self, stage, resumed_state=None):
        lr = float(self.config[f"stage{stage}_lr"])
        self.stage_parameters = self._stage_parameters(stage)
        self.optimizer = torch.optim.Adam(self.stage_parameters, lr=lr, betas=(0.9, 0.98))
        if resumed_state is not None:
            self.optimizer.load_state_dict(resumed_state)
        self.model.stage = stage

    # -- samples ----------------------------------------------------------------------------------

    def _sample_rows(self, train_data, stage):
        """Row indices of the training split a stage trains on (one per user unless ``all``)."""
        feat = train_data._dataset.inter_feat
        users = feat[self.model.USER_ID].numpy()
        if stage == 1 and self.config["train_samples"] == "all":
            return np.arange(len(users))
        if self.config["train_samples"] not in ("last", "all"):
            raise ValueError(f"train_samples must be 'last' or 'all', got {self.config['train_samples']!r}")
        last = {}
        for row, user in enumerate(users):
            last[user] = row  # rows are chronological within a user: the last one is the newest
        return np.array(sorted(last.values()))

    def _epoch_length(self, rows, stage):
        limit = self.config["stage2_max_samples"] if stage == 2 else None
        return min(len(rows), int(limit)) if limit else len(rows)

    def _epoch_rows(self, rows, stage, generator):
        order = rows[torch.randperm(len(rows), generator=generator).numpy()]
        return order[: self._epoch_length(rows, stage)]

    # -- training ---------------------------------------------------------------------------------

    # -- learning curve -------------------------------------------------------------------------

    def _curve_point(self, samples, recent_losses):
        """Validation metrics now (the curve's users; every point reseeds, so the same negatives)."""
        if self._curve_data is None:
            return
        with _random_streams_untouched():
            init_seed(self.config["seed"], self.config["reproducibility"])
            _, result = self._valid_epoch(self._curve_data, show_progress=False)
        self.model.train()
        point = {"stage2_samples": samples, "users": self._curve_users,
                 **{k: round(float(v), 4) for k, v in result.items()}}
        if recent_losses:
            point["train_loss"] = round(sum(recent_losses) / len(recent_losses), 4)
        self.learning_curve.append(point)
        self.logger.info(set_color("ALLMRec stage 2 learning curve", "blue") + f": {point}")

    def _freeze_projections(self, frozen):
        for module in (getattr(self.model, "user_proj", None), getattr(self.model, "item_proj", None)):
            if module is not None:
                module.requires_grad_(not frozen)

    def _run_epoch(self, train_data, stage, rows, global_epoch, show_progress, samples_before=0):
        self.model.train()
        generator = torch.Generator().manual_seed(int(self.config["seed"]) * 1000 + global_epoch)
        rows = self._epoch_rows(rows, stage, generator)
        batch_size = int(self.config[f"stage{stage}_batch_size"])
        feat = train_data._dataset.inter_feat
        batches = range(0, len(rows), batch_size)
        if show_progress:
            batches = tqdm(batches, desc=set_color(f"Stage {stage} epoch {global_epoch:>3}", "pink"), ncols=100)
        if distributed.is_distributed(self.config):
            self.model.loss_shard = distributed.rank_and_world(self.config)
        frozen_samples = int(self.config["stage2_frozen_projection_samples"] or 0) if stage == 2 else 0
        curriculum_samples = int(self.config["stage2_curriculum_samples"] or 0) if stage == 2 else 0
        totals, count = {}, 0
        try:
            for start in batches:
                self._freeze_projections(samples_before + start < frozen_samples)
                self.model.train_candidates = (self.curriculum_candidates if samples_before + start < curriculum_samples
                                               else self.model.num_candidates)
                index = torch.from_numpy(rows[start:start + batch_size])
                interaction = feat[index].to(self.device)
                self.optimizer.zero_grad()
                loss = self.model.calculate_loss(interaction, generator)  # None: no rows for this rank
                if loss is not None:
                    self._check_nan(loss)
                    loss.backward()
                distributed.all_reduce_gradients(self.stage_parameters, self.config)
                if self.clip_grad_norm:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), **self.clip_grad_norm)
                self.optimizer.step()
                weight = self.model.loss_weight
                parts = {"loss": loss.item() / weight} if loss is not None else {}
                if loss is not None:
                    parts.update(self.model.last_losses)
                batch_loss = 0.0
                for shares in distributed.gather([{k: v * weight for k, v in parts.items()}], self.config):
                    for key, value in shares.items():
                        totals[key] = totals.get(key, 0.0) + value
                    batch_loss += shares.get("loss", 0.0)
                count += 1
                if stage == 2 and self.curve_every:
                    self._curve_losses.append(batch_loss)
                    self._curve_samples += len(index)
                    if len(self._curve_losses) == self.curve_every:
                        self._curve_point(self._curve_samples, self._curve_losses)
                        self._curve_losses = []
        finally:
            self.model.train_candidates = self.model.num_candidates
            self._freeze_projections(False)  # never left frozen: the state dict and checkpoints keep them
        return {key: value / max(count, 1) for key, value in totals.items()}, len(rows)

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        self.epoch_losses = []
        self.learning_curve, self._curve_losses, self._curve_samples = [], [], 0
        self.curve_every = int(self.config["stage2_eval_every"] or 0)
        self._curve_data = None
        if self.curve_every and valid_data is not None:
            self._curve_data = limit_users(self.config, valid_data, int(self.config["stage2_eval_users"]))
            curve_rows = self._curve_data._dataset
            self._curve_users = len(curve_rows.inter_feat[curve_rows.uid_field].unique())
        rows = {stage: self._sample_rows(train_data, stage) for stage in set(s for s, _ in self.plan)}
        current = None
        for global_epoch, (stage, epoch) in enumerate(self.plan):
            if global_epoch < self.start_epoch:
                continue
            if stage != current:
                resuming = global_epoch == self.start_epoch > 0 and self.plan[global_epoch - 1][0] == stage
                self._begin_stage(stage, self._resumed_optimizer if resuming else None)
                current = stage
                if stage == 2 and not resuming:
                    self._curve_point(0, [])  # the curve's origin: stage 2 untrained
            began = time.time()
            losses, samples = self._run_epoch(train_data, stage, rows[stage], global_epoch, show_progress,
                                              samples_before=epoch * self._epoch_length(rows[stage], stage))
            seconds = time.time() - began
            self.stage_times[stage] = self.stage_times.get(stage, 0.0) + seconds
            self.epoch_losses.append((stage, epoch, losses))
            if stage == 1 and (global_epoch + 1 == len(self.plan) or self.plan[global_epoch + 1][0] != 1):
                self.model.refresh_text_embeddings()  # fine-tuned SBERT -> q_i used by stage 2 and inference
            if verbose:
                parts = ", ".join(f"{k}: {v:.6f}" for k, v in losses.items())
                self.logger.info(set_color(f"ALLMRec stage {stage} epoch {epoch}", "green")
                                 + f" [{seconds:.1f}s, {samples} samples]: {parts}")
            if saved:
                self._save_checkpoint(global_epoch, verbose=verbose)
        if not self.plan and saved:
            self._save_checkpoint(-1, verbose=verbose)
        for stage, seconds in sorted(self.stage_times.items()):
            self.logger.info(set_color(f"ALLMRec stage {stage} time", "yellow") + f": {seconds:.1f}s")

        self.best_valid_score, self.best_valid_result = -1, OrderedDict()
        if valid_data and self.eval_step > 0:
            began = time.time()
            self.best_valid_score, self.best_valid_result = self._valid_epoch(
                limit_users(self.config, valid_data), show_progress=show_progress)
            self.logger.info(set_color("ALLMRec validation", "blue") + f" [{time.time() - began:.1f}s]: "
                             f"{dict(self.best_valid_result)}")
        return self.best_valid_score, self.best_valid_result

    def resume_checkpoint(self, resume_file):
        """Continue after the epoch a checkpoint was written at, in that epoch's stage."""
        checkpoint = load_checkpoint(resume_file, self.device, self.config["model"])
        self.saved_model_file = str(resume_file)
        self.start_epoch = checkpoint["epoch"] + 1
        self.cur_step = checkpoint["cur_step"]
        load_into_model(self.model, checkpoint)
        self._resumed_optimizer = checkpoint["optimizer"]
        self.logger.info(f"ALLMRec: resuming from {resume_file} at epoch {self.start_epoch} of {len(self.plan)}")


@contextlib.contextmanager
def _random_streams_untouched():
    """torch's, numpy's and Python's global random states as they were before the block."""
    numpy_state, python_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng():
        yield
    np.random.set_state(numpy_state)
    random.setstate(python_state)
