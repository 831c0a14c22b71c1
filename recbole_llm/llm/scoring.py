"""Causal-LLM scores and losses over prompts given as input embeddings (soft tokens allowed).

``score_continuations`` turns generation into scores: the log-likelihood of each candidate
continuation (e.g. a quoted item title) after one shared prompt. The prompt is run once and its
KV cache is shared by all candidates, which are scored in batches; this is what lets RecBole's
evaluator rank candidates (Hit/NDCG@K) instead of matching generated strings.

``target_token_loss`` is the training counterpart: cross-entropy on the target tokens only, the
prompt (including soft tokens) being context. Sequences are left-padded with explicit position ids
so only the last positions' logits are computed (the vocabulary projection dominates otherwise).
"""
import copy
import inspect

import torch
import torch.nn.functional as F

REDUCTIONS = ("sum", "mean")
# "choice": the log-probability of generating a continuation when generation may only follow the
# prompt's continuations (each token normalised over the next tokens they allow); branches only
BRANCH_REDUCTIONS = REDUCTIONS + ("choice",)


def kv_cache_argument(llm, cache):
    """Keyword argument passing a KV cache to ``llm``: transformers 5.24 renamed
    ``past_key_values`` to ``cache`` (the old name is removed in 5.40); older 5.x know only it."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm  # peft wrappers take **kwargs
    name = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    return {name: cache}


def kv_cache_of(output):
    """The KV cache a forward pass with ``use_cache=True`` returned (either transformers name)."""
    return output["cache"] if "cache" in output.keys() else output["past_key_values"]


def left_pad(rows, pad_value=0):
    """Rows of different lengths (token ids ``[L_b]`` or embeddings ``[L_b, H]``) as one left-padded
    batch, with the attention mask and the position ids that make the padding invisible: every
    row's last token sits in the last column, so ``logits_to_keep`` reads all rows' final positions.

    Returns ``(batch, attention_mask, position_ids)``.
    """
    width = max(len(row) for row in rows)
    first = rows[0]
    batch = first.new_full((len(rows), width, *first.shape[1:]), pad_value)
    attention = torch.zeros(len(rows), width, dtype=torch.long, device=first.device)
    for b, row in enumerate(rows):
        batch[b, width - len(row):] = row
        attention[b, width - len(row):] = 1
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    return batch, attention, positions


def _pad_ids(sequences, pad_id, device):
    lengths = torch.tensor([len(s) for s in sequences], device=device)
    ids = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long, device=device)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long, device=device)
    return ids, lengths


@torch.no_grad()
def score_continuations(llm, prompt_embeds, continuations, reduction="sum", batch_size=32, pad_id=0):
    """Log-likelihood of each continuation (list of token ids) after ``prompt_embeds`` [P, H].

    Returns a float32 tensor [len(continuations)]: the sum (or mean, ``reduction="mean"``) of the
    continuation's token log-probabilities.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if any(len(c) == 0 for c in continuations):
        raise ValueError("every continuation needs at least one token")
    device = prompt_embeds.device
    out = llm(inputs_embeds=prompt_embeds.unsqueeze(0), use_cache=True, logits_to_keep=1)
    prompt_cache = kv_cache_of(out)
    first_logp = F.log_softmax(out.logits[0, -1].float(), dim=-1)
    scores = []
    for start in range(0, len(continuations), batch_size):
        chunk = continuations[start:start + batch_size]
        ids, lengths = _pad_ids(chunk, pad_id, device)
        cache = copy.deepcopy(prompt_cache)
        cache.batch_repeat_interleave(len(chunk))
        # right padding needs no mask: pads come after every real token of their row
        logits = llm(input_ids=ids, use_cache=True, **kv_cache_argument(llm, cache)).logits.float()
        logp = F.log_softmax(logits, dim=-1)
        token_logp = torch.empty(ids.shape, device=device)
        token_logp[:, 0] = first_logp[ids[:, 0]]
        token_logp[:, 1:] = logp[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        mask = torch.arange(ids.shape[1], device=device).unsqueeze(0) < lengths.unsqueeze(1)
        total = (token_logp * mask).sum(1)
        scores.append(total / lengths if reduction == "mean" else total)
    return torch.cat(scores).float()


def target_token_loss(llm, prompt_embeds, targets):
    """Mean cross-entropy of the target tokens given their prompts (a batch).

    ``prompt_embeds``: list of [P_b, H] tensors (gradients flow back into them);
    ``targets``: list of non-empty token-id lists. Returns a scalar tensor.
    """
    embed = llm.get_input_embeddings()
    device, dtype = embed.weight.device, embed.weight.dtype
    rows, target_lengths = [], []
    for prompt, target in zip(prompt_embeds, targets):
        if len(target) == 0:
            raise ValueError("every target needs at least one token")
        target_ids = torch.as_tensor(target, dtype=torch.long, device=device)
        rows.append(torch.cat([prompt.to(dtype), embed(target_ids)]))
        target_lengths.append(len(target))
    inputs, attention, positions = left_pad(rows)
    keep = max(target_lengths) + 1
    logits = llm(inputs_embeds=inputs, attention_mask=attention, position_ids=positions,
                 logits_to_keep=keep).logits.float()  # [B, keep, V]: the last `keep` positions
    losses = []
    for b, target in enumerate(targets):
        n = len(target)
        # logits at positions -n-1 .. -2 predict the n target tokens at -n .. -1
        predicted = logits[b, keep - n - 1: keep - 1]
        losses.append(F.cross_entropy(predicted, torch.as_tensor(target, device=device), reduction="sum"))
    return torch.stack(losses).sum() / sum(target_lengths)


def _branch_layout(prompt_length, branch_lengths):
    """Segment id (0 = prompt, k + 1 = branch k) and position id of every token of one row made
    of a prompt followed by its continuations laid side by side."""
    segments = [0] * prompt_length
    positions = list(range(prompt_length))
    for k, length in enumerate(branch_lengths):
        segments += [k + 1] * length
        positions += range(prompt_length, prompt_length + length)
    return segments, positions


def _additive(allowed, dtype):
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min).unsqueeze(1)


def _attention_masks(llm, allowed, position, dtype):
    """The 4-D additive mask; for models with sliding-window layers (Gemma 3) a mask per layer
    type, the sliding one also limited to keys fewer than ``sliding_window`` positions back, the
    distance measured in position ids: a branch sits, for its attention, right after the prompt."""
    window = getattr(llm.config, "sliding_window", None)
    if not window or "sliding_attention" not in (getattr(llm.config, "layer_types", None) or []):
        return _additive(allowed, dtype)
    near = (position.unsqueeze(2) - position.unsqueeze(1)) < window
    near |= torch.eye(allowed.shape[-1], dtype=torch.bool, device=allowed.device)
    return {"full_attention": _additive(allowed, dtype), "sliding_attention": _additive(allowed & near, dtype)}


def _branch_inputs(llm, prompt_embeds, continuations):
    """The batch of prompts with their continuations side by side ("branches"; see
    ``branch_log_likelihoods``): ``(kwargs of the LLM's forward, branch lengths per row)``. Rows
    are left-padded, so a row's branches fill its last ``sum(lengths)`` columns."""
    embed = llm.get_input_embeddings()
    device, dtype = embed.weight.device, embed.weight.dtype
    rows, segments, positions, lengths = [], [], [], []
    for prompt, branches in zip(prompt_embeds, continuations):
        if not branches or any(len(c) == 0 for c in branches):
            raise ValueError("every prompt needs continuations of at least one token each")
        ids = torch.as_tensor([t for c in branches for t in c], dtype=torch.long, device=device)
        rows.append(torch.cat([prompt.to(dtype), embed(ids)]))
        seg, pos = _branch_layout(len(prompt), [len(c) for c in branches])
        segments.append(torch.tensor(seg, device=device))
        positions.append(torch.tensor(pos, device=device))
        lengths.append([len(c) for c in branches])
    inputs, attention, _ = left_pad(rows)
    segment, _, _ = left_pad(segments, pad_value=-1)
    position, _, _ = left_pad(positions, pad_value=0)
    width = inputs.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    same_or_prompt = (segment.unsqueeze(1) == segment.unsqueeze(2)) | (segment.unsqueeze(1) == 0)
    allowed = causal & same_or_prompt & attention.bool().unsqueeze(1)
    allowed |= torch.eye(width, dtype=torch.bool, device=device)  # padding rows attend to themselves
    forward = {"inputs_embeds": inputs, "attention_mask": _attention_masks(llm, allowed, position, dtype),
               "position_ids": position}
    return forward, lengths


def _branch_forward(llm, prompt_embeds, continuations):
    """One forward pass over prompts with their branches. Returns ``(logits [B, keep, V], spans)``:
    the logits of the last ``keep`` positions of every row and, per row, ``(first column, branch
    lengths)`` of its branches within them (column ``first - 1`` is the prompt's last token)."""
    forward, lengths = _branch_inputs(llm, prompt_embeds, continuations)
    keep = max(sum(row) for row in lengths) + 1  # the last prompt token and every branch token
    logits = llm(**forward, logits_to_keep=keep).logits.float()
    return logits, [(keep - sum(row), row) for row in lengths]


def branch_log_likelihoods(llm, prompt_embeds, continuations, among_continuations=False):
    """Token log-likelihoods of every continuation of every prompt, in ONE forward pass.

    ``prompt_embeds``: list of ``[P_b, H]`` prompts (soft tokens allowed; gradients flow back);
    ``continuations``: per prompt, a list of non-empty token-id lists. Each batch row is a prompt
    followed by all of its continuations side by side ("branches"). A block attention mask lets a
    branch see the whole prompt and its own earlier tokens, never another branch, and its position
    ids continue the prompt's, so each branch is scored exactly as if it were the only
    continuation, while the prompt is computed once and every matmul sees all branches' rows.
    ``among_continuations``: normalise each token over the next tokens that the prompt's
    continuations sharing its prefix allow (a trie), not over the vocabulary: a token that is the
    only way on gets log-probability 0, so copying the rest of a listed title costs nothing and the
    continuations' summed log-probabilities are a distribution over them (``reduction="choice"``).
    Returns, per prompt, a list of 1-D float32 tensors (one log-probability per token).
    """
    logits, spans = _branch_forward(llm, prompt_embeds, continuations)
    out = []
    for b, (start, lengths) in enumerate(spans):
        targets = torch.as_tensor([t for c in continuations[b] for t in c], dtype=torch.long, device=logits.device)
        # each token is predicted by its predecessor in its own branch; a branch's first token by
        # the prompt's last token (column start - 1)
        predictor, column = [], start
        for length in lengths:
            predictor += [start - 1] + list(range(column, column + length - 1))
            column += length
        row_logits = logits[b, predictor]
        if among_continuations:
            allowed, valid = _next_tokens_allowed(continuations[b], logits.device)
            normaliser = row_logits.gather(-1, allowed).masked_fill(~valid, float("-inf")).logsumexp(-1)
        else:
            normaliser = row_logits.logsumexp(-1)
        token_logp = row_logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - normaliser
        out.append(list(token_logp.split(lengths)))
    return out


def _next_tokens_allowed(continuations, device):
    """``(ids [T, A], valid [T, A])``: for every token of every continuation (flattened), the
    distinct tokens that the continuations sharing its prefix have at its position (padded)."""
    nexts = {}
    for tokens in continuations:
        for k in range(len(tokens)):
            nexts.setdefault(tuple(tokens[:k]), set()).add(tokens[k])
    rows = [sorted(nexts[tuple(tokens[:k])]) for tokens in continuations for k in range(len(tokens))]
    width = max(map(len, rows))
    ids = torch.tensor([row + row[:1] * (width - len(row)) for row in rows], dtype=torch.long, device=device)
    valid = torch.tensor([[True] * len(row) + [False] * (width - len(row)) for row in rows], device=device)
    return ids, valid


@torch.no_grad()
def branch_next_token_logprobs(llm, prompt_embeds, continuations, token_ids):
    """Per prompt, ``[n_branches, len(token_ids)]`` log-probabilities of ``token_ids`` as the next
    token after each of its continuations, all branches in one forward pass: the answer to a
    question that ends each branch, its shared context computed once. Only the branches' final
    columns go through the LM head (the vocabulary projection is ~20% of a small LLM's FLOPs)."""
    forward, lengths = _branch_inputs(llm, prompt_embeds, continuations)
    width = forward["inputs_embeds"].shape[1]
    ends = [width - sum(row) - 1 + torch.tensor(row).cumsum(0) for row in lengths]  # each branch's final token
    columns = torch.cat(ends).unique()  # sorted; shared by every row (left padding aligns the rows' ends)
    logits = llm(**forward, logits_to_keep=columns.to(forward["inputs_embeds"].device)).logits.float()
    return [logits[b, torch.searchsorted(columns, row_ends).to(logits.device)].log_softmax(-1)[:, token_ids]
            for b, row_ends in enumerate(ends)]


@torch.no_grad()
def score_branches(llm, prompt_embeds, continuations, reduction="sum"):
    """``score_continuations`` for several prompts at once, each in one pass (``branch_log_likelihoods``);
    ``reduction="choice"``: the summed log-probabilities normalised among the prompt's continuations.

    Returns, per prompt, a float32 tensor with one score per continuation.
    """
    if reduction not in BRANCH_REDUCTIONS:
        raise ValueError(f"reduction must be one of {BRANCH_REDUCTIONS}, got {reduction!r}")
    scores = []
    for per_token in branch_log_likelihoods(llm, prompt_embeds, continuations, reduction == "choice"):
        totals = torch.stack([t.sum() for t in per_token])
        lengths = torch.tensor([len(t) for t in per_token], dtype=torch.float32, device=totals.device)
        scores.append(totals / lengths if reduction == "mean" else totals)
    return scores
