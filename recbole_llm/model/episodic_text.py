"""Frozen text-embedding tables of users and items for the episodic models (MetaLLMRec, SupportRidge).

User and item attributes are rendered as text from the dataset's templates (``meta_user_text_key``
/ ``meta_item_text_key`` name the template keys, e.g. "The title of the movie is ... The genres
are ..."), embedded once by ``text_source`` (``encoder``: the sentence encoder ``text_encoder``;
``llm``: mean-pooled last hidden states of the causal LLM ``llm``) and cached on disk by the
dataset (``dataset.text_embeddings``). Settings: ``properties/model/EpisodicText.yaml``.
"""
import torch

TEXT_SOURCES = {"encoder": "text_encoder", "llm": "llm"}


class EpisodicText:
    """Mixin: ``text_table(config, dataset, kind)``, the ``[ids, dim]`` table (row 0 padding, zeros)."""

    @staticmethod
    def text_table(config, dataset, kind):
        source = config["text_source"] or "encoder"
        if source not in TEXT_SOURCES:
            raise ValueError(f"text_source must be one of {sorted(TEXT_SOURCES)}, got {source!r}")
        shuffled = list(config["text_shuffle"] or [])
        if set(shuffled) - {"user", "item"}:
            raise ValueError(f"text_shuffle lists 'user' and/or 'item', got {shuffled!r}")
        key = config[f"meta_{kind}_text_key"] or f"{kind}_text_template"
        if config[key] is None:
            key = f"{kind}_text_template"  # the dataset has no episodic-specific template
        table = dataset.text_embeddings(kind, key, encoder_key=TEXT_SOURCES[source])
        if config["text_standardize"]:
            # per-dimension z-scores over the entities: sentence embeddings are unit vectors with
            # tiny coordinates, and mean-pooled LLM states share one large common direction
            rows = table[1:]
            rows = (rows - rows.mean(0)) / rows.std(0).clamp(min=1e-6)
            table = torch.cat([torch.zeros(1, rows.shape[1]), rows])
        if kind in shuffled:  # ablation: every user (item) gets another one's text
            generator = torch.Generator().manual_seed(int(config["seed"]))
            table = torch.cat([table[:1], table[1:][torch.randperm(len(table) - 1, generator=generator)]])
        return table
