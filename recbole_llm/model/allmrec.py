"""ALLMRec (A-LLMRec, KDD'24): a frozen RecBole model aligned with a text encoder and a frozen LLM.

* Backbone: any RecBole checkpoint (``backbone_checkpoint``; SASRec, GRU4Rec, NextItNet, BPR,
  NeuMF, ...), rebuilt from the checkpoint's own config and frozen (``model/backbone.py``). The
  model only loads it; without a checkpoint the quick start first trains ``backbone_args`` as a
  run of its own, cached under ``cache_dir`` by a content key of its config (``prerequisites``).
  ``BackboneAdapter`` gives item embeddings E_i and the user representation x_u (sequential
  models: the sequence output; general models: the user embedding). The frozen backbone always
  runs in eval mode, i.e. **without dropout** (the official code leaves its SASRec in train mode,
  so its x_u carries dropout noise in both stages).
* Stage 1 (paper 4.1): item encoder/decoder over E, text encoder/decoder over SBERT(text);
  loss = match * MSE(e, q) + alpha * MSE(dec(e), E) + beta * MSE(dec_T(q), Q) + rec * BCE of
  x_u . dec(e) for the positive and one sampled negative (the paper's dot product; the official
  code uses the mean over dimensions). ``match_norm: batch`` standardises both latents over the
  batch before the MSE (our addition against the collapse of both encoders to constant outputs).
* Stage 2 (paper 4.2): F_U, F_I two-layer MLPs into the LLM's hidden size; the prompt carries the
  user soft token, the last ``history_len`` titles each followed by its joint-embedding token and
  ``num_candidates`` shuffled candidate titles each followed by its token; the loss is on the
  target title's tokens only (``stage2_objective: generation``, the paper's) or, with
  ``listwise`` (ours), the softmax cross-entropy over all candidates' title log-likelihoods.
* Scores: ``predict`` builds one prompt per user from that user's candidate rows (RecBole's
  ``uni19`` gives 1 positive + 19 negatives) in a seeded shuffled order and returns the LLM
  log-likelihood of each candidate's quoted title (``recbole_llm.llm.scoring``; all candidates of
  a user in one forward pass by default, ``score_method``).
  ``full_sort_predict`` reranks the backbone's top ``rerank_top_n`` items with the LLM.
* Items with fewer than ``cold_item_threshold`` training interactions use q_i = f_T(SBERT(text))
  instead of e_i = f_I(E_i) (the paper's A-LLMRec (SBERT)); ``item_embedding_source: text`` uses
  q_i for every item (ablation); ``backbone`` feeds the backbone's E_i straight to F_I, which with
  ``stages: [2]`` is the paper's MLP-LLM baseline (no stage 1).

The LLM (and the backbone) are submodules but their frozen weights are left out of
``state_dict``: checkpoints hold only what ALLMRec trains (see ``ALLMRecTrainer``).
"""
import contextlib
import hashlib
import re

import numpy as np
import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType

from recbole_llm.data.history import user_histories
from recbole_llm.llm import models
from recbole_llm.llm.scoring import (BRANCH_REDUCTIONS, branch_log_likelihoods, score_branches, score_continuations,
                                    target_token_loss)
from recbole_llm.model.backbone import backbone_run, load_backbone

FINETUNE = ("full", "last", "frozen")
ITEM_SOURCES = ("joint", "text", "backbone")
SCORE_METHODS = ("branches", "kv_cache")
STAGE2_OBJECTIVES = ("generation", "listwise")
ANSWER_CUE = ". The recommendation is"  # the prompt's last words; every candidate's title follows them


def mlp_projector(in_dim, out_dim, activation):
    layers = torch.nn.Sequential(
        torch.nn.Linear(in_dim, out_dim), torch.nn.LayerNorm(out_dim), activation, torch.nn.Linear(out_dim, out_dim))
    for layer in (layers[0], layers[3]):
        torch.nn.init.xavier_normal_(layer.weight)
    return layers


def seeded_word_vectors(word_embeddings, seed=0):
    """Two trainable float32 copies of seeded random rows of an LLM's word-embedding table (in the
    table's own units: see ``ScoreToken``)."""
    first = min(1000, len(word_embeddings) // 2)  # past the special and byte tokens of real vocabularies
    picks = torch.randint(first, len(word_embeddings), (2,), generator=torch.Generator().manual_seed(seed))
    return tuple(torch.nn.Parameter(word_embeddings[i].detach().float().clone()) for i in picks)


class ScoreToken(torch.nn.Module):
    """``(a + z * b) * scale`` for standardised scores z: a soft token per candidate that carries one
    number (the score oracle, results/allmrec_oracle.md). a and b start as two words' table rows and
    stay in the table's units; ``scale`` is what the LLM's embedding module multiplies rows by
    (Gemma: sqrt(hidden)), so the token starts at a word's scale as the LLM sees it, and Adam's
    step (absolute, in parameter units) is the same share of a and b for every LLM."""

    def __init__(self, embed, seed=0):
        super().__init__()
        self.offset, self.slope = seeded_word_vectors(embed.weight, seed)
        self.scale = models.input_word_scale(embed)

    def forward(self, z):
        return (self.offset + z.unsqueeze(-1) * self.slope) * self.scale


def _standardise(z):
    return (z - z.mean(0)) / z.std(0).clamp(min=1e-6)


class ALLMRec(SequentialRecommender):
    input_type = InputType.POINTWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.config = config
        self.n_users = dataset.user_num
        self.stage = 1
        self.last_losses = {}
        # (rank, world) in multi-process training: every rank samples the randomness of the whole
        # batch (the same generator stream as one process), computes the loss of its own rows only
        # and scales it by its share (``loss_weight``), so the gradients summed over ranks are the
        # one-process gradients (ALLMRecTrainer, recbole_llm/distributed.py)
        self.loss_shard = None
        self.loss_weight = 1.0
        self.seed = int(config["seed"])
        self.use_user_token = bool(config["use_user_token"])
        self.use_item_tokens = bool(config["use_item_tokens"])
        self.history_len = int(config["history_len"])
        self.num_candidates = int(config["num_candidates"])
        # candidates in the next stage-2 prompt: the trainer lowers it during a curriculum warm-up
        # (stage2_curriculum_candidates), else num_candidates
        self.train_candidates = self.num_candidates
        self.score_reduction = self._choice(config, "score_reduction", BRANCH_REDUCTIONS)
        self.score_calibration = self._choice(config, "score_calibration", ("none", "title_prior", "prompt_prior"))
        self._title_prior = None  # [n_items] log-likelihood of each title after the answer cue alone (lazy)
        self.score_batch_size = int(config["score_batch_size"])
        self.score_method = config["score_method"] or "branches"
        if self.score_method not in SCORE_METHODS:
            raise ValueError(f"score_method must be one of {SCORE_METHODS}, got {self.score_method!r}")
        self.score_users_per_pass = int(config["score_users_per_pass"] or 1)
        if self.score_reduction == "choice" and (self.score_method != "branches" or self.score_calibration != "none"):
            raise ValueError("score_reduction: choice normalises among one prompt's candidates: it needs "
                             "score_method: branches and score_calibration: none")
        self.stage2_objective = config["stage2_objective"] or "generation"
        if self.stage2_objective not in STAGE2_OBJECTIVES:
            raise ValueError(f"stage2_objective must be one of {STAGE2_OBJECTIVES}, got {self.stage2_objective!r}")
        self.rerank_top_n = int(config["rerank_top_n"])
        self.weights = {k: float(config[f"{k}_weight"]) for k in ("match", "item_recon", "text_recon", "rec")}
        self.match_norm = config["match_norm"] or "none"
        if self.match_norm not in ("none", "batch"):
            raise ValueError(f"match_norm must be 'none' or 'batch', got {self.match_norm!r}")
        self.item_source = config["item_embedding_source"]
        if self.item_source not in ITEM_SOURCES:
            raise ValueError(f"item_embedding_source must be one of {ITEM_SOURCES}, got {self.item_source!r}")
        self.cold_item_text_tokens = self._choice(config, "cold_item_text_tokens", ("always", "inference"))
        self.latent_norm = self._choice(config, "latent_norm", ("none", "standardise"))
        self.soft_token_norm = self._choice(config, "soft_token_norm", ("none", "word"))
        self.item_token_position = self._choice(config, "item_token_position", ("after", "before"))
        self._latent_stats = None

        # training histories: negatives exclude them; item counts decide cold items
        histories = user_histories(dataset)
        self.history_sets = [set(h.tolist()) for h in histories]
        self._check_candidates_fit(dataset)
        counts = np.bincount(np.concatenate(histories + [np.zeros(0, dtype=np.int64)]), minlength=self.n_items)
        warm = torch.from_numpy(counts >= int(config["cold_item_threshold"]))
        warm[0] = False
        self.register_buffer("item_warm", warm, persistent=False)

        self.item_text = dataset.texts("item", "item_text_template")
        titles = dataset.texts("item", "item_title_template" if config["item_title_template"] else "item_text_template")
        self.titles = [t.replace('"', "'") for t in titles]

        self.backbone = load_backbone(config, dataset) if self.needs_backbone(config) else None
        latent = int(config["latent_dim"])
        if self.backbone is not None:
            d = self.backbone.item_dim
            self.item_encoder = torch.nn.Sequential(torch.nn.Linear(d, latent), torch.nn.Sigmoid())
            self.item_decoder = torch.nn.Linear(latent, d)
        self._init_text_encoder(config, dataset, latent)

        self.llm, self.tokenizer = models.load_causal_lm(config["llm"], config["llm_dtype"] or "auto", self.device)
        for p in self.llm.parameters():
            p.requires_grad_(False)
        if config["lora_args"]:
            self.llm = self._with_lora(self.llm, dict(config["lora_args"]))
        hidden = self.llm.config.hidden_size
        words = self.llm.get_input_embeddings()
        # the mean norm of words as the LLM sees them (Gemma scales its table by sqrt(hidden))
        self.word_norm = float(words.weight.detach().float().norm(dim=-1).mean()) * models.input_word_scale(words)
        if self.use_user_token:
            user_dim = self._user_dim()
            self.user_proj = mlp_projector(user_dim, hidden, torch.nn.LeakyReLU())
        if self.use_item_tokens:
            token_input = self.backbone.item_dim if self.item_source == "backbone" else latent
            self.item_proj = mlp_projector(token_input, hidden, torch.nn.GELU())
        self.candidate_score_token = bool(config["candidate_score_token"])
        if self.score_calibration == "prompt_prior" and not (self.use_user_token or self.use_item_tokens
                                                             or self.candidate_score_token or config["lora_args"]):
            raise ValueError("score_calibration: prompt_prior subtracts the same prompt's scores without soft tokens "
                             "and adapters: this model has neither, so every score would be 0")
        if self.candidate_score_token:
            self.score_token_layout = self._choice(config, "score_token_layout", ("add", "separate"))
            if self.score_token_layout == "add":
                self.score_proj = torch.nn.Linear(1, hidden)  # token += a + z * b (a, b trained in stage 2)
            else:
                self.score_proj = ScoreToken(words, self.seed)  # a token of its own after the item's
        self._prompt_ids = {}
        self.title_ids = None  # tokenised lazily (see title_token_ids)

    @staticmethod
    def _choice(config, key, choices):
        value = config[key] or choices[0]
        if value not in choices:
            raise ValueError(f"{key} must be one of {choices}, got {value!r}")
        return value

    # -- prerequisites: the backbone arrives by config path ----------------------------------------

    @staticmethod
    def needs_backbone(config):
        """Soft tokens, the score token and full ranking need the backbone; the LLM-only prompt does not."""
        return bool(config["use_user_token"] or config["use_item_tokens"] or config["candidate_score_token"]
                    or config["eval_args"]["mode"] == "full")

    @classmethod
    def prerequisites(cls, config):
        """``{config key: run}`` of the runs the quick start trains before building this model
        (each run: ``{"model", "config_dict", "path"}``): the backbone when no checkpoint is given."""
        if config["backbone_checkpoint"] or not cls.needs_backbone(config):
            return {}
        return {"backbone_checkpoint": backbone_run(config)}

    # -- set-up helpers ------------------------------------------------------------------------

    def _init_text_encoder(self, config, dataset, latent):
        finetune = config["sbert_finetune"]
        if finetune not in FINETUNE:
            raise ValueError(f"sbert_finetune must be one of {FINETUNE}, got {finetune!r}")
        self.sbert_finetune = finetune
        # the text embedding of every item; refreshed after stage 1 when SBERT is fine-tuned
        self.register_buffer("item_text_emb", dataset.text_embeddings("item", "item_text_template").clone())
        self.sbert = None
        if finetune != "frozen":
            self.sbert = models.load_sentence_encoder(config["text_encoder"], self.device)
            self.sbert.max_seq_length = min(self.sbert.max_seq_length or 256, int(config["text_max_length"] or 256))
            if finetune == "last":
                self._freeze_all_but_last_layer(self.sbert)
        s = self.item_text_emb.shape[1]
        self.text_encoder = torch.nn.Sequential(torch.nn.Linear(s, latent), torch.nn.Sigmoid())
        self.text_decoder = torch.nn.Linear(latent, s)

    @staticmethod
    def _freeze_all_but_last_layer(encoder):
        pattern = re.compile(r"\.layers?\.(\d+)\.")
        indices = [int(m.group(1)) for n, _ in encoder.named_parameters() if (m := pattern.search(n))]
        if not indices:
            raise ValueError("sbert_finetune=last: the text encoder has no numbered layers")
        last = f".{max(indices)}."
        for name, p in encoder.named_parameters():
            m = pattern.search(name)
            p.requires_grad_(bool(m) and m.group(0).endswith(last))

    @staticmethod
    def _with_lora(llm, args):
        from peft import LoraConfig, get_peft_model  # heavy (~4 s): only TALLRec-style runs pay for it

        args.setdefault("target_modules", ["q_proj", "v_proj"])
        return get_peft_model(llm, LoraConfig(task_type="CAUSAL_LM", **args))

    def _user_dim(self):
        probe_users = torch.tensor([1], device=self.device)
        probe_seq = torch.zeros(1, self.max_seq_length, dtype=torch.long, device=self.device)
        probe_seq[0, 0] = 1
        return self.backbone.user_representation(probe_users, probe_seq, torch.tensor([1], device=self.device)).shape[-1]

    # -- checkpoints: only what ALLMRec trains ----------------------------------------------------

    def _frozen_keys(self):
        keys = set()
        for prefix in ("llm", "backbone", "sbert"):
            module = getattr(self, prefix, None)
            if module is None:
                continue
            trainable = {n for n, p in module.named_parameters() if p.requires_grad}
            keys |= {f"{prefix}.{n}" for n in module.state_dict(keep_vars=True) if n not in trainable}
        return keys

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        for key in self._frozen_keys():
            state.pop(prefix + key, None)
        return state

    def load_state_dict(self, state_dict, strict=True, assign=False):
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        self._latent_stats = None  # new stage-1 weights
        frozen = self._frozen_keys()
        missing = [k for k in result.missing_keys if k not in frozen]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"ALLMRec checkpoint does not match this configuration: missing {missing[:8]}, "
                f"unexpected {result.unexpected_keys[:8]}"
            )
        return result

    def train(self, mode=True):
        super().train(mode)
        self.llm.eval()  # frozen LLM (LoRA dropout included: scores must not be noisy)
        if self.sbert is not None and self.sbert_finetune == "frozen":
            self.sbert.eval()
        return self

    # -- item and user embeddings -----------------------------------------------------------------

    def sbert_embeddings(self, items):
        """SBERT(text) of ``items``: through the trainable encoder in stage 1, else the table."""
        if self.sbert is None or self.stage != 1 or not torch.is_grad_enabled():
            return self.item_text_emb[items]
        return self._encode_texts(items)

    def _encode_texts(self, items):
        features = self.sbert.tokenize([self.item_text[i] for i in items.tolist()])
        features = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in features.items()}
        return self.sbert(features)["sentence_embedding"].float()

    @torch.no_grad()
    def refresh_text_embeddings(self, batch_size=64):
        """Re-embed every item's text with the fine-tuned SBERT (used by stage 2 and inference)."""
        self._latent_stats = None  # stage 1 has ended: its latents are final
        if self.sbert is None:
            return
        was_training = self.sbert.training
        self.sbert.eval()
        rows = []
        for start in range(1, self.n_items, batch_size):
            items = torch.arange(start, min(start + batch_size, self.n_items), device=self.device)
            rows.append(self._encode_texts(items))
        self.item_text_emb[1:] = torch.cat(rows)
        self.sbert.train(was_training)

    @torch.no_grad()
    def joint_item_embeddings(self, items):
        """e_i = f_I(E_i) for warm items, q_i = f_T(SBERT(text_i)) otherwise (or always: ablation).
        ``cold_item_text_tokens: inference`` uses e_i for every item while training (the official
        code) and q_i for cold items only at inference. ``latent_norm: standardise`` centres and
        scales every dimension by its mean and std over all items (stage-1 sigmoid latents vary
        by ~0.02 around a shared mean, so the item-specific part is a few % of F_I's input)."""
        latent = self._raw_latents(items, self.training)
        if self.latent_norm == "standardise":
            mean, std = self._latent_statistics()
            latent = (latent - mean) / std
        return latent

    def _raw_latents(self, items, training):
        if self.item_source == "backbone":  # MLP-LLM: no stage-1 latent, the backbone's own E_i
            return self.backbone.item_embeddings(items)
        if self.item_source == "text" or self.backbone is None:
            return self.text_encoder(self.item_text_emb[items])
        q = self.text_encoder(self.item_text_emb[items])
        e = self.item_encoder(self.backbone.item_embeddings(items))
        use_e = self.item_warm[items]
        if self.cold_item_text_tokens == "inference" and training:
            use_e = torch.ones_like(use_e)
        return torch.where(use_e.unsqueeze(-1), e, q)

    def _latent_statistics(self):
        """Per-dimension mean and std of all items' latents as inference sees them, computed once
        per set of stage-1 weights (stage 2 does not change them)."""
        if self._latent_stats is None:
            latents = self._raw_latents(torch.arange(1, self.n_items, device=self.device), training=False)
            self._latent_stats = (latents.mean(0), latents.std(0).clamp(min=1e-6))
        return self._latent_stats

    def soft_tokens(self, user_vector, history, candidates):
        """``(user token, history item tokens, candidate item tokens)`` in the LLM's input space,
        each ``None`` when switched off; ``soft_token_norm: word`` rescales every token to the mean
        norm of the LLM's word embeddings (untrained projections give norms ~5x theirs);
        ``candidate_score_token`` adds ``a + z * b`` to each candidate's token, z its standardised
        backbone score for this user (not in the paper); ``score_token_layout: separate`` gives
        that score a token of its own right after the item's (candidate tokens ``[n, 2, H]``).
        Without item tokens the score token alone follows each title: the score oracle's prompt."""
        user = self.user_proj(user_vector) if self.use_user_token else None
        history_tokens = candidate_tokens = None
        if self.use_item_tokens:
            projected = self.item_proj(self.joint_item_embeddings(torch.cat([history, candidates])))
            history_tokens, candidate_tokens = projected[: len(history)], projected[len(history):]
        if self.candidate_score_token:
            z = self.candidate_scores(user_vector, candidates)
            score = self.score_proj(z.unsqueeze(-1) if self.score_token_layout == "add" else z)
            if candidate_tokens is None:
                candidate_tokens = score
            elif self.score_token_layout == "add":
                candidate_tokens = candidate_tokens + score
            else:
                candidate_tokens = torch.stack([candidate_tokens, score.to(candidate_tokens.dtype)], 1)
        if self.soft_token_norm == "word":
            user, history_tokens, candidate_tokens = (
                None if t is None else t * (self.word_norm / t.norm(dim=-1, keepdim=True).clamp(min=1e-6))
                for t in (user, history_tokens, candidate_tokens))
        return user, history_tokens, candidate_tokens

    @property
    def needs_user_vectors(self):
        return self.use_user_token or self.candidate_score_token

    @torch.no_grad()
    def candidate_scores(self, user_vector, candidates):
        """The frozen backbone's scores of ``candidates`` for this user, standardised over the
        list (``candidate_score_token``: the personal signal the matching oracle showed the LLM
        cannot compute itself from a user token and item tokens; results/allmrec_oracle.md)."""
        scores = self.backbone.item_embeddings(candidates) @ user_vector
        return (scores - scores.mean()) / scores.std().clamp(min=1e-6)

    def _user_vectors(self, interaction):
        return self.backbone.user_representation(
            interaction[self.USER_ID], interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])

    def _check_candidates_fit(self, dataset):
        """A candidate list is the target plus ``num_candidates - 1`` items outside the user's
        training history: refuse, before any training, data where some user lacks that many."""
        sizes = [len(h - {0}) for h in self.history_sets]
        user = int(np.argmax(sizes)) if sizes else 0
        outside = self.n_items - 1 - (sizes[user] if sizes else 0)
        if outside < self.num_candidates:
            token = dataset.field2id_token[dataset.uid_field][user]
            raise ValueError(
                f"num_candidates={self.num_candidates} does not fit: user {token} has only {outside} items outside "
                f"their training history (the target among them); lower num_candidates")

    # -- stage 1 ----------------------------------------------------------------------------------

    def sample_negatives(self, users, count, generator, extra_exclude=()):
        """``count`` distinct items per user outside the user's training history (and extras)."""
        out = []
        for row, user in enumerate(users.tolist()):
            excluded = self.history_sets[user] | set(extra_exclude[row] if len(extra_exclude) else ())
            available = self.n_items - 1 - len([i for i in excluded if i > 0])
            if available < count:
                raise ValueError(f"user {user} has only {available} items left to sample {count} negatives from")
            chosen = []
            while len(chosen) < count:
                item = int(torch.randint(1, self.n_items, (1,), generator=generator))
                if item not in excluded and item not in chosen:
                    chosen.append(item)
            out.append(chosen)
        return torch.tensor(out, dtype=torch.long, device=self.device)

    def _own_rows(self, n):
        """Rows of a batch of ``n`` this process computes the loss of (all of them in one process)."""
        rank, world = self.loss_shard or (0, 1)
        return torch.arange(rank, n, world, device=self.device)

    def stage1_loss(self, interaction, generator):
        pos = interaction[self.ITEM_ID]
        neg = self.sample_negatives(interaction[self.USER_ID], 1, generator)[:, 0]
        own = self._own_rows(len(pos))
        self.loss_weight = len(own) / len(pos)
        if len(own) == 0:
            return None
        pos, neg = pos[own], neg[own]
        items = torch.cat([pos, neg])
        E = self.backbone.item_embeddings(items)
        Q = self.sbert_embeddings(items)
        e, q = self.item_encoder(E), self.text_encoder(Q)
        if self.match_norm == "batch":
            match = F.mse_loss(_standardise(e), _standardise(q))
        else:
            match = F.mse_loss(e, q)
        E_rec = self.item_decoder(e)
        item_recon = F.mse_loss(E_rec, E)
        text_recon = F.mse_loss(self.text_decoder(q), Q.detach())
        x_u = self._user_vectors(interaction)[own]
        n = len(pos)
        logits = torch.cat([(x_u * E_rec[:n]).sum(-1), (x_u * E_rec[n:]).sum(-1)])
        labels = torch.cat([torch.ones(n), torch.zeros(n)]).to(logits.device)
        rec = F.binary_cross_entropy_with_logits(logits, labels)
        parts = {"match": match, "item_recon": item_recon, "text_recon": text_recon, "rec": rec}
        loss = sum(self.weights[k] * v for k, v in parts.items())
        self.last_losses = {k: v.item() for k, v in parts.items()}
        self.last_losses["latent_std"] = 0.5 * (e.std(0).mean().item() + q.std(0).mean().item())
        return loss * self.loss_weight

    # -- prompts ----------------------------------------------------------------------------------

    def _text_ids(self, text):
        if text not in self._prompt_ids:
            self._prompt_ids[text] = self.tokenizer(text, add_special_tokens=False).input_ids
        return self._prompt_ids[text]

    def title_token_ids(self, item):
        """Token ids of the candidate continuation: the quoted title, then end of sequence."""
        if self.title_ids is None:
            eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
            self.title_ids = [self._text_ids(f' "{t}"') + eos for t in self.titles]
        return self.title_ids[item]

    def prompt_embeddings(self, user_vector, history, candidates, tokens=None, question=None):
        """[P, H] prompt of one user: soft tokens spliced between the template's text tokens.

        ``tokens``: ``(user token, history tokens, candidate tokens)`` to use instead of
        ``soft_tokens`` (the oracle benchmarks put their own vectors there). An item's token goes
        right after its quoted title (``item_token_position: after``, the paper) or right before it.
        ``question``: free text that replaces the candidate list and the recommendation request
        (``generate``).
        """
        words = self.config
        user_token, hist_vec, cand_vec = tokens if tokens is not None else self.soft_tokens(user_vector, history, candidates)
        ids, soft_rows, soft_values = [], [], []

        def text(s):
            ids.extend(self._text_ids(s))

        def soft(vectors):  # one [H] token, or [k, H]: k tokens in a row
            for vector in vectors.reshape(-1, vectors.shape[-1]):
                soft_rows.append(len(ids))
                ids.append(0)
                soft_values.append(vector)

        def item_list(items, vectors):
            for k, item in enumerate(items.tolist()):
                separator, title = ("," if k else ""), f' "{self.titles[item]}"'
                if vectors is not None and self.item_token_position == "before":
                    text(separator)
                    soft(vectors[k])
                    text(title)
                else:
                    text(separator + title)
                    if vectors is not None:
                        soft(vectors[k])

        if user_token is not None:
            soft(user_token)
            text(" is a user representation.")
        text(f" This user has {words['prompt_past_verb']}")
        item_list(history, hist_vec)
        if question is not None:
            text(f" in the previous. {question}")
        else:
            text(f" in the previous. Recommend one next {words['prompt_item_noun']} for this user to "
                 f"{words['prompt_verb']} next from the following {words['prompt_item_noun']} title set,")
            item_list(candidates, cand_vec)
            text(ANSWER_CUE)
        embed = self.llm.get_input_embeddings()
        token_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        embeds = embed(token_ids)
        if soft_rows:
            values = torch.stack(soft_values).to(embeds.dtype)
            embeds = embeds.index_put((torch.tensor(soft_rows, device=self.device),), values)
        return embeds

    def history(self, interaction, row):
        """The last ``history_len`` items of row ``row``'s training sequence."""
        length = int(interaction[self.ITEM_SEQ_LEN][row])
        return interaction[self.ITEM_SEQ][row, :length][-self.history_len:]

    def candidate_order(self, user, n):
        """Seeded permutation of a user's candidates: the positive's position carries nothing."""
        seed = int.from_bytes(hashlib.sha256(f"{self.seed}:{user}".encode()).digest()[:8], "little")
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(self.device)

    # -- stage 2 ----------------------------------------------------------------------------------

    def stage2_loss(self, interaction, generator):
        """``stage2_objective: generation`` (the paper): cross-entropy of the target title's tokens
        after the prompt. ``listwise``: cross-entropy of the softmax over all candidates' title
        log-likelihoods (``score_reduction``), the very scores ``predict`` ranks by, so every
        candidate's title gets a gradient and the loss is about the choice, not the title's spelling."""
        users, targets = interaction[self.USER_ID], interaction[self.ITEM_ID]
        negatives = self.sample_negatives(users, self.train_candidates - 1, generator, targets.unsqueeze(1).tolist())
        user_vectors = self._user_vectors(interaction) if self.needs_user_vectors else [None] * len(users)
        own = set(self._own_rows(len(users)).tolist())
        prompts, shown, histories = [], [], []
        for row in range(len(users)):
            candidates = torch.cat([targets[row:row + 1], negatives[row]])
            candidates = candidates[torch.randperm(len(candidates), generator=generator).to(self.device)]
            if row in own:  # every row's permutation is drawn: the generator stream of one process
                histories.append(self.history(interaction, row))
                prompts.append(self.prompt_embeddings(user_vectors[row], histories[-1], candidates))
                shown.append((candidates, targets[row]))
        if not shown:
            self.loss_weight = 0.0
            return None
        if self.stage2_objective == "generation":
            target_ids = [self.title_token_ids(int(t)) for _, t in shown]
            # the loss is a mean over target tokens: this rank's share is its share of the tokens
            self.loss_weight = sum(map(len, target_ids)) / sum(len(self.title_token_ids(int(t))) for t in targets)
            loss = target_token_loss(self.llm, prompts, target_ids)
            self.last_losses = {"target": loss.item()}
            return loss * self.loss_weight
        self.loss_weight = len(shown) / len(users)
        titles = [[self.title_token_ids(int(i)) for i in candidates] for candidates, _ in shown]
        per_token = branch_log_likelihoods(self.llm, prompts, titles, self.score_reduction == "choice")
        reduce = (lambda t: t.mean()) if self.score_reduction == "mean" else (lambda t: t.sum())
        scores = torch.stack([torch.stack([reduce(t) for t in row]) for row in per_token])
        if self.score_calibration == "title_prior":
            scores = scores - torch.stack([self.title_prior()[candidates] for candidates, _ in shown]).to(scores.device)
        elif self.score_calibration == "prompt_prior":
            scores = scores - torch.stack(self.prompt_prior(histories, [c for c, _ in shown], titles)).to(scores.device)
        position = torch.stack([(candidates == t).nonzero()[0, 0] for candidates, t in shown])
        loss = F.cross_entropy(scores, position.to(scores.device))
        self.last_losses = {"listwise": loss.item(),
                            "target_rank_1": float((scores.argmax(1) == position.to(scores.device)).float().mean())}
        return loss * self.loss_weight

    def calculate_loss(self, interaction, generator=None):
        generator = generator or torch.Generator().manual_seed(self.seed)
        if self.stage == 1:
            return self.stage1_loss(interaction, generator)
        return self.stage2_loss(interaction, generator)

    # -- scores -----------------------------------------------------------------------------------

    @torch.no_grad()
    def rank_candidates(self, requests):
        """LLM scores of each request's candidates (aligned with its ``candidates``), each shown to
        the LLM in a seeded order. ``requests``: ``(user, user vector, history, candidates)`` tuples.

        ``score_method: branches`` scores all candidates of ``score_users_per_pass`` users in one
        forward pass (``scoring.score_branches``); ``kv_cache`` runs each prompt once and its
        candidates in batches of ``score_batch_size`` over copies of its KV cache. Same scores.
        """
        orders, prompts, targets, shown = [], [], [], []
        for user, vector, history, candidates in requests:
            order = self.candidate_order(user, len(candidates))
            orders.append(order)
            shown.append(candidates[order])
            prompts.append(self.prompt_embeddings(vector, history, shown[-1]))
            targets.append([self.title_token_ids(int(i)) for i in shown[-1]])
        scores = self._score_prompts(prompts, targets)
        if self.score_calibration == "prompt_prior":
            priors = self.prompt_prior([history for _, _, history, _ in requests], shown, targets)
            scores = [score.to(self.device) - prior.to(self.device) for score, prior in zip(scores, priors)]
        out = []
        for order, score, (_, _, _, candidates) in zip(orders, scores, requests):
            aligned = torch.empty(len(order), device=self.device)
            aligned[order] = score.to(self.device)
            if self.score_calibration == "title_prior":
                aligned -= self.title_prior()[candidates.to(self.device)]
            out.append(aligned)
        return out

    def _score_prompts(self, prompts, targets):
        """Each prompt's target titles' scores (``score_reduction``), by ``score_method``."""
        if self.score_method == "kv_cache":
            return [score_continuations(self.llm, prompt, target, self.score_reduction, self.score_batch_size,
                                        pad_id=self.tokenizer.pad_token_id or 0)
                    for prompt, target in zip(prompts, targets)]
        n = self.score_users_per_pass
        return [score for start in range(0, len(prompts), n)
                for score in score_branches(self.llm, prompts[start:start + n], targets[start:start + n],
                                            self.score_reduction)]

    def _base_llm(self):
        """Context in which ``self.llm`` runs without its LoRA adapters (nothing to do without them)."""
        return self.llm.disable_adapter() if hasattr(self.llm, "disable_adapter") else contextlib.nullcontext()

    @torch.no_grad()
    def prompt_prior(self, histories, shown, targets):
        """``score_calibration: prompt_prior`` (ours): each candidate's score under the same prompt
        (history titles, candidates in the order shown) without any soft token, from the base LLM
        (adapters off), i.e. LLM-Only's score. Subtracted, the ranking is by what the collaborative
        tokens (and adapters) add to each title's log-likelihood, not by what the LLM thinks of the
        titles anyway (their length and wording decide most of a raw ranking). Costs a second
        scoring pass; in the listwise loss it is a constant offset per candidate."""
        prompts = [self.prompt_embeddings(None, history, candidates, tokens=(None, None, None))
                   for history, candidates in zip(histories, shown)]
        with self._base_llm():
            return self._score_prompts(prompts, targets)

    @torch.no_grad()
    def title_prior(self, items_per_pass=64):
        """``score_calibration: title_prior`` (ours; domain-conditional PMI, Holtzman et al. 2021):
        each title's score (``score_reduction``) after the answer cue alone, with no user, history
        or candidates. Subtracted from every candidate's score, it removes what the LLM thinks of a
        title regardless of the user (its length, its wording), so the ranking and the listwise
        loss are about what the prompt adds. Computed once with the base LLM (LoRA adapters off)."""
        if self._title_prior is None:
            cue = self.llm.get_input_embeddings()(torch.tensor(self._text_ids(ANSWER_CUE),
                                                               device=self.device))
            titles = [self.title_token_ids(i) for i in range(1, self.n_items)]
            with self._base_llm():
                parts = [score_branches(self.llm, [cue], [titles[k:k + items_per_pass]], self.score_reduction)[0]
                         for k in range(0, len(titles), items_per_pass)]
            self._title_prior = torch.cat([torch.zeros(1), *[p.cpu() for p in parts]]).to(self.device)
        return self._title_prior

    @torch.no_grad()
    def generate(self, interaction, question, max_new_tokens=40, soft_tokens=True):
        """Free text from the LLM for each row of ``interaction`` (the paper's §5.4.4): the prompt
        carries the user's soft token and history titles with their item tokens, then ``question``
        (phrase it as a sentence to complete, e.g. "The movie genres this user likes most are":
        SmolLM2-Instruct ends at once after a bare question); greedy decoding.
        ``soft_tokens=False``: the same prompt without any soft token (LLM-Only's answer, the
        control). Returns one string per row."""
        with_tokens = soft_tokens and self.needs_user_vectors
        users = self._user_vectors(interaction) if with_tokens else [None] * len(interaction)
        tokens = None if soft_tokens else (None, None, None)
        eos = self.tokenizer.eos_token_id
        answers = []
        for row in range(len(interaction)):
            history = self.history(interaction, row)
            prompt = self.prompt_embeddings(users[row], history, history[:0], tokens=tokens,
                                            question=question).unsqueeze(0)
            new_ids = self.llm.generate(
                inputs_embeds=prompt, attention_mask=torch.ones(prompt.shape[:2], dtype=torch.long, device=self.device),
                max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.tokenizer.pad_token_id or eos)
            answers.append(self.tokenizer.decode(new_ids[0], skip_special_tokens=True).strip())
        return answers

    @torch.no_grad()
    def predict(self, interaction):
        users = interaction[self.USER_ID]
        items = interaction[self.ITEM_ID]
        user_vectors = self._user_vectors(interaction) if self.needs_user_vectors else None
        requests, row_sets = [], []
        for user in dict.fromkeys(users.tolist()):
            rows = (users == user).nonzero(as_tuple=True)[0]
            first = int(rows[0])
            vector = user_vectors[first] if user_vectors is not None else None
            requests.append((user, vector, self.history(interaction, first), items[rows]))
            row_sets.append(rows)
        scores = torch.empty(len(items), device=self.device)
        for rows, user_scores in zip(row_sets, self.rank_candidates(requests)):
            scores[rows] = user_scores
        return scores

    @torch.no_grad()
    def full_sort_predict(self, interaction):
        """Backbone scores for every item; its top ``rerank_top_n`` reranked by the LLM above the rest."""
        base = self.backbone.model.full_sort_predict(interaction).view(len(interaction), -1).float()
        base[:, 0] = -np.inf
        top = base.topk(self.rerank_top_n, dim=1).indices
        out = base - (base[torch.isfinite(base)].max() - base[torch.isfinite(base)].min() + 1e6)
        user_vectors = self._user_vectors(interaction) if self.needs_user_vectors else None
        users = interaction[self.USER_ID]
        requests = [(int(users[row]), user_vectors[row] if user_vectors is not None else None,
                     self.history(interaction, row), top[row]) for row in range(len(interaction))]
        for row, scores in enumerate(self.rank_candidates(requests)):
            out[row, top[row]] = scores
        return out
