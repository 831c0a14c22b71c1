"""MetaLLMRec (LLM-MetaRec): MeLU's estimator fed with frozen LLM embeddings of attribute text.

User and item attributes are rendered as text from the dataset's templates (``meta_user_text_key``
/ ``meta_item_text_key`` name the template keys, e.g. "The title of the movie is ... The genres
are ..."), embedded once by ``text_source`` (``encoder``: the sentence encoder ``text_encoder``;
``llm``: mean-pooled last hidden states of the causal LLM ``llm``) and cached on disk
by the dataset (``dataset.text_embeddings``). The embeddings are frozen, non-persistent buffers:
they stay out of the optimizer and of checkpoints and are read again (from the cache) when a model
is built.

``text_shuffle: [user]`` (or ``[item]``) permutes the rows of that table (seeded): an ablation
that measures what the texts carry. With ``text_standardize`` each embedding dimension is z-scored over the users (items) first.
Features of a pair are ``[item_proj(e_item) ; user_proj(e_user)]`` with two global linear
projections (``proj_dim``; 0 feeds the raw embeddings); the MLP estimator on top is adapted per
user with MAML (``meta_estimator.MetaEstimator``). The paper does not give the projection size,
the MLP sizes or the learning rates; the defaults in ``properties/model/MetaLLMRec.yaml`` are ours.
"""
import torch
from torch import nn

from recbole_llm.model.meta_estimator import MetaEstimator

TEXT_SOURCES = {"encoder": "text_encoder", "llm": "llm"}


class MetaLLMRec(MetaEstimator):
    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        source = config["text_source"] or "encoder"
        if source not in TEXT_SOURCES:
            raise ValueError(f"text_source must be one of {sorted(TEXT_SOURCES)}, got {source!r}")
        shuffled = list(config["text_shuffle"] or [])
        if set(shuffled) - {"user", "item"}:
            raise ValueError(f"text_shuffle lists 'user' and/or 'item', got {shuffled!r}")
        for kind in ("user", "item"):
            key = config[f"meta_{kind}_text_key"] or f"{kind}_text_template"
            if config[key] is None:
                key = f"{kind}_text_template"  # the dataset has no MetaLLMRec-specific template
            table = dataset.text_embeddings(kind, key, encoder_key=TEXT_SOURCES[source])
            if config["text_standardize"]:
                # per-dimension z-scores over the entities: sentence embeddings are unit vectors
                # with tiny coordinates, which leave the local SGD steps almost nothing to move
                rows = table[1:]
                rows = (rows - rows.mean(0)) / rows.std(0).clamp(min=1e-6)
                table = torch.cat([torch.zeros(1, rows.shape[1]), rows])
            if kind in shuffled:  # ablation: every user (item) gets another one's text
                generator = torch.Generator().manual_seed(int(config["seed"]))
                table = torch.cat([table[:1], table[1:][torch.randperm(len(table) - 1, generator=generator)]])
            self.register_buffer(f"{kind}_text", table.to(self.device), persistent=False)
        text_dim = self.item_text.shape[1]
        proj_dim = int(config["proj_dim"])
        if proj_dim > 0:
            self.user_proj, self.item_proj = nn.Linear(text_dim, proj_dim), nn.Linear(text_dim, proj_dim)
            in_dim = 2 * proj_dim
        else:
            self.user_proj = self.item_proj = nn.Identity()
            in_dim = 2 * text_dim
        self.build_estimator(in_dim, config["mlp_hidden_size"])

    def features(self, users, items):
        return torch.cat([self.item_proj(self.item_text[items]), self.user_proj(self.user_text[users])], dim=-1)
