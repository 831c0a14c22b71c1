"""Pairwise preference judges: which of two items would a user rather have, given their history?

Used by AugBPR (``recbole_llm/model/augbpr.py``) to make synthetic training pairs between
cold-start items, and to measure how often a judge agrees with held-out interactions.

A *pair* is a row ``(user, a, b)`` of internal ids. Every judge returns, per pair, a float tensor
``[n, 2]``: the probability that ``a`` is preferred, asked with ``a`` shown first (column 0) and
with ``b`` shown first (column 1). The mean of the two columns is the decision (``a`` if above 0.5)
and its distance from 0.5 the confidence. This one format serves both judges and their cache.

* ``LLMJudge``: a chat prompt listing the user's last ``judge_history_len`` item titles and the two
  candidates as options A and B; the answer is read from the next-token log-probabilities of "A"
  and "B" (no generated text is parsed). Asking in both orders cancels the LLM's position bias.
* ``PointwiseLLMJudge``: each (user, item) scored once, without options: the PMI
  ``log P(text | history) - log P(text | no history)`` of the item's text as the answer to "which
  item next?", all of a user's items as branches of one forward pass over the history prompt
  (``scoring.score_branches``); the no-history term is computed once per item. A pair is decided
  by the score difference, ``p = sigmoid(s_a - s_b)``: no order, cost O(items) not O(pairs).
* ``EmbeddingJudge``: cosine similarity between the sentence embedding of the history text and of
  each candidate's text (``llm/encoder.py``); order-free, so both columns are equal.
* Controls, never methods: ``PopularityJudge`` prefers the item with more interactions in the
  ``counts`` it is given (an item prior; benchmarks.judge_quality); ``RandomJudge`` answers at
  random (``judge: random``: AugBPR with random labels).

Judgements are cached by content (the prompts' texts and the judge's identity), computed in chunks
that survive an interruption (``llm/cache.Cache.chunked``), with a progress bar and a throughput line.
"""
import time
from logging import getLogger

import numpy as np
import torch

from recbole_llm.llm import models
from recbole_llm.llm.cache import Cache, content_key
from recbole_llm.llm.encoder import TextEmbedder, embed_from_config
from recbole_llm.llm.scoring import branch_next_token_logprobs, score_branches

JUDGES = ("llm", "llm_pointwise", "embedding", "random")  # what `judge` may name; PopularityJudge: benchmarks


class LLMJudge:
    """A causal LLM asked "A or B?"; the decision comes from next-token log-probabilities."""

    def __init__(self, name, histories, titles, history_len=10, words=None, dtype="auto", device="cpu",
                 batch_size=8):
        self.model_name = self.name = name
        self.histories = histories
        self.titles = titles
        self.history_len = int(history_len)
        self.words = {"item": "item", "items": "items", "past_verb": "interacted with", "verb": "choose", **(words or {})}
        self.dtype, self.device, self.batch_size = dtype, device, int(batch_size)
        self.resolved = models.resolve(name)
        self._loaded = None

    @property
    def identity(self):
        return ["llm-judge-v3", self.resolved.identity, str(models.resolve_dtype(self.dtype, self.device)),
                self.words]

    def describe(self, pairs):
        """What determines each judgement: history titles and the two candidates' titles."""
        return [(self._history_titles(u), self.titles[a], self.titles[b]) for u, a, b in pairs.tolist()]

    def _history_titles(self, user):
        return tuple(self.titles[i] for i in self.histories[user][-self.history_len:])

    def question(self, history_titles):
        """The part of the message shared by every pair of one user (and both orders)."""
        w = self.words
        listed = "\n".join(f"- {title}" for title in history_titles)
        return (f"I have {w['past_verb']} these {w['items']}, oldest first:\n{listed}\n\n"
                f"Which of these two {w['items']} would I rather {w['verb']} next?\n")

    @staticmethod
    def options(option_a, option_b):
        return f"A: {option_a}\nB: {option_b}\nAnswer with A or B only."

    def _load(self):
        if self._loaded is None:
            model, tokenizer = models.load_causal_lm(self.model_name, self.dtype, self.device)
            chat = bool(getattr(tokenizer, "chat_template", None))
            # With a chat template the answer is the assistant's first token ("A"); a plain prompt
            # ends with "Answer:" and the answer token carries a leading space (" A") if the
            # vocabulary has such a token.
            options = [tokenizer.encode(o, add_special_tokens=False) for o in "AB"]
            spaced = [tokenizer.encode(" " + o, add_special_tokens=False) for o in "AB"]
            if not chat and all(len(ids) == 1 for ids in spaced):
                options = spaced
            if any(len(ids) != 1 for ids in options) or options[0] == options[1]:
                raise ValueError(f"LLM judge '{self.name}': options A/B are not single distinct tokens: {options}")
            self._loaded = (model, tokenizer, chat, [ids[0] for ids in options])
        return self._loaded

    def prompt_parts(self, history_titles):
        """``(prefix, after)``: the prompt is ``prefix + options(a, b) + after`` (chat template applied)."""
        _, tokenizer, chat, _ = self._load()
        question = self.question(history_titles)
        if not chat:
            return question, "\nAnswer:"
        marker = "\x00OPTIONS\x00"
        full = tokenizer.apply_chat_template([{"role": "user", "content": question + marker}], tokenize=False,
                                             add_generation_prompt=True)
        cut = full.index(marker)
        return full[:cut], full[cut + len(marker):]

    @torch.no_grad()
    def option_logprobs(self, prompt_groups):
        """``[n, 2]`` next-token log-probabilities of "A" and "B" after each prompt of
        ``prompt_groups`` (lists of prompts, flattened in order; n = all prompts).

        The prompts of one group (one user's pairs, both orders) share their opening: its tokens
        run once, and each prompt's remaining tokens follow it as a branch of one forward pass
        (``scoring.branch_next_token_logprobs``), answered exactly as if the prompt were alone.
        ``batch_size`` groups run per pass, groups of similar length together.
        """
        model, tokenizer, chat, option_ids = self._load()
        embed = model.get_input_embeddings()
        split = []
        for group in prompt_groups:
            encoded = [tokenizer.encode(p, add_special_tokens=not chat) for p in group]
            shared = _common_prefix_length(encoded)
            split.append((encoded[0][:shared], [ids[shared:] for ids in encoded]))
        offsets = np.cumsum([0] + [len(group) for group in prompt_groups])
        out = torch.empty(int(offsets[-1]), 2)
        by_length = sorted(range(len(split)), key=lambda g: len(split[g][0]) + sum(map(len, split[g][1])))
        for start in range(0, len(by_length), self.batch_size):
            groups = by_length[start:start + self.batch_size]
            prompts = [embed(torch.tensor(split[g][0], dtype=torch.long, device=self.device)) for g in groups]
            answers = branch_next_token_logprobs(model, prompts, [split[g][1] for g in groups], option_ids)
            for g, logprobs in zip(groups, answers):
                out[offsets[g]:offsets[g + 1]] = logprobs.cpu()
        return out

    # pairs per group of prompts: a group is one row of the forward pass, its attention quadratic in
    # the row's length; a history shown to everyone (``judge_history: popular``) would otherwise put
    # a whole chunk's pairs in one row (a user has ~4 pairs in AugBPR's default sampling)
    pairs_per_group = 8

    def score(self, pairs):
        """Both orders of every pair; the pairs of one shown history form groups of prompts (at most
        ``pairs_per_group`` pairs each) that share the history's tokens."""
        described = self.describe(pairs)
        by_history = {}
        for row, (history, _, _) in enumerate(described):
            by_history.setdefault(history, []).append(row)
        groups, order = [], []
        for history, rows in by_history.items():
            prefix, after = self.prompt_parts(list(history))
            for start in range(0, len(rows), self.pairs_per_group):
                part = rows[start:start + self.pairs_per_group]
                groups.append([prefix + options + after for _, a, b in (described[row] for row in part)
                               for options in (self.options(a, b), self.options(b, a))])
                order += part
        logprobs = torch.empty(len(described), 2, 2)  # [pair, order shown, option]
        logprobs[order] = self.option_logprobs(groups).view(-1, 2, 2)
        # two-way normalisation P(A | A or B); with b shown first, "B" means a
        probs = torch.empty(len(described), 2)
        probs[:, 0] = logprobs[:, 0].softmax(-1)[:, 0]
        probs[:, 1] = logprobs[:, 1].softmax(-1)[:, 1]
        return probs


def _common_prefix_length(sequences):
    """Length of the longest common prefix of token-id lists, leaving every one at least one token."""
    shortest = min(len(ids) for ids in sequences)
    length = 0
    while length < shortest - 1 and all(ids[length] == sequences[0][length] for ids in sequences):
        length += 1
    return length


class PointwiseLLMJudge(LLMJudge):
    """PMI of each item's text after the user's history against after no history (see module doc)."""

    chunk_size = 256

    def __init__(self, *args, items_per_pass=32, **kwargs):
        super().__init__(*args, **kwargs)
        self.name = f"{self.model_name}-pointwise"
        self.items_per_pass = int(items_per_pass)
        self._prior = {}

    @property
    def identity(self):
        return ["llm-pointwise-judge-v1", *super().identity[1:]]

    def ask(self, history_titles):
        """The prompt whose continuation is the item's text (chat template applied if any)."""
        _, tokenizer, chat, _ = self._load()
        w = self.words
        if history_titles:
            listed = "\n".join(f"- {title}" for title in history_titles)
            question = (f"I have {w['past_verb']} these {w['items']}, oldest first:\n{listed}\n\n"
                        f"Name one {w['item']} I would like to {w['verb']} next.")
        else:
            question = f"Name one {w['item']} I would like to {w['verb']}."
        if not chat:
            return question + "\nAnswer:"
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)

    @torch.no_grad()
    def log_likelihoods(self, history_titles, items):
        """``log P(text_i | prompt)`` of ``items`` after the prompt of ``history_titles``."""
        model, tokenizer, chat, _ = self._load()
        prompt_ids = torch.tensor(tokenizer.encode(self.ask(history_titles), add_special_tokens=not chat))
        prompt = model.get_input_embeddings()(prompt_ids.to(self.device))
        out = []
        for start in range(0, len(items), self.items_per_pass):
            chunk = items[start:start + self.items_per_pass]
            texts = [tokenizer.encode(" " + self.titles[i] if not chat else self.titles[i], add_special_tokens=False)
                     for i in chunk]
            out.append(score_branches(model, [prompt], [texts])[0].float().cpu())
        return torch.cat(out)

    def prior(self, items):
        missing = sorted({i for i in items if i not in self._prior})
        if missing:
            self._prior.update(zip(missing, self.log_likelihoods([], missing).tolist()))
        return torch.tensor([self._prior[i] for i in items])

    def score(self, pairs):
        probs = torch.empty(len(pairs), 2)
        by_history = {}  # users with the same shown history share one pass
        for row, (user, a, b) in enumerate(pairs.tolist()):
            by_history.setdefault(self._history_titles(user), []).append((row, a, b))
        for history, rows in by_history.items():
            items = sorted({i for _, a, b in rows for i in (a, b)})
            pmi = self.log_likelihoods(list(history), items) - self.prior(items)
            score = dict(zip(items, pmi.tolist()))
            for row, a, b in rows:
                probs[row] = torch.sigmoid(torch.tensor(score[a] - score[b]))
        return probs


class PopularityJudge:
    """Control: prefers the item with more interactions in ``counts``; ``p = sigmoid(log(1 + c_a)
    - log(1 + c_b))``, order-free."""

    chunk_size = 1 << 20

    def __init__(self, counts, source):
        self.counts = torch.as_tensor(counts, dtype=torch.float64)
        self.name = f"popularity-{source}"
        self.source = source

    @property
    def identity(self):
        return ["popularity-judge-v1", self.source, self.counts.tolist()]

    def describe(self, pairs):
        return pairs.tolist()

    def score(self, pairs):
        u, a, b = torch.as_tensor(pairs).T
        p = torch.sigmoid(torch.log1p(self.counts[a]) - torch.log1p(self.counts[b])).float()
        return torch.stack([p, p], dim=1)


class RandomJudge:
    """Control: a uniform random probability per pair (seeded by the pair), order-free."""

    chunk_size = 1 << 20
    name = "random"

    def __init__(self, seed):
        self.seed = int(seed)

    @property
    def identity(self):
        return ["random-judge-v1", self.seed]

    def describe(self, pairs):
        return pairs.tolist()

    def score(self, pairs):
        rows = torch.as_tensor(pairs, dtype=torch.long)
        mixed = (rows[:, 0] * 1_000_003 + rows[:, 1] * 10_007 + rows[:, 2] + self.seed * 7_919) % (2 ** 31 - 1)
        p = torch.tensor([float(torch.rand(1, generator=torch.Generator().manual_seed(int(m)))) for m in mixed])
        return torch.stack([p, p], dim=1)


class EmbeddingJudge:
    """Cosine similarity of the history text and each candidate's text in a sentence encoder."""

    chunk_size = 1 << 20  # scoring is a lookup once the embeddings exist: one chunk

    def __init__(self, embed, identity, histories, texts, history_len=10):
        self.embed = embed  # texts -> float tensor [n, dim], cached (encoder.embed_from_config)
        self.encoder_identity = identity
        self.histories = histories
        self.texts = texts
        self.history_len = int(history_len)
        self.name = "embedding"
        self._vectors = None

    @property
    def identity(self):
        return ["embedding-judge-v1", self.encoder_identity]

    def history_text(self, user):
        return " ".join(self.texts[i] for i in self.histories[user][-self.history_len:])

    def describe(self, pairs):
        return [(self.history_text(u), self.texts[a], self.texts[b]) for u, a, b in pairs.tolist()]

    def _embeddings(self):
        """Unit vectors of every user's history text and every item's text (one cached batch each)."""
        if self._vectors is None:
            users = [u for u, h in enumerate(self.histories) if len(h)]
            embedded = torch.nn.functional.normalize(self.embed([self.history_text(u) for u in users]), dim=-1)
            user_vec = torch.zeros(len(self.histories), embedded.shape[1])
            user_vec[torch.as_tensor(users)] = embedded
            item_vec = torch.nn.functional.normalize(self.embed(list(self.texts[1:])), dim=-1)
            self._vectors = user_vec, torch.cat([torch.zeros(1, item_vec.shape[1]), item_vec])
        return self._vectors

    def score(self, pairs):
        user_vec, item_vec = self._embeddings()
        u, a, b = pairs.T
        diff = (user_vec[u] * item_vec[a]).sum(-1) - (user_vec[u] * item_vec[b]).sum(-1)
        prob = (2 + diff) / 4  # cosine difference in [-2, 2] mapped monotonically onto [0, 1]
        return torch.stack([prob, prob], dim=1)


def judge_pairs(judge, pairs, cache_dir, chunk_size=None, show_progress=True):
    """``(probs [n, 2], report)`` for ``pairs`` [n, 3], computed once and reused from the cache.

    ``report`` holds the counts computed now / reused, the seconds spent and the throughput.
    """
    pairs = torch.as_tensor(pairs, dtype=torch.long)
    chunk_size = chunk_size or getattr(judge, "chunk_size", 128)
    cache = Cache(cache_dir)
    # v2: the cache holds the judgements in the order of the pairs sorted by user, so the chunks
    # keep a user's pairs together (the LLM judges share one history pass among them)
    key = content_key("pair-judgements-v2", judge.identity, judge.describe(pairs))
    path = cache.path("judgements", judge.name, key)
    by_user = torch.argsort(pairs[:, 0], stable=True)
    sorted_pairs = pairs[by_user]
    stats = {}
    start = time.time()
    sorted_probs = cache.chunked(path, len(pairs), chunk_size, lambda s, e: judge.score(sorted_pairs[s:e]),
                                 desc=f"Judging {len(pairs)} pairs with {judge.name}", show_progress=show_progress,
                                 stats=stats)
    probs = torch.empty_like(sorted_probs)
    probs[by_user] = sorted_probs
    seconds = time.time() - start
    rate = stats["computed"] / seconds if stats["computed"] else float("nan")
    speed = f"{rate:.2f} pairs/s computed" if stats["computed"] else "all from the cache"
    getLogger().info(
        f"Judged {len(pairs)} pairs with {judge.name}: {stats['computed']} computed, {stats['reused']} "
        f"reused, {seconds:.1f} s ({speed}); cache {path}"
    )
    return probs, {"pairs": len(pairs), **stats, "seconds": round(seconds, 1), "pairs_per_s": round(rate, 2)}


def decide(probs, min_confidence=0.0, keep_fraction=1.0):
    """``(keep, a_wins, confidence)``: pairs judged with more than ``min_confidence``
    (``|2p - 1|`` of the order-averaged probability ``p``; exact ties are always dropped), and of
    those the ``keep_fraction`` most confident (a share, so one setting means the same for judges
    whose probabilities live on different scales: PMI differences are several nats, cosine
    differences a few hundredths)."""
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"aug_keep_fraction must be in (0, 1], got {keep_fraction}")
    p = probs.float().mean(1)
    confidence = (2 * p - 1).abs()
    keep = (confidence > min_confidence) & (p != 0.5)
    if keep_fraction < 1:
        ranked = torch.argsort(torch.where(keep, confidence, torch.full_like(confidence, -1.0)),
                               descending=True, stable=True)
        most_confident = torch.zeros_like(keep)
        most_confident[ranked[:round(keep_fraction * int(keep.sum()))]] = True
        keep &= most_confident
    return keep, p > 0.5, confidence


def order_diagnostics(probs):
    """How much the two orders matter: share of answers that pick the option shown first, and
    share of pairs where both orders pick the same item."""
    a_first_says_a, b_first_says_a = probs[:, 0] > 0.5, probs[:, 1] > 0.5
    first_shown_wins = torch.cat([a_first_says_a, ~b_first_says_a]).float().mean().item()
    agree = (a_first_says_a == b_first_says_a).float().mean().item()
    return {"first_shown_wins": round(first_shown_wins, 3), "orders_agree": round(agree, 3)}


def pairwise_accuracy(probs):
    """Share of truth pairs ``(user, positive, negative)`` judged in favour of the positive (ties
    count one half); chance is 0.5."""
    p = probs.float().mean(1)
    return ((p > 0.5).float() + 0.5 * (p == 0.5).float()).mean().item()


# ----------------------------------------------------------------------------------------------
# what to judge


def sample_pairs(histories, candidates, users_per_item, pairs_per_user, min_history, seed):
    """Pairs ``(user, a, b)``: for every candidate item ``a``, ``users_per_item`` random users with at
    least ``min_history`` training items, each with ``pairs_per_user`` other random candidates ``b``."""
    candidates = np.sort(np.asarray(list(candidates), dtype=np.int64))
    if len(candidates) < 2:
        raise ValueError(f"judging pairs needs at least 2 candidate (cold-start) items, got {len(candidates)}")
    users = np.array([u for u, h in enumerate(histories) if len(h) >= min_history], dtype=np.int64)
    if len(users) == 0:
        longest = max((len(h) for h in histories), default=0)
        raise ValueError(f"no user has at least aug_min_history={min_history} training items "
                         f"(the longest history has {longest}); lower aug_min_history")
    rng = np.random.default_rng(seed)
    rows = []
    for a in candidates:
        chosen = rng.choice(users, size=min(users_per_item, len(users)), replace=False)
        for user in chosen:
            others = rng.choice(len(candidates) - 1, size=min(pairs_per_user, len(candidates) - 1), replace=False)
            others = np.where(others >= np.searchsorted(candidates, a), others + 1, others)  # skip a
            rows += [(user, a, candidates[o]) for o in others]
    return torch.as_tensor(np.array(rows, dtype=np.int64).reshape(-1, 3))


def warm_pairs(pairs, histories, warm_items, per_pair, seed):
    """Pairs ``(user, a, w)``: for each distinct ``(user, a)`` of ``pairs`` [n, 3], ``per_pair``
    random ``warm_items`` the user has no training interaction with. Judged against ``a``, they
    place cold items among warm ones, not only among themselves."""
    warm_items = np.sort(np.asarray(list(warm_items), dtype=np.int64))
    if per_pair > 0 and len(warm_items) == 0:
        raise ValueError("aug_warm_pairs_per_user > 0 needs warm items, and every item is cold-start")
    rng = np.random.default_rng(seed)
    rows = []
    for user, a in dict.fromkeys(map(tuple, np.asarray(pairs)[:, :2].tolist())):
        seen = set(np.asarray(histories[user]).tolist())
        unseen = warm_items[~np.isin(warm_items, list(seen))] if seen else warm_items
        chosen = rng.choice(unseen, size=min(per_pair, len(unseen)), replace=False) if len(unseen) else []
        rows += [(user, a, int(w)) for w in chosen]
    return torch.as_tensor(np.array(rows, dtype=np.int64).reshape(-1, 3))


def truth_pairs(held_out, interacted, candidates, histories, min_history, max_pairs, seed):
    """Held-out truth ``(user, positive, negative)``: ``positive`` is a candidate the user interacted
    with in ``held_out`` (pairs of user and item ids), ``negative`` a random candidate the user never
    interacted with (``interacted[user]`` = set of all their items); users need ``min_history``."""
    candidates = np.sort(np.asarray(list(candidates), dtype=np.int64))
    is_candidate = set(candidates.tolist())
    rng = np.random.default_rng(seed)
    rows = []
    for user, item in held_out:
        if item not in is_candidate or len(histories[user]) < min_history:
            continue
        for _ in range(20):  # rejection sampling; candidates far outnumber one user's items
            negative = int(candidates[rng.integers(len(candidates))])
            if negative not in interacted[user]:
                rows.append((user, item, negative))
                break
    rows = np.array(rows, dtype=np.int64).reshape(-1, 3)
    if len(rows) > max_pairs:
        rows = rows[np.sort(rng.choice(len(rows), size=max_pairs, replace=False))]
    return torch.as_tensor(rows)


def judge_from_config(config, histories, item_titles, item_texts):
    """The judge named by ``judge`` with the run's model and prompt settings; LLM judges show
    each item as its ``item_text_template`` text (``judge_item_text: text``, the embedding
    judge's input too) or its title (``title``)."""
    kind = config["judge"]
    if kind not in JUDGES:
        raise ValueError(f"judge must be one of {JUDGES}, got {kind!r}")
    history_len = int(config["judge_history_len"])
    if history_len < 1:
        raise ValueError(f"judge_history_len must be at least 1, got {history_len}")
    if kind == "random":
        return RandomJudge(config["aug_seed"])
    if kind in ("llm", "llm_pointwise"):
        words = {key: config[f"prompt_{name}"] for key, name in
                 (("item", "item_noun"), ("items", "items_noun"), ("past_verb", "past_verb"), ("verb", "verb"))
                 if config[f"prompt_{name}"]}
        dtype = config["judge_dtype"] or "float32"
        if dtype == "auto":
            dtype = config["llm_dtype"] or "auto"
        shown = {"text": item_texts, "title": item_titles}.get(config["judge_item_text"] or "text")
        if shown is None:
            raise ValueError(f"judge_item_text must be 'text' or 'title', got {config['judge_item_text']!r}")
        judge_class = LLMJudge if kind == "llm" else PointwiseLLMJudge
        return judge_class(config["llm"], histories, shown, history_len, words, dtype=dtype,
                           device=config["device"], batch_size=config["judge_batch_size"])
    identity = TextEmbedder(config["text_encoder"], config["text_pooling"] or "auto", max_length=config["text_max_length"] or 256,
                            normalize=bool(config["text_normalize"])).identity
    return EmbeddingJudge(lambda texts: embed_from_config(config, texts, namespace="judge"), identity,
                          histories, item_texts, history_len)
