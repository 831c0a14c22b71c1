"""The frozen RecBole model that ALLMRec stacks on: what to train, how to check it, how to read it.

ALLMRec only *loads* a backbone, from ``backbone_checkpoint`` (RecBole's S3Rec ``pre_model_path``
pattern). When that is unset, ``backbone_run`` says which run would make one (the model and
overrides of ``backbone_args`` over the settings that decide ALLMRec's data and split) and under
which content-keyed file; the quick start trains it first (``quick_start.resolve_prerequisites``).
``BackboneAdapter`` gives ALLMRec the backbone's item embeddings E_i and user representations x_u.
"""
import os
from logging import getLogger

import torch
from recbole.utils import ModelType

from recbole_llm.checkpoint import load_checkpoint
from recbole_llm.llm.cache import content_key
from recbole_llm.utils import get_model

# Settings that decide which users/items exist and how they are numbered: a backbone trained
# with other values has other internal ids.
ID_ARGUMENTS = ("USER_ID_FIELD", "ITEM_ID_FIELD", "rm_dup_inter", "val_interval",
                "filter_inter_by_user_or_item", "user_inter_num_interval", "item_inter_num_interval")
# Inherited settings that do not change the trained backbone (left out of its cache key).
RUNTIME = ("checkpoint_dir", "torch_threads", "show_progress", "state", "device", "use_gpu")
# Settings a backbone trained for ALLMRec inherits, so it sees the same data and split.
INHERITED = ID_ARGUMENTS + (
    "load_col", "unload_col", "TIME_FIELD", "RATING_FIELD", "seed", "reproducibility",
    "MAX_ITEM_LIST_LENGTH", "scenario_seed", "cold_user_args", "few_shot_users", "cold_item_args",
    "normalize_all", *RUNTIME,
)
SCENARIO_ARGUMENTS = ("cold_user_args", "few_shot_users", "cold_item_args")


def backbone_run(config):
    """``{"model", "config_dict", "path"}`` of the backbone run ``config`` needs: the model and
    overrides of ``backbone_args`` over the inherited data and split settings, and the checkpoint
    file (under ``cache_dir``, keyed by everything but runtime settings) that run publishes."""
    if not config["backbone_args"]:
        raise ValueError(
            f"{config['model']} needs a trained backbone: set backbone_checkpoint to a RecBole checkpoint "
            "trained on the same data, or backbone_args (e.g. {model: SASRec, epochs: 10}) to train one first"
        )
    args = dict(config["backbone_args"])
    model = args.pop("model", "SASRec")
    settings = {key: config[key] for key in INHERITED if config[key] is not None}
    settings["eval_args"] = dict(config["eval_args"])
    settings["data_path"] = os.path.dirname(os.path.normpath(config["data_path"]))  # RecBole appends the name
    settings.update(args)
    data_and_model = {k: v for k, v in settings.items() if k not in RUNTIME}
    key = content_key("allmrec-backbone-v1", model, config["dataset"], data_and_model)
    path = os.path.join(config["cache_dir"], "allmrec-backbones", f"{model}-{config['dataset']}-{key[:16]}.pth")
    return {"model": model, "config_dict": settings, "path": path}


def check_same_data(config, backbone_conf, path):
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
            f"(checkpoint vs {config['model']}): {'; '.join(differences)}"
        )
    for key in SCENARIO_ARGUMENTS:
        if backbone_conf[key] != config[key]:
            getLogger().warning(
                f"backbone checkpoint {path} used {key}={backbone_conf[key]!r}, this run {config[key]!r}: "
                "the backbone may have trained on users or items this run holds out"
            )


def load_backbone(config, dataset):
    """The frozen backbone of ``backbone_checkpoint``, rebuilt from the checkpoint's own config."""
    path = config["backbone_checkpoint"]
    if not path:
        raise ValueError(
            f"{config['model']}: backbone_checkpoint is not set. The quick start (run_recbole_llm, "
            "objective_function, prepare) trains one from backbone_args first; when building the model "
            "yourself, call recbole_llm.quick_start.resolve_prerequisites(config) before it"
        )
    checkpoint = load_checkpoint(path)
    bconf = checkpoint["config"]
    check_same_data(config, bconf, path)
    bconf["device"] = config["device"]  # this run's device, wherever the backbone was trained
    model = get_model(bconf["model"])(bconf, dataset).to(config["device"])
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        raise ValueError(
            f"backbone checkpoint {path} does not fit dataset [{config['dataset']}] "
            f"({dataset.user_num} user ids, {dataset.item_num} item ids): {error}"
        ) from None
    getLogger().info(f"{config['model']} backbone: {bconf['model']} from {path} (frozen)")
    return BackboneAdapter(model, dataset.user_num, dataset.item_num)


class BackboneAdapter(torch.nn.Module):
    """Item embeddings E_i and user representations x_u of a frozen RecBole model.

    Sequential models: E = their item embedding table, x_u = ``forward(item_seq, item_seq_len)``.
    General models: E and x_u are the item / user embedding tables (several tables, e.g. NeuMF's
    MF and MLP ones, are concatenated). The frozen backbone always runs in eval mode, i.e.
    without dropout.
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
    lengths = item_seq_len.clamp(max=max_len)
    width = item_seq.shape[1]
    start = (item_seq_len - lengths).unsqueeze(1)
    index = (start + torch.arange(max_len, device=item_seq.device).unsqueeze(0)).clamp(max=width - 1)
    out = item_seq.gather(1, index)
    out[torch.arange(max_len, device=item_seq.device).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
    return out, lengths
