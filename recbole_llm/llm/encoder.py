"""Frozen text embeddings from a sentence encoder or a causal LLM, cached on disk.

``embed_texts(texts, encoder=..., pooling=...)`` is the one way the plugin turns texts into fixed
vectors for frozen use (MetaLLMRec's user/item inputs, AugBPR's embedding judge, ALLMRec with a
frozen SBERT). The cache key covers the texts themselves (so dataset and template), the encoder's
identity, the pooling and the normalisation.

Pooling: ``auto`` is the sentence encoder's own pooling, or the mean of the last hidden states for
a causal LLM; ``mean`` and ``last`` (last non-padding token) are available for causal LLMs.
"""
from logging import getLogger

import torch

from recbole_llm.llm import models
from recbole_llm.llm.cache import Cache, content_key

POOLINGS = ("auto", "mean", "last")


class TextEmbedder:
    def __init__(self, name, pooling="auto", device="cpu", dtype="auto", max_length=256, normalize=False):
        if pooling not in POOLINGS:
            raise ValueError(f"text pooling must be one of {POOLINGS}, got {pooling!r}")
        self.name = name
        self.resolved = models.resolve(name)
        self.pooling = pooling
        self.device = device
        self.dtype = dtype
        self.max_length = int(max_length)
        self.normalize = bool(normalize)
        self._model = None

    @property
    def identity(self):
        return [self.resolved.identity, self.pooling, self.max_length, self.normalize]

    def _load(self):
        if self._model is not None:
            return
        if self.resolved.kind == models.CAUSAL or (self.resolved.kind is None and self.pooling != "auto"):
            self._model = models.load_causal_lm(self.name, self.dtype, self.device)
            self._kind = models.CAUSAL
        else:
            if self.pooling == "last":
                raise ValueError("pooling 'last' applies to causal LLMs; sentence encoders pool themselves")
            self._model = models.load_sentence_encoder(self.name, self.device)
            self._model.max_seq_length = min(self._model.max_seq_length or self.max_length, self.max_length)
            self._model.eval()
            self._kind = models.SENTENCE

    @torch.no_grad()
    def encode(self, texts, batch_size=64):
        """float32 tensor [len(texts), dim]; empty texts are refused (they carry no information)."""
        empty = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
        if empty:
            raise ValueError(f"cannot embed empty texts (positions {empty[:10]}{'...' if len(empty) > 10 else ''})")
        self._load()
        if self._kind == models.SENTENCE:
            out = self._model.encode(list(texts), batch_size=batch_size, convert_to_tensor=True,
                                     show_progress_bar=False)
            out = out.float().cpu()
        else:
            out = torch.cat([self._pool_causal(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)])
        if self.normalize:
            out = torch.nn.functional.normalize(out, dim=-1)
        return out

    def _pool_causal(self, texts):
        model, tokenizer = self._model
        batch = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True,
                          max_length=self.max_length).to(self.device)
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1].float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        if self.pooling == "last":
            last = batch["attention_mask"].sum(1) - 1
            if tokenizer.padding_side == "left":
                last = torch.full_like(last, hidden.shape[1] - 1)
            return hidden[torch.arange(hidden.shape[0]), last].cpu()
        return ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu()


def embed_texts(texts, encoder, cache_dir, pooling="auto", device="cpu", dtype="auto",
                max_length=256, normalize=False, batch_size=64, chunk_size=2048,
                namespace="embeddings", show_progress=True):
    """Embeddings of ``texts`` (float32 [n, dim]), computed once and reused from ``cache_dir``."""
    embedder = TextEmbedder(encoder, pooling, device, dtype, max_length, normalize)
    texts = list(texts)
    cache = Cache(cache_dir)
    key = content_key("text-embeddings-v1", embedder.identity, texts)
    path = cache.path(namespace, f"{encoder}-{pooling}", key)
    result = cache.chunked(
        path, len(texts), chunk_size,
        lambda start, stop: embedder.encode(texts[start:stop], batch_size),
        desc=f"Embedding {len(texts)} texts with {encoder}", show_progress=show_progress,
    )
    getLogger().info(f"Text embeddings {tuple(result.shape)} from {encoder} ({pooling}): {path}")
    return result


def embed_from_config(config, texts, namespace="embeddings", encoder_key="text_encoder"):
    """``embed_texts`` with the run's settings (encoder, pooling, cache, device, dtype)."""
    return embed_texts(
        texts, config[encoder_key], config["cache_dir"], pooling=config["text_pooling"] or "auto",
        device=config["device"], dtype=config["llm_dtype"] or "auto",
        max_length=config["text_max_length"] or 256, normalize=bool(config["text_normalize"]),
        batch_size=config["text_batch_size"] or 64, namespace=namespace,
        show_progress=bool(config["show_progress"]),
    )
