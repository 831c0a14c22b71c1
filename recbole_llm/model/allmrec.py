"""ALLMRec (A-LLMRec, KDD'24): a frozen RecBole model aligned with a text encoder and a frozen LLM.

* Backbone: any RecBole checkpoint (``backbone_checkpoint``; SASRec, GRU4Rec, NextItNet, BPR,
  NeuMF, ...), rebuilt from the checkpoint's own config and frozen. Without a checkpoint the
  backbone (``backbone_args``) is first trained through our own quick start and cached under
  ``cache_dir`` by a content key of its config. ``BackboneAdapter`` gives item embeddings E_i and
  the user representation x_u (sequential models: the sequence output; general models: the user
  embedding). The frozen backbone always runs in eval mode, i.e. **without dropout** (the official
  code leaves its SASRec in train mode, so its x_u carries dropout noise in both stages).
* Stage 1 (paper 4.1): item encoder/decoder over E, text encoder/decoder over SBERT(text);
  loss = match * MSE(e, q) + alpha * MSE(dec(e), E) + beta * MSE(dec_T(q), Q) + rec * BCE of
  x_u . dec(e) for the positive and one sampled negative (the paper's dot product; the official
  code uses the mean over dimensions). ``match_norm: batch`` standardises both latents over the
  batch before the MSE (our addition against the collapse of both encoders to constant outputs).
* Stage 2 (paper 4.2): F_U, F_I two-layer MLPs into the LLM's hidden size; the prompt carries the
  user soft token, the last ``history_len`` titles each followed by its joint-embedding token and
  ``num_candidates`` shuffled candidate titles each followed by its token; the loss is on the
  target title's tokens only.
* Scores: ``predict`` builds one prompt per user from that user's candidate rows (RecBole's
  ``uni19`` gives 1 positive + 19 negatives) in a seeded shuffled order and returns the LLM
  log-likelihood of each candidate's quoted title (``recbole_llm.llm.scoring``).
  ``full_sort_predict`` reranks the backbone's top ``rerank_top_n`` items with the LLM.
* Items with fewer than ``cold_item_threshold`` training interactions use q_i = f_T(SBERT(text))
  instead of e_i = f_I(E_i) (the paper's A-LLMRec (SBERT)); ``item_embedding_source: text`` uses
  q_i for every item (ablation).

The LLM (and the backbone) are submodules but their frozen weights are left out of
``state_dict``: checkpoints hold only what ALLMRec trains (see ``ALLMRecTrainer``).
"""
import hashlib
import os
import re
import sys
import time
from logging import getLogger

import numpy as np
import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType, ModelType

from recbole_llm.data.history import user_histories
from recbole_llm.data.text import TextSideInformation
from recbole_llm.llm import models
from recbole_llm.llm.cache import content_key
from recbole_llm.llm.encoder import embed_from_config
from recbole_llm.llm.scoring import score_continuations, target_token_loss
from recbole_llm.trainer.checkpoint import load_checkpoint

FINETUNE = ("full", "last", "frozen")
ITEM_SOURCES = ("joint", "text")
# Settings that decide which users/items exist and how they are numbered: a backbone trained
# with other values has other internal ids.
ID_ARGUMENTS = ("USER_ID_FIELD", "ITEM_ID_FIELD", "rm_dup_inter", "val_interval",
                "filter_inter_by_user_or_item", "user_inter_num_interval", "item_inter_num_interval")
# Inherited settings that do not change the trained backbone (left out of its cache key).
RUNTIME = ("checkpoint_dir", "torch_threads", "show_progress", "state", "device", "use_gpu")
# Settings a backbone trained by ALLMRec inherits, so it sees the same data and split.
INHERITED = ID_ARGUMENTS + (
    "load_col", "unload_col", "TIME_FIELD", "RATING_FIELD", "seed", "reproducibility",
    "MAX_ITEM_LIST_LENGTH", "scenario_seed", "cold_user_args", "few_shot_users", "cold_item_args",
    "normalize_all", *RUNTIME,
)


# ------------------------------------------------------------------------------------------------
# backbone


class BackboneAdapter(torch.nn.Module):
    """Item embeddings E_i and user representations x_u of a frozen RecBole model.

    Sequential models: E = their item embedding table, x_u = ``forward(item_seq, item_seq_len)``.
    General models: E and x_u are the item / user embedding tables (several tables, e.g. NeuMF's
    MF and MLP ones, are concatenated).
    """

    def __init__(self, model, n_users, n_items):
        super().__init__()
        self.model = model
        self.sequential = model.type == ModelType.SEQUENTIAL
        self.max_len = model.max_seq_length if self.sequential else None
        self.item_tables = self._tables(model, "item_embedding", n_items)
        self.user_tables = [] if self.sequential else self._tables(model, "user_embedding", n_users)
        if not self.item_tables or (not self.sequential and not self.user_tables):
            raise ValueError(
                f"backbone {type(model).__name__} has no item/user embedding table with "
                f"{n_items} items / {n_users} users; ALLMRec needs E_i and x_u from it"
            )
        self.item_dim = sum(t.embedding_dim for t in self.item_tables)
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()

    @staticmethod
    def _tables(model, name, size):
        named = getattr(model, name, None)
        if isinstance(named, torch.nn.Embedding):
            return [named]
        return [m for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.num_embeddings == size]

    def train(self, mode=True):
        return super().train(False)  # frozen: never dropout

    @torch.no_grad()
    def item_embeddings(self, items):
        return torch.cat([t(items) for t in self.item_tables], dim=-1)

    @torch.no_grad()
    def user_representation(self, users, item_seq, item_seq_len):
        if not self.sequential:
            return torch.cat([t(users) for t in self.user_tables], dim=-1)
        if item_seq.shape[1] != self.max_len:
            item_seq, item_seq_len = fit_sequences(item_seq, item_seq_len, self.max_len)
        return self.model.forward(item_seq, item_seq_len)


def fit_sequences(item_seq, item_seq_len, max_len):
    """Left-aligned padded sequences cut (keeping the most recent items) or padded to ``max_len``."""
    n, width = item_seq.shape
    lengths = item_seq_len.clamp(max=max_len)
    start = (item_seq_len - lengths).unsqueeze(1)
    index = (start + torch.arange(max_len, device=item_seq.device).unsqueeze(0)).clamp(max=width - 1)
    out = item_seq.gather(1, index)
    out[torch.arange(max_len, device=item_seq.device).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
    return out, lengths


def backbone_config(config):
    """Config of the backbone ALLMRec trains when no checkpoint is given (same data and split)."""
    from recbole_llm.config import Config

    args = dict(config["backbone_args"] or {})
    model = args.pop("model", "SASRec")
    eval_args = dict(config["eval_args"])
    settings = {key: config[key] for key in INHERITED if config[key] is not None}
    settings["eval_args"] = eval_args
    settings["data_path"] = os.path.dirname(os.path.normpath(config["data_path"]))  # RecBole appends the name
    settings.update(args)
    # RecBole's Config reads --key=value from sys.argv; those are meant for ALLMRec.
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        return Config(model=model, dataset=config["dataset"], config_dict=settings), settings
    finally:
        sys.argv = argv


def train_backbone(config):
    """Path of a backbone checkpoint for ``config``: trained once through our quick start, cached."""
    from recbole_llm.quick_start import _build_model, _prepare
    from recbole_llm.utils import get_trainer

    bconfig, settings = backbone_config(config)
    data_and_model = {k: v for k, v in settings.items() if k not in RUNTIME}
    key = content_key("allmrec-backbone-v1", bconfig["model"], config["dataset"], data_and_model)
    path = os.path.join(config["cache_dir"], "allmrec-backbones", f"{bconfig['model']}-{config['dataset']}-{key[:16]}.pth")
    logger = getLogger()
    if os.path.isfile(path):
        logger.info(f"ALLMRec backbone: reusing {path}")
        return path
    logger.info(f"ALLMRec backbone: training {bconfig['model']} on [{config['dataset']}] (cached as {path})")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _, train_data, valid_data, _ = _prepare(bconfig)
    model = _build_model(bconfig, train_data)
    trainer = get_trainer(bconfig["MODEL_TYPE"], bconfig["model"])(bconfig, model)
    # Best epochs are written (atomically) under a temporary name that becomes ``path`` only when
    # training ends: a killed run must not leave a half-trained backbone that the next run reuses.
    partial = path + ".training"
    trainer.saved_model_file = partial
    began = time.time()
    trainer.fit(train_data, valid_data, saved=True, show_progress=bconfig["show_progress"])
    os.replace(partial, path)
    logger.info(f"ALLMRec backbone time: {time.time() - began:.1f}s ({bconfig['model']}, {bconfig['epochs']} epochs)")
    return path


def check_same_data(config, dataset, backbone_conf, path):
    """Refuse a backbone whose dataset or filtering differs: its ids would mean other items."""
    differences = []
    if backbone_conf["dataset"] != config["dataset"]:
        differences.append(f"dataset [{backbone_conf['dataset']}] vs [{config['dataset']}]")
    for key in ID_ARGUMENTS:
        if backbone_conf[key] != config[key]:
            differences.append(f"{key} {backbone_conf[key]!r} vs {config[key]!r}")
    if differences:
        raise ValueError(
            f"backbone checkpoint {path} was trained on other data than this run "
            f"(checkpoint vs ALLMRec): {'; '.join(differences)}"
        )
    for key in ("cold_user_args", "few_shot_users", "cold_item_args"):
        if backbone_conf[key] != config[key]:
            getLogger().warning(
                f"backbone checkpoint {path} used {key}={backbone_conf[key]!r}, this run {config[key]!r}: "
                "the backbone may have trained on users or items this run holds out"
            )


def load_backbone(config, dataset):
    path = config["backbone_checkpoint"] or train_backbone(config)
    checkpoint = load_checkpoint(path)
    bconf = checkpoint["config"]
    check_same_data(config, dataset, bconf, path)
    from recbole_llm.utils import get_model

    model = get_model(bconf["model"])(bconf, dataset)
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        raise ValueError(
            f"backbone checkpoint {path} does not fit dataset [{config['dataset']}] "
            f"({dataset.user_num} user ids, {dataset.item_num} item ids): {error}"
        ) from None
    getLogger().info(f"ALLMRec backbone: {bconf['model']} from {path} (frozen)")
    return BackboneAdapter(model, dataset.user_num, dataset.item_num)


# ------------------------------------------------------------------------------------------------
# the model


def _mlp_projector(in_dim, out_dim, activation):
    layers = torch.nn.Sequential(
        torch.nn.Linear(in_dim, out_dim), torch.nn.LayerNorm(out_dim), activation, torch.nn.Linear(out_dim, out_dim))
    for layer in (layers[0], layers[3]):
        torch.nn.init.xavier_normal_(layer.weight)
    return layers


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
        self.seed = int(config["seed"])
        self.use_user_token = bool(config["use_user_token"])
        self.use_item_tokens = bool(config["use_item_tokens"])
        self.history_len = int(config["history_len"])
        self.num_candidates = int(config["num_candidates"])
        self.score_reduction = config["score_reduction"]
        self.score_batch_size = int(config["score_batch_size"])
        self.rerank_top_n = int(config["rerank_top_n"])
        self.weights = {k: float(config[f"{k}_weight"]) for k in ("match", "item_recon", "text_recon", "rec")}
        self.match_norm = config["match_norm"] or "none"
        if self.match_norm not in ("none", "batch"):
            raise ValueError(f"match_norm must be 'none' or 'batch', got {self.match_norm!r}")
        self.item_source = config["item_embedding_source"]
        if self.item_source not in ITEM_SOURCES:
            raise ValueError(f"item_embedding_source must be one of {ITEM_SOURCES}, got {self.item_source!r}")

        # training histories: negatives exclude them; item counts decide cold items
        histories = user_histories(dataset)
        self.history_sets = [set(h.tolist()) for h in histories]
        counts = np.bincount(np.concatenate(histories + [np.zeros(0, dtype=np.int64)]), minlength=self.n_items)
        warm = torch.from_numpy(counts >= int(config["cold_item_threshold"]))
        warm[0] = False
        self.register_buffer("item_warm", warm, persistent=False)

        side = TextSideInformation(config, dataset)
        self.item_text = side.texts("item", "item_text_template")
        titles = side.texts("item", "item_title_template" if config["item_title_template"] else "item_text_template")
        self.titles = [t.replace('"', "'") for t in titles]

        needs_backbone = self.use_user_token or self.use_item_tokens or config["eval_args"]["mode"] == "full"
        self.backbone = load_backbone(config, dataset) if needs_backbone else None
        latent = int(config["latent_dim"])
        if self.backbone is not None:
            d = self.backbone.item_dim
            self.item_encoder = torch.nn.Sequential(torch.nn.Linear(d, latent), torch.nn.Sigmoid())
            self.item_decoder = torch.nn.Linear(latent, d)
        self._init_text_encoder(config, latent)

        self.llm, self.tokenizer = models.load_causal_lm(config["llm"], config["llm_dtype"] or "auto", self.device)
        for p in self.llm.parameters():
            p.requires_grad_(False)
        if config["lora_args"]:
            self.llm = self._with_lora(self.llm, dict(config["lora_args"]))
        hidden = self.llm.config.hidden_size
        if self.use_user_token:
            user_dim = self._user_dim()
            self.user_proj = _mlp_projector(user_dim, hidden, torch.nn.LeakyReLU())
        if self.use_item_tokens:
            self.item_proj = _mlp_projector(latent, hidden, torch.nn.GELU())
        self._prompt_ids = {}
        self.title_ids = None  # tokenised lazily (see _target_ids)

    # -- set-up helpers ------------------------------------------------------------------------

    def _init_text_encoder(self, config, latent):
        finetune = config["sbert_finetune"]
        if finetune not in FINETUNE:
            raise ValueError(f"sbert_finetune must be one of {FINETUNE}, got {finetune!r}")
        self.sbert_finetune = finetune
        texts = self.item_text[1:]
        frozen = embed_from_config(config, texts, namespace="allmrec").float()
        table = torch.cat([torch.zeros(1, frozen.shape[1]), frozen])
        # the text embedding of every item; refreshed after stage 1 when SBERT is fine-tuned
        self.register_buffer("item_text_emb", table)
        self.sbert = None
        if finetune != "frozen":
            self.sbert = models.load_sentence_encoder(config["text_encoder"], self.device)
            self.sbert.max_seq_length = min(self.sbert.max_seq_length or 256, int(config["text_max_length"] or 256))
            if finetune == "last":
                self._freeze_all_but_last_layer(self.sbert)
        s = table.shape[1]
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
        from peft import LoraConfig, get_peft_model

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
        """e_i = f_I(E_i) for warm items, q_i = f_T(SBERT(text_i)) otherwise (or always: ablation)."""
        q = self.text_encoder(self.item_text_emb[items])
        if self.item_source == "text" or self.backbone is None:
            return q
        e = self.item_encoder(self.backbone.item_embeddings(items))
        return torch.where(self.item_warm[items].unsqueeze(-1), e, q)

    def _user_vectors(self, interaction):
        return self.backbone.user_representation(
            interaction[self.USER_ID], interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])

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

    def stage1_loss(self, interaction, generator):
        pos = interaction[self.ITEM_ID]
        neg = self.sample_negatives(interaction[self.USER_ID], 1, generator)[:, 0]
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
        x_u = self._user_vectors(interaction)
        n = len(pos)
        logits = torch.cat([(x_u * E_rec[:n]).sum(-1), (x_u * E_rec[n:]).sum(-1)])
        labels = torch.cat([torch.ones(n), torch.zeros(n)]).to(logits.device)
        rec = F.binary_cross_entropy_with_logits(logits, labels)
        parts = {"match": match, "item_recon": item_recon, "text_recon": text_recon, "rec": rec}
        loss = sum(self.weights[k] * v for k, v in parts.items())
        self.last_losses = {k: v.item() for k, v in parts.items()}
        self.last_losses["latent_std"] = 0.5 * (e.std(0).mean().item() + q.std(0).mean().item())
        return loss

    # -- prompts ----------------------------------------------------------------------------------

    def _text_ids(self, text):
        if text not in self._prompt_ids:
            self._prompt_ids[text] = self.tokenizer(text, add_special_tokens=False).input_ids
        return self._prompt_ids[text]

    def _target_ids(self, item):
        """Token ids of the candidate continuation: the quoted title, then end of sequence."""
        if self.title_ids is None:
            eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
            self.title_ids = [self._text_ids(f' "{t}"') + eos for t in self.titles]
        return self.title_ids[item]

    def prompt_embeddings(self, user_vector, history, candidates):
        """[P, H] prompt of one user: soft tokens spliced between the template's text tokens."""
        words = self.config
        ids, soft_rows, soft_values = [], [], []

        def text(s):
            ids.extend(self._text_ids(s))

        def soft(vector):
            soft_rows.append(len(ids))
            ids.append(0)
            soft_values.append(vector)

        def item_list(items, vectors):
            for k, item in enumerate(items.tolist()):
                text(("," if k else "") + f' "{self.titles[item]}"')
                if vectors is not None:
                    soft(vectors[k])

        if self.use_user_token:
            soft(self.user_proj(user_vector))
            text(" is a user representation.")
        hist_vec = cand_vec = None
        if self.use_item_tokens:
            latents = self.joint_item_embeddings(torch.cat([history, candidates]))
            projected = self.item_proj(latents)
            hist_vec, cand_vec = projected[: len(history)], projected[len(history):]
        text(f" This user has {words['prompt_past_verb']}")
        item_list(history, hist_vec)
        text(f" in the previous. Recommend one next {words['prompt_item_noun']} for this user to "
             f"{words['prompt_verb']} next from the following {words['prompt_item_noun']} title set,")
        item_list(candidates, cand_vec)
        text(". The recommendation is")
        embed = self.llm.get_input_embeddings()
        token_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        embeds = embed(token_ids)
        if soft_rows:
            values = torch.stack(soft_values).to(embeds.dtype)
            embeds = embeds.index_put((torch.tensor(soft_rows, device=self.device),), values)
        return embeds

    def _history(self, interaction, row):
        length = int(interaction[self.ITEM_SEQ_LEN][row])
        return interaction[self.ITEM_SEQ][row, :length][-self.history_len:]

    def candidate_order(self, user, n):
        """Seeded permutation of a user's candidates: the positive's position carries nothing."""
        seed = int.from_bytes(hashlib.sha256(f"{self.seed}:{user}".encode()).digest()[:8], "little")
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(self.device)

    # -- stage 2 ----------------------------------------------------------------------------------

    def stage2_loss(self, interaction, generator):
        users, targets = interaction[self.USER_ID], interaction[self.ITEM_ID]
        negatives = self.sample_negatives(users, self.num_candidates - 1, generator, targets.unsqueeze(1).tolist())
        user_vectors = self._user_vectors(interaction) if self.use_user_token else [None] * len(users)
        prompts, target_ids = [], []
        for row in range(len(users)):
            candidates = torch.cat([targets[row:row + 1], negatives[row]])
            candidates = candidates[torch.randperm(len(candidates), generator=generator).to(self.device)]
            prompts.append(self.prompt_embeddings(user_vectors[row], self._history(interaction, row), candidates))
            target_ids.append(self._target_ids(int(targets[row])))
        loss = target_token_loss(self.llm, prompts, target_ids)
        self.last_losses = {"target": loss.item()}
        return loss

    def calculate_loss(self, interaction, generator=None):
        generator = generator or torch.Generator().manual_seed(self.seed)
        if self.stage == 1:
            return self.stage1_loss(interaction, generator)
        return self.stage2_loss(interaction, generator)

    # -- scores -----------------------------------------------------------------------------------

    @torch.no_grad()
    def rank_candidates(self, user, user_vector, history, candidates):
        """LLM score of each candidate (aligned with ``candidates``), shown in a seeded order."""
        order = self.candidate_order(user, len(candidates))
        shown = candidates[order]
        prompt = self.prompt_embeddings(user_vector, history, shown)
        scores = score_continuations(
            self.llm, prompt, [self._target_ids(int(i)) for i in shown], self.score_reduction,
            self.score_batch_size, pad_id=self.tokenizer.pad_token_id or 0)
        out = torch.empty(len(candidates), device=self.device)
        out[order] = scores.to(self.device)
        return out

    @torch.no_grad()
    def predict(self, interaction):
        users = interaction[self.USER_ID]
        items = interaction[self.ITEM_ID]
        user_vectors = self._user_vectors(interaction) if self.use_user_token else None
        scores = torch.empty(len(items), device=self.device)
        for user in dict.fromkeys(users.tolist()):
            rows = (users == user).nonzero(as_tuple=True)[0]
            first = int(rows[0])
            vector = user_vectors[first] if user_vectors is not None else None
            scores[rows] = self.rank_candidates(user, vector, self._history(interaction, first), items[rows])
        return scores

    @torch.no_grad()
    def full_sort_predict(self, interaction):
        """Backbone scores for every item; its top ``rerank_top_n`` reranked by the LLM above the rest."""
        base = self.backbone.model.full_sort_predict(interaction).view(len(interaction), -1).float()
        base[:, 0] = -np.inf
        top = base.topk(self.rerank_top_n, dim=1).indices
        out = base - (base[torch.isfinite(base)].max() - base[torch.isfinite(base)].min() + 1e6)
        user_vectors = self._user_vectors(interaction) if self.use_user_token else None
        users = interaction[self.USER_ID]
        for row in range(len(interaction)):
            vector = user_vectors[row] if user_vectors is not None else None
            out[row, top[row]] = self.rank_candidates(int(users[row]), vector, self._history(interaction, row), top[row])
        return out
