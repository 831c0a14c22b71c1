"""MeLU (Lee et al., KDD'19): the MAML-trained estimator over categorical attribute embeddings.

Every attribute field in ``meta_user_fields`` / ``meta_item_fields`` gets its own
``embedding_size``-d table: a ``token`` field (gender, age, ...) is looked up, a ``token_seq``
field (genres, actors) is the mean of its values' embeddings, which is MeLU's multi-hot vector
times a bias-free linear layer divided by the number of active values. The concatenated field
embeddings feed the same estimator and meta-learning code as MetaLLMRec
(``meta_estimator.MetaEstimator``), so the two differ only in their input representation.
MeLU-1 and MeLU-5 are ``local_update: 1`` and ``local_update: 5``.

``meta_exclude_fields`` leaves fields out of MeLU's input while the dataset keeps them (the
ml-100k scenarios need ``release_year`` to pick the cold items). A fair MeLU on ml-100k excludes
``release_year``: MeLU's own MovieLens attributes have no year, and every cold item's year
(1997/1998) is a row that meta-training never updates.
"""
import torch
from recbole.utils import FeatureType
from torch import nn

from recbole_llm.model.meta_estimator import MetaEstimator


class MeLU(MetaEstimator):
    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        d = int(config["embedding_size"])
        self.fields = []
        self.embeddings = nn.ModuleDict()
        excluded = set(config["meta_exclude_fields"] or [])
        for kind, key in (("item", "meta_item_fields"), ("user", "meta_user_fields")):
            feat = dataset.item_feat if kind == "item" else dataset.user_feat
            for field in [f for f in config[key] or [] if f not in excluded]:
                if feat is None or field not in feat:
                    raise KeyError(f"MeLU: {key} names [{field}], which the dataset's .{kind} file does not provide")
                ftype = dataset.field2type[field]
                if ftype not in (FeatureType.TOKEN, FeatureType.TOKEN_SEQ):
                    raise ValueError(f"MeLU: field [{field}] in {key} is {ftype.value}; only token and token_seq "
                                     f"fields are embedded (declare it as :token in the atomic file)")
                name = f"{kind}_{field}"
                self.register_buffer(name, feat[field].clone(), persistent=False)
                self.embeddings[name] = nn.Embedding(dataset.num(field), d, padding_idx=0)
                self.fields.append((name, kind, ftype == FeatureType.TOKEN_SEQ))
        if not self.fields:
            raise ValueError("MeLU needs attribute fields: set meta_user_fields and/or meta_item_fields")
        self.build_estimator(d * len(self.fields), config["mlp_hidden_size"])

    def features(self, users, items):
        out = []
        for name, kind, is_seq in self.fields:
            values = getattr(self, name)[items if kind == "item" else users]
            emb = self.embeddings[name](values)
            if is_seq:
                count = (values > 0).sum(-1, keepdim=True).clamp(min=1)
                emb = emb.sum(-2) / count  # padding rows are zero (padding_idx)
            out.append(emb)
        return torch.cat(out, dim=-1)
