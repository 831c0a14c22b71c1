"""MetaLLMRec (LLM-MetaRec): MeLU's estimator fed with frozen LLM embeddings of attribute text.

User and item attributes are rendered as text and embedded once (``episodic_text.EpisodicText``:
``text_source``, the template keys, ``text_standardize``, ``text_shuffle``). The embeddings are frozen, non-persistent buffers:
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

from recbole_llm.model.episodic_text import EpisodicText
from recbole_llm.model.meta_estimator import MetaEstimator


class MetaLLMRec(EpisodicText, MetaEstimator):
    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        for kind in ("user", "item"):
            self.register_buffer(f"{kind}_text", self.text_table(config, dataset, kind).to(self.device), persistent=False)
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
