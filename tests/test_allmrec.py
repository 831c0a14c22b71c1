"""ALLMRec / TALLRec on tiny data: both stages train, scores are position-blind, checkpoints hold only
trainable weights, and a backbone from other data is refused."""
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import DATA_DIR, ML_TINY_YAML, TINY_ALLMREC, tiny_config
from recbole_llm.config import Config
from recbole_llm.llm.models import load_causal_lm
from recbole_llm.llm.scoring import branch_log_likelihoods, score_branches, score_continuations, target_token_loss
from recbole_llm.checkpoint import CheckpointSafeMixin, load_checkpoint
from recbole_llm.model import allmrec as allmrec_module
from recbole_llm.model.backbone import fit_sequences
from recbole_llm.quick_start import build_model, prepare, resolve_prerequisites
from recbole_llm.utils import create_dataset, data_preparation, get_trainer

TINY_SASREC = TINY_ALLMREC["backbone_args"]
FAST = {k: v for k, v in TINY_ALLMREC.items() if k != "backbone_args"}


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One cache for all tests: the tiny backbone is trained once and reused (content-keyed)."""
    return str(tmp_path_factory.mktemp("allmrec_cache"))


def _setup(shared_cache, model="ALLMRec", **overrides):
    settings = {**FAST, "backbone_args": TINY_SASREC, "cache_dir": shared_cache, **overrides}
    config = Config(model=model, config_file_list=[ML_TINY_YAML], config_dict=tiny_config(**settings))
    config["cache_dir"] = shared_cache
    dataset, train_data, valid_data, test_data = prepare(config)
    model_obj = build_model(config, train_data)
    trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model_obj)
    return config, model_obj, trainer, train_data, test_data


def test_cached_scoring_equals_full_forward():
    llm, tokenizer = load_causal_lm("tiny-random-llama", dtype="float32")
    embed = llm.get_input_embeddings()
    torch.manual_seed(0)
    prompt = embed(torch.tensor(tokenizer("pick one:").input_ids))
    prompt = prompt + 0.1 * torch.randn_like(prompt)  # soft tokens are arbitrary vectors
    continuations = [tokenizer(t).input_ids for t in (' "Heat"', ' "A much longer title"', "x")]
    cached = score_continuations(llm, prompt, continuations, batch_size=2)
    for score, ids in zip(cached, continuations):
        full = torch.cat([prompt, embed(torch.tensor(ids))]).unsqueeze(0)
        logp = F.log_softmax(llm(inputs_embeds=full).logits[0].float(), -1)
        expected = sum(logp[len(prompt) - 1 + i, t] for i, t in enumerate(ids))
        assert score.item() == pytest.approx(expected.item(), abs=1e-4)
    mean = score_continuations(llm, prompt, continuations, reduction="mean")
    assert mean[1].item() == pytest.approx(cached[1].item() / len(continuations[1]), abs=1e-4)
    # the training loss is the mean negative log-likelihood of the target tokens
    loss = target_token_loss(llm, [prompt, prompt[:3]], [continuations[0], continuations[1]])
    short = score_continuations(llm, prompt[:3], [continuations[1]])
    expected = -(cached[0] + short[0]) / (len(continuations[0]) + len(continuations[1]))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-4)


def test_one_pass_branch_scoring_equals_cached_scoring_for_several_prompts():
    llm, tokenizer = load_causal_lm("tiny-random-llama", dtype="float32")
    embed = llm.get_input_embeddings()
    torch.manual_seed(0)
    prompts = [(embed(torch.randint(5, 200, (n,))) + 0.05 * torch.randn(n, 32)).detach() for n in (30, 41, 23)]
    branches = [[torch.randint(5, 200, (int(k),)).tolist() for k in torch.randint(1, 8, (m,))] for m in (5, 7, 1)]
    batched = score_branches(llm, prompts, branches)  # three prompts of different lengths in one batch
    for prompt, continuations, scores in zip(prompts, branches, batched):
        cached = score_continuations(llm, prompt, continuations, batch_size=3)
        assert torch.allclose(scores, cached, atol=1e-4)
        mean = score_branches(llm, [prompt], [continuations], reduction="mean")[0]
        assert torch.allclose(mean, cached / torch.tensor([len(c) for c in continuations]), atol=1e-4)
    # with gradients: the target branch's mean negative log-likelihood is the training loss
    prompt = prompts[0].clone().requires_grad_(True)
    per_token = branch_log_likelihoods(llm, [prompt], [branches[0]])[0]
    loss = -per_token[2].mean()
    assert loss.item() == pytest.approx(target_token_loss(llm, [prompt], [branches[0][2]]).item(), abs=1e-4)
    loss.backward()
    assert prompt.grad.abs().sum() > 0


def test_choice_scores_are_generation_constrained_to_the_candidates():
    llm, _ = load_causal_lm("tiny-random-llama", dtype="float32")
    embed = llm.get_input_embeddings()
    torch.manual_seed(0)
    prompts = [(embed(torch.randint(5, 200, (n,))) + 0.05 * torch.randn(n, 32)).detach() for n in (12, 20)]
    candidates = [[[5, 6, 7, 2], [5, 6, 8, 2], [5, 9, 2], [10, 11, 12, 2]], [[40, 2], [41, 42, 2]]]
    scores = score_branches(llm, prompts, candidates, reduction="choice")
    for prompt, titles, got in zip(prompts, candidates, scores):
        assert got.logsumexp(0).item() == pytest.approx(0.0, abs=1e-5), "a distribution over the candidates"
        for title, score in zip(titles, got):  # by hand: each token among the tokens the trie allows
            expected = 0.0
            for k, token in enumerate(title):
                allowed = sorted({t[k] for t in titles if len(t) > k and t[:k] == title[:k]})
                with torch.no_grad():
                    full = torch.cat([prompt, embed(torch.tensor(title[:k], dtype=torch.long))])
                    logits = llm(inputs_embeds=full.unsqueeze(0)).logits[0, -1].float()
                expected += (logits[token] - logits[allowed].logsumexp(0)).item()
            assert score.item() == pytest.approx(expected, abs=1e-4)
    assert scores[0][3].item() == pytest.approx(
        (score_branches(llm, prompts[:1], [[[5], [10]]])[0].log_softmax(0)[1]).item(), abs=1e-4), \
        "a title whose first token is its own: only that token counts"


def test_fit_sequences_keeps_the_most_recent_items():
    seq = torch.tensor([[1, 2, 3, 4, 0], [5, 6, 0, 0, 0]])
    out, lengths = fit_sequences(seq, torch.tensor([4, 2]), 3)
    assert out.tolist() == [[2, 3, 4], [5, 6, 0]] and lengths.tolist() == [3, 2]


def test_tiny_allmrec_trains_both_stages_with_decreasing_losses(shared_cache):
    config, model, trainer, train_data, _ = _setup(
        shared_cache, stage1_epochs=4, stage2_epochs=4, stage1_lr=0.01, stage2_lr=0.01, stage2_max_samples=4,
        sbert_finetune="last")
    trainer.fit(train_data, saved=True)
    stage1 = [losses["loss"] for stage, _, losses in trainer.epoch_losses if stage == 1]
    stage2 = [losses["loss"] for stage, _, losses in trainer.epoch_losses if stage == 2]
    assert len(stage1) == 4 and len(stage2) == 4
    assert stage1[-1] < stage1[0] and stage2[-1] < stage2[0]
    assert set(trainer.stage_times) == {1, 2}


def test_position_only_scorer_gets_chance_hit_at_1(shared_cache, monkeypatch):
    config, model, trainer, _, test_data = _setup(shared_cache, eval_max_users=None)

    def by_position(llm, prompts, continuations, *args, **kwargs):  # first shown candidate wins
        return [-torch.arange(len(c), dtype=torch.float) for c in continuations]

    monkeypatch.setattr(allmrec_module, "score_branches", by_position)
    result = trainer.evaluate(test_data, load_best_model=False)
    users = len(set(test_data._dataset.inter_feat["user_id"].tolist()))
    assert users >= 40
    assert result["hit@1"] <= 0.2  # chance is 1/20; unshuffled, the positive (first row) would always win
    # the seeded order itself: the positive (row 0) is shown first for ~1/20 of the users
    first = sum(int(model.candidate_order(user, 20)[0] == 0) for user in range(4000)) / 4000
    assert abs(first - 0.05) < 0.015
    assert torch.equal(model.candidate_order(7, 20), model.candidate_order(7, 20))


def test_choice_scores_sum_to_one_per_user_and_need_the_branch_scorer(shared_cache):
    _, model, _, _, test_data = _setup(shared_cache, score_reduction="choice")
    batch = next(iter(test_data))[0].to(model.device)
    scores = model.predict(batch)
    checked = 0
    for user in batch["user_id"].unique():
        rows = batch["user_id"] == user
        titles = {tuple(model.title_token_ids(int(i))) for i in batch["item_id"][rows]}
        if len(titles) == int(rows.sum()):  # distinct titles: a distribution over the candidates
            assert scores[rows].logsumexp(0).item() == pytest.approx(0.0, abs=1e-4)
            checked += 1
    assert checked > 0
    with pytest.raises(ValueError, match="score_method: branches"):
        _setup(shared_cache, score_reduction="choice", score_method="kv_cache")


def test_score_methods_agree_inside_the_model(shared_cache):
    config, model, _, _, test_data = _setup(shared_cache)
    batch = next(iter(test_data))[0].to(model.device)
    branches = model.predict(batch)
    model.score_method, model.score_users_per_pass = "branches", 3
    assert torch.allclose(model.predict(batch), branches, atol=1e-4)
    model.score_method = "kv_cache"
    assert torch.allclose(model.predict(batch), branches, atol=1e-4)


@pytest.mark.parametrize("calibration", ["none", "title_prior", "prompt_prior"])
def test_listwise_stage2_loss_equals_a_hand_computation(shared_cache, calibration):
    config, model, _, train_data, _ = _setup(shared_cache, stage2_objective="listwise", num_candidates=4,
                                             score_calibration=calibration)
    model.stage = 2
    batch = train_data._dataset.inter_feat[torch.arange(3)].to(model.device)
    loss = model.calculate_loss(batch, torch.Generator().manual_seed(5))
    loss.backward()
    assert model.item_proj[0].weight.grad.abs().sum() > 0 and model.user_proj[0].weight.grad.abs().sum() > 0
    # by hand, with the same draws: log-softmax of the candidates' title log-likelihoods, each title
    # scored alone after the prompt through the KV-cache path
    generator = torch.Generator().manual_seed(5)
    users, targets = batch["user_id"], batch["item_id"]
    negatives = model.sample_negatives(users, 3, generator, targets.unsqueeze(1).tolist())
    vectors = model._user_vectors(batch)
    expected = []
    with torch.no_grad():
        for row in range(3):
            candidates = torch.cat([targets[row:row + 1], negatives[row]])
            candidates = candidates[torch.randperm(4, generator=generator)]
            prompt = model.prompt_embeddings(vectors[row], model.history(batch, row), candidates)
            scores = score_continuations(model.llm, prompt, [model.title_token_ids(int(i)) for i in candidates])
            if calibration == "title_prior":  # each title's score after the answer cue alone
                cue = model.llm.get_input_embeddings()(torch.tensor(model._text_ids(allmrec_module.ANSWER_CUE), device=model.device))
                scores = scores - score_continuations(model.llm, cue, [model.title_token_ids(int(i)) for i in candidates])
            if calibration == "prompt_prior":  # the same prompt without soft tokens
                bare = model.prompt_embeddings(None, model.history(batch, row), candidates, tokens=(None, None, None))
                scores = scores - score_continuations(model.llm, bare, [model.title_token_ids(int(i)) for i in candidates])
            target = int((candidates == targets[row]).nonzero()[0, 0])
            expected.append(-(scores[target] - scores.logsumexp(0)))
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), abs=1e-4)


def test_checkpoint_holds_only_trainable_weights_and_round_trips(shared_cache):
    config, model, trainer, train_data, test_data = _setup(shared_cache, stage1_epochs=1, stage2_lr=0.05)
    trainer.fit(train_data, saved=True)
    state = load_checkpoint(trainer.saved_model_file)["state_dict"]
    assert not any(k.startswith(("llm.", "backbone.")) for k in state)
    assert any(k.startswith("user_proj.") for k in state) and any(k.startswith("item_encoder.") for k in state)
    batch = next(iter(test_data))[0].to(model.device)
    before = model.predict(batch)
    _, fresh, fresh_trainer, _, _ = _setup(shared_cache, stage1_epochs=1, stage2_lr=0.05)
    assert not torch.allclose(fresh.predict(batch), before)
    fresh_trainer.resume_checkpoint(trainer.saved_model_file)
    assert torch.allclose(fresh.predict(batch), before)
    assert fresh_trainer.start_epoch == len(fresh_trainer.plan)


def _copy_dataset(tmp_path, name):
    folder = tmp_path / "data" / name
    folder.mkdir(parents=True)
    for suffix in ("inter", "item", "user"):
        shutil.copy(DATA_DIR / "ml-tiny" / f"ml-tiny.{suffix}", folder / f"{name}.{suffix}")
    return str(tmp_path / "data")


def test_backbone_from_another_dataset_is_refused(shared_cache, tmp_path):
    other_data = _copy_dataset(tmp_path, "ml-other")
    bpr = Config(model="BPR", config_file_list=[ML_TINY_YAML],
                 config_dict=tiny_config(dataset="ml-other", data_path=other_data))
    _, train_data, valid_data, _ = prepare(bpr)
    backbone = build_model(bpr, train_data)
    trainer = get_trainer(bpr["MODEL_TYPE"], "BPR")(bpr, backbone)
    trainer.fit(train_data, valid_data, saved=True)
    with pytest.raises(ValueError, match=r"ml-other.*ml-tiny"):
        _setup(shared_cache, backbone_checkpoint=trainer.saved_model_file)


def test_interrupted_backbone_training_is_not_reused(tmp_path, monkeypatch):
    saved = CheckpointSafeMixin._save_checkpoint

    def save_then_die(self, *args, **kwargs):
        saved(self, *args, **kwargs)
        raise KeyboardInterrupt  # killed right after the first best epoch was written

    config = Config(model="ALLMRec", config_file_list=[ML_TINY_YAML],
                    config_dict=tiny_config(**FAST, backbone_args={**TINY_SASREC, "epochs": 2},
                                            cache_dir=str(tmp_path / "cache")))
    monkeypatch.setattr(CheckpointSafeMixin, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        resolve_prerequisites(config)
    leftovers = list((tmp_path / "cache" / "allmrec-backbones").iterdir())
    assert [p.suffix for p in leftovers] == [".training"]  # nothing under the name a rerun reuses
    monkeypatch.setattr(CheckpointSafeMixin, "_save_checkpoint", saved)
    resolve_prerequisites(config)
    path = config["backbone_checkpoint"]
    assert path.endswith(".pth") and load_checkpoint(path)["config"]["model"] == "SASRec"


def test_the_model_only_loads_its_backbone_the_quick_start_trains_it(shared_cache):
    config = Config(model="ALLMRec", config_file_list=[ML_TINY_YAML],
                    config_dict=tiny_config(**FAST, backbone_args=TINY_SASREC, cache_dir=shared_cache))
    assert config["backbone_checkpoint"] is None
    data = create_dataset(config)
    train_data = data_preparation(config, data)[0]
    with pytest.raises(ValueError, match="backbone_checkpoint is not set.*resolve_prerequisites"):
        build_model(config, train_data)
    resolve_prerequisites(config)
    assert config["backbone_checkpoint"].endswith(".pth")
    assert build_model(config, train_data).backbone is not None
    no_args = Config(model="ALLMRec", config_file_list=[ML_TINY_YAML], config_dict=tiny_config(**FAST, backbone_args=None))
    with pytest.raises(ValueError, match="backbone_checkpoint to a RecBole checkpoint.*or backbone_args"):
        resolve_prerequisites(no_args)


def test_general_backbone_gives_user_token(shared_cache):
    bpr = Config(model="BPR", config_file_list=[ML_TINY_YAML], config_dict=tiny_config())
    _, train_data, valid_data, _ = prepare(bpr)
    trainer = get_trainer(bpr["MODEL_TYPE"], "BPR")(bpr, build_model(bpr, train_data))
    trainer.fit(train_data, valid_data, saved=True)
    _, model, _, _, test_data = _setup(shared_cache, backbone_checkpoint=trainer.saved_model_file)
    assert not model.backbone.sequential
    scores = model.predict(next(iter(test_data))[0].to(model.device))
    assert torch.isfinite(scores).all()


def test_tallrec_trains_lora_weights_only(shared_cache):
    config, model, trainer, train_data, test_data = _setup(shared_cache, model="TALLRec", stage2_max_samples=2)
    assert model.backbone is None and trainer.stages == [2]
    lora_before = {k: v.cpu().clone() for k, v in model.state_dict().items() if "lora_B" in k}  # checkpoints load on the CPU
    assert lora_before
    trainer.fit(train_data, saved=True)
    state = load_checkpoint(trainer.saved_model_file)["state_dict"]
    assert all("lora_" in k for k in state if k.startswith("llm."))
    assert any(not torch.equal(state[k], v) for k, v in lora_before.items())
    assert torch.isfinite(model.predict(next(iter(test_data))[0].to(model.device))).all()


def test_conditioning_options_do_what_they_claim(shared_cache):
    _, model, _, _, test_data = _setup(shared_cache, soft_token_norm="word", latent_norm="standardise",
                                       item_embedding_source="text")
    batch = next(iter(test_data))[0].to(model.device)
    history, candidates = model.history(batch, 0), batch["item_id"][:5]
    vector = model._user_vectors(batch)[0]
    with torch.no_grad():
        user, history_tokens, candidate_tokens = model.soft_tokens(vector, history, candidates)
        # every soft token has the mean norm of the LLM's word embeddings
        for tokens in (user.unsqueeze(0), history_tokens, candidate_tokens):
            torch.testing.assert_close(tokens.norm(dim=-1), torch.full((len(tokens),), model.word_norm, device=tokens.device), rtol=1e-4, atol=1e-4)
        # standardised latents: mean 0 and std 1 per dimension over all items
        latents = model.joint_item_embeddings(torch.arange(1, model.n_items, device=model.device))
        torch.testing.assert_close(latents.mean(0), torch.zeros_like(latents[0]), atol=1e-4, rtol=0)
        torch.testing.assert_close(latents.std(0), torch.ones_like(latents[0]), atol=1e-4, rtol=0)
    _, plain, _, _, _ = _setup(shared_cache, item_embedding_source="text")
    with torch.no_grad():
        raw = plain.joint_item_embeddings(torch.arange(1, plain.n_items))
        assert raw.std(0).mean() < 0.5  # sigmoid latents: what standardising changes
        user, _, _ = plain.soft_tokens(vector, history, candidates)
        assert abs(user.norm().item() - plain.word_norm) > 1e-2


def test_cold_items_use_their_backbone_embedding_in_training_with_inference_text_tokens(shared_cache):
    _, model, _, _, _ = _setup(shared_cache, cold_item_text_tokens="inference")
    cold = torch.nonzero(~model.item_warm[1:])[:3, 0] + 1
    assert len(cold) > 0
    with torch.no_grad():
        e = model.item_encoder(model.backbone.item_embeddings(cold))
        q = model.text_encoder(model.item_text_emb[cold])
        model.train()
        torch.testing.assert_close(model.joint_item_embeddings(cold), e)
        model.eval()
        torch.testing.assert_close(model.joint_item_embeddings(cold), q)


@pytest.mark.parametrize("position", ["after", "before"])
def test_item_token_position(shared_cache, position):
    _, model, _, _, test_data = _setup(shared_cache, item_token_position=position, use_user_token=False)
    batch = next(iter(test_data))[0].to(model.device)
    history, candidates = model.history(batch, 0), batch["item_id"][:3]
    hidden = model.llm.config.hidden_size
    marks = torch.arange(1, 4, device=model.device).float().unsqueeze(1).repeat(1, hidden) * 1000  # unmistakable rows
    with torch.no_grad():
        prompt = model.prompt_embeddings(None, history, candidates, tokens=(None, None, marks))
        embed = model.llm.get_input_embeddings()
        for k, item in enumerate(candidates.tolist()):
            row = int((prompt[:, 0] == marks[k, 0]).nonzero()[0, 0])
            title = embed(torch.tensor(model._text_ids(f' "{model.titles[item]}"'), device=model.device))
            if position == "before":
                torch.testing.assert_close(prompt[row + 1], title[0])
            else:
                torch.testing.assert_close(prompt[row - 1], title[-1])


def test_mlp_llm_feeds_backbone_embeddings_to_the_item_projection_and_trains_stage_2_only(shared_cache):
    config, model, trainer, train_data, _ = _setup(shared_cache, item_embedding_source="backbone", stages=[2])
    assert model.item_proj[0].in_features == model.backbone.item_dim
    items = torch.arange(1, 6, device=model.device)
    torch.testing.assert_close(model.joint_item_embeddings(items), model.backbone.item_embeddings(items))
    before = model.item_encoder[0].weight.clone()
    trainer.fit(train_data, saved=False)
    assert trainer.epoch_losses and {stage for stage, _, _ in trainer.epoch_losses} == {2}
    assert torch.equal(model.item_encoder[0].weight, before)  # stage 1 never ran


def test_generate_answers_a_question_about_the_user_with_the_soft_tokens_in_the_prompt(shared_cache):
    _, model, _, _, test_data = _setup(shared_cache)
    model.eval()
    batch = next(iter(test_data))[0][torch.arange(2)].to(model.device)
    answers = model.generate(batch, "Which genres does this user like?", max_new_tokens=5)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert answers == model.generate(batch, "Which genres does this user like?", max_new_tokens=5)  # greedy
    prompt = model.prompt_embeddings(model._user_vectors(batch)[0], model.history(batch, 0), batch["item_id"][:0],
                                     question="Which genres does this user like?")
    question_ids = model._text_ids(" in the previous. Which genres does this user like?")
    torch.testing.assert_close(prompt[-len(question_ids):], model.llm.get_input_embeddings()(torch.tensor(question_ids, device=model.device)))
    # the control: the same prompt without any soft token (what LLM-Only answers)
    prompts, generate = [], model.llm.generate
    model.llm.generate = lambda **kwargs: prompts.append(kwargs["inputs_embeds"][0]) or generate(**kwargs)
    for soft_tokens in (True, False):
        model.generate(batch[torch.arange(1)], "Which genres does this user like?", max_new_tokens=2,
                       soft_tokens=soft_tokens)
    history = model.history(batch, 0)
    user_part = 1 + len(model._text_ids(" is a user representation."))  # the user token and its words
    assert len(prompts[0]) == len(prompts[1]) + user_part + len(history)  # and one token per title
    text_only = model.prompt_embeddings(None, history, history[:0], tokens=(None, None, None),
                                        question="Which genres does this user like?")
    torch.testing.assert_close(prompts[1], text_only)


def test_interrupted_stage_two_resumes_to_the_same_model(shared_cache):
    settings = dict(stage1_epochs=1, stage2_epochs=2, stage2_lr=0.05)
    _, model, trainer, train_data, test_data = _setup(shared_cache, **settings)
    trainer.fit(train_data, saved=True)
    batch = next(iter(test_data))[0].to(model.device)
    uninterrupted = model.predict(batch)

    _, _, killed, _, _ = _setup(shared_cache, **settings)
    save = killed._save_checkpoint

    def save_then_die(epoch, *args, **kwargs):
        save(epoch, *args, **kwargs)
        if epoch == 1:  # global epoch 1: the first stage-2 epoch
            raise KeyboardInterrupt

    killed._save_checkpoint = save_then_die
    with pytest.raises(KeyboardInterrupt):
        killed.fit(train_data, saved=True)
    _, resumed_model, resumed, _, _ = _setup(shared_cache, **settings)
    resumed.resume_checkpoint(killed.saved_model_file)
    assert resumed.start_epoch == 2
    resumed.fit(train_data, saved=True)
    assert [stage for stage, _, _ in resumed.epoch_losses] == [2]  # only the missing epoch ran
    torch.testing.assert_close(resumed_model.predict(batch), uninterrupted)


def test_stage_two_learning_curve_leaves_the_training_untouched(shared_cache):
    settings = dict(stage1_epochs=1, stage2_max_samples=4, stage2_batch_size=2, stage2_lr=0.05)
    _, plain_model, plain, train_data, _ = _setup(shared_cache, **settings)
    plain.fit(train_data, saved=False)
    config, model, trainer, _, _ = _setup(shared_cache, stage2_eval_every=1, stage2_eval_users=3, **settings)
    valid_data = prepare(config)[2]
    trainer.fit(train_data, valid_data, saved=False)
    curve = trainer.learning_curve
    assert [point["stage2_samples"] for point in curve] == [0, 2, 4], "before stage 2, then every batch"
    assert all(0 <= point["hit@1"] <= 1 and point["users"] == 3 for point in curve) and "train_loss" in curve[1] and "train_loss" not in curve[0]
    for name, weights in plain_model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], weights, msg=name)


def test_candidate_score_token_carries_the_backbones_ranking(shared_cache):
    _, model, trainer, train_data, test_data = _setup(shared_cache, candidate_score_token=True, use_user_token=False,
                                                      stage2_objective="listwise", stage1_epochs=1)
    batch = next(iter(test_data))[0].to(model.device)
    history, candidates = model.history(batch, 0), batch["item_id"][:5]
    vector = model._user_vectors(batch)[0]
    z = model.candidate_scores(vector, candidates)
    raw = model.backbone.item_embeddings(candidates) @ vector
    assert torch.equal(z.argsort(), raw.argsort()) and abs(z.mean()) < 1e-5
    with torch.no_grad():
        _, _, tokens = model.soft_tokens(vector, history, candidates)
        plain = model.item_proj(model.joint_item_embeddings(candidates))
        torch.testing.assert_close(tokens - plain, model.score_proj(z.unsqueeze(-1)))
    assert any(p is model.score_proj.weight for p in trainer._stage_parameters(2))
    trainer.fit(train_data, saved=False)
    assert torch.isfinite(model.predict(batch)).all()


def test_score_token_alone_follows_each_title_without_soft_item_tokens(shared_cache):
    # the score oracle's prompt inside ALLMRec: no user or item tokens, one score token per candidate
    settings = dict(use_user_token=False, use_item_tokens=False, stage2_objective="listwise", stages=[2],
                    stage2_max_samples=4, stage2_batch_size=2)
    _, model, trainer, train_data, test_data = _setup(shared_cache, candidate_score_token=True,
                                                      score_token_layout="separate", **settings)
    _, plain, *_ = _setup(shared_cache, **settings)
    assert plain.backbone is None and model.backbone is not None, "the score token alone needs the backbone"
    batch = next(iter(test_data))[0].to(model.device)
    history, candidates = model.history(batch, 0), batch["item_id"][:5]
    vector = model._user_vectors(batch)[0]
    z = model.candidate_scores(vector, candidates)
    with torch.no_grad():
        user, history_tokens, tokens = model.soft_tokens(vector, history, candidates)
        assert user is None and history_tokens is None
        torch.testing.assert_close(tokens, model.score_proj.offset + z.unsqueeze(-1) * model.score_proj.slope)
        prompt = model.prompt_embeddings(vector, history, candidates)
        assert len(prompt) == len(plain.prompt_embeddings(None, history, candidates)) + len(candidates)
    assert {id(p) for p in trainer._stage_parameters(2)} == {id(p) for p in model.score_proj.parameters()}
    before = model.score_proj.slope.detach().clone()
    trainer.fit(train_data, saved=False, verbose=False)
    assert not torch.equal(before, model.score_proj.slope), "stage 2 trains the score token"
    assert torch.isfinite(model.predict(batch)).all()
    with pytest.raises(ValueError, match="stages: \\[2\\]"):
        _setup(shared_cache, candidate_score_token=True, use_user_token=False, use_item_tokens=False)


def test_separate_score_token_follows_each_candidates_item_token(shared_cache):
    _, model, trainer, train_data, test_data = _setup(shared_cache, candidate_score_token=True, use_user_token=False,
                                                      score_token_layout="separate", stage2_objective="listwise",
                                                      stage1_epochs=1)
    batch = next(iter(test_data))[0].to(model.device)
    history, candidates = model.history(batch, 0), batch["item_id"][:5]
    vector = model._user_vectors(batch)[0]
    z = model.candidate_scores(vector, candidates)
    words = model.llm.get_input_embeddings().weight
    with torch.no_grad():
        _, _, tokens = model.soft_tokens(vector, history, candidates)
        torch.testing.assert_close(tokens[:, 0], model.item_proj(model.joint_item_embeddings(candidates)))
        torch.testing.assert_close(tokens[:, 1], (model.score_proj.offset + z.unsqueeze(-1) * model.score_proj.slope) * model.score_proj.scale)
        # a and b start at a word's scale, so the score token is not drowned by its neighbours
        word_norm = words.norm(dim=-1).mean()
        assert 0.5 < model.score_proj.offset.norm() / word_norm < 2
        prompt = model.prompt_embeddings(vector, history, candidates)
    model.score_token_layout = "add"
    model.score_proj_separate, model.score_proj = model.score_proj, torch.nn.Linear(1, words.shape[1]).to(model.device)
    with torch.no_grad():
        assert len(prompt) == len(model.prompt_embeddings(vector, history, candidates)) + len(candidates)
    model.score_token_layout, model.score_proj = "separate", model.score_proj_separate
    assert any(p is model.score_proj.slope for p in trainer._stage_parameters(2))
    trainer.fit(train_data, saved=False)
    assert torch.isfinite(model.predict(batch)).all()


def test_frozen_projection_samples_hold_the_projections_while_the_score_token_learns(shared_cache):
    def weights(module):
        return [p.detach().clone() for p in module.parameters()]

    settings = dict(candidate_score_token=True, stage2_objective="listwise", stage1_epochs=1,
                    stage2_epochs=2, stage2_max_samples=4, stage2_batch_size=2, stage2_lr=0.05)
    trained = {}
    for frozen in (0, 6, 100):  # off; the first 6 of 8 samples (three of four batches); throughout
        _, model, trainer, train_data, _ = _setup(shared_cache, stage2_frozen_projection_samples=frozen, **settings)
        trainer.fit(train_data, saved=False, verbose=False)
        before = {name: weights(getattr(model, name)) for name in ("user_proj", "item_proj", "score_proj")}
        trained[frozen] = model, before
    initial = {name: weights(getattr(_setup(shared_cache, **settings)[1], name))
               for name in ("user_proj", "item_proj", "score_proj")}

    def moved(frozen, name):
        return any(not torch.equal(a, b) for a, b in zip(trained[frozen][1][name], initial[name]))

    assert not moved(100, "user_proj") and not moved(100, "item_proj") and moved(100, "score_proj")
    assert moved(6, "item_proj") and moved(0, "item_proj"), "the fourth batch (samples 6-7) trains them"
    late = [p for p in trained[6][0].item_proj.parameters()]
    assert all(p.requires_grad for p in late), "frozen only while training, not in the saved state"
    # one batch of training moved them less than four did
    distance = {f: sum((a - b).norm() for a, b in zip(trained[f][1]["item_proj"], initial["item_proj"])) for f in (0, 6)}
    assert distance[6] < distance[0]


def test_curriculum_shows_fewer_candidates_for_its_first_samples_then_num_candidates(shared_cache, monkeypatch):
    settings = dict(stage2_objective="listwise", num_candidates=4, stage1_epochs=1, stage2_epochs=2,
                    stage2_max_samples=4, stage2_batch_size=2, stage2_curriculum_samples=6,
                    stage2_curriculum_candidates=2)
    _, model, trainer, train_data, _ = _setup(shared_cache, **settings)
    shown = []
    negatives = model.sample_negatives

    def counting(users, count, generator, extra_exclude=()):
        if model.stage == 2:
            shown.append(count + 1)
        return negatives(users, count, generator, extra_exclude)

    monkeypatch.setattr(model, "sample_negatives", counting)
    trainer.fit(train_data, saved=False, verbose=False)
    assert shown == [2, 2, 2, 4], "samples 0-5 (three batches across both epochs) on 2 candidates, then 4"
    assert model.train_candidates == 4, "inference and later fits start from num_candidates"
    with pytest.raises(ValueError, match="stage2_curriculum_candidates"):
        _setup(shared_cache, **{**settings, "stage2_curriculum_candidates": 5})


def _calibrated_and_raw(shared_cache, calibration):
    """A model built with ``score_calibration: calibration``, a test batch, and its predictions
    with and without the calibration."""
    _, model, _, _, test_data = _setup(shared_cache, score_calibration=calibration)
    batch = next(iter(test_data))[0].to(model.device)
    calibrated = model.predict(batch)
    model.score_calibration = "none"
    return model, batch, calibrated, model.predict(batch)


def test_title_prior_calibration_subtracts_each_titles_score_after_the_answer_cue_alone(shared_cache):
    model, batch, calibrated, raw = _calibrated_and_raw(shared_cache, "title_prior")
    cue = model.llm.get_input_embeddings()(torch.tensor(model._text_ids(allmrec_module.ANSWER_CUE), device=model.device))
    items = batch["item_id"]
    with torch.no_grad():
        by_hand = score_continuations(model.llm, cue, [model.title_token_ids(int(i)) for i in items])
    assert torch.allclose(calibrated, raw - by_hand, atol=1e-4)
    assert model.title_prior()[0] == 0 and len(model.title_prior()) == model.n_items


def test_prompt_prior_calibration_subtracts_the_same_prompts_scores_without_soft_tokens(shared_cache):
    model, batch, calibrated, raw = _calibrated_and_raw(shared_cache, "prompt_prior")
    # by hand: each user's candidates in the order shown, scored after the prompt without soft tokens
    users, items = batch["user_id"], batch["item_id"]
    by_hand = torch.empty(len(items), device=model.device)
    with torch.no_grad():
        for user in users.unique().tolist():
            rows = (users == user).nonzero(as_tuple=True)[0]
            order = model.candidate_order(user, len(rows))
            shown = items[rows][order]
            bare = model.prompt_embeddings(None, model.history(batch, int(rows[0])), shown, tokens=(None, None, None))
            by_hand[rows[order]] = score_continuations(model.llm, bare, [model.title_token_ids(int(i)) for i in shown])
    assert not torch.allclose(by_hand, raw, atol=1e-3), "the soft tokens change the scores"
    assert torch.allclose(calibrated, raw - by_hand, atol=1e-4)
    with pytest.raises(ValueError, match="prompt_prior"):
        _setup(shared_cache, score_calibration="prompt_prior", use_user_token=False, use_item_tokens=False,
               stages=[])
