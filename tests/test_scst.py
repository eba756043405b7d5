"""SCST: the in-process CIDEr-D reward (against hand computation and pycocoevalcap's CiderScorer),
the loss mode of the tiny EVLGen models (``scst: true`` on evlgen_opt/evlgen_vicuna: decoding knobs,
re-scored log-probs, sign of the update, where gradients go), its config and its references file."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
from lavis.common.registry import registry
from lavis.models import load_model
from omegaconf import OmegaConf
from pycocoevalcap.cider.cider_scorer import CiderScorer

import lavis_evlgen  # noqa: F401  (registers the models)
from lavis_evlgen.common.cider_d import CiderD, tokenize
from lavis_evlgen.models import EVLGenConfig, EVLGenOPT, EVLGenVicuna
from lavis_evlgen.models.scst import (
    caption_token_mask,
    main as scst_references_cli,
    references_from_dataset,
    scst_objective,
)

# ---------------------------------------------------------------------- CIDEr-D

TOY = {"A": ["a cat"], "B": ["a dog"]}


def test_cider_d_hand_computed_toy():
    """Two images; idf(w) = log 2 - log df(w), so "a" (in both) weighs 0 and every other n-gram log 2."""
    cider = CiderD(TOY)
    assert cider.ref_len == pytest.approx(math.log(2))
    # Exact match of a 2-word caption: cosine 1 for unigrams and bigrams, no 3-/4-grams: 10 * (1 + 1) / 4.
    assert cider.score(["a cat"], [TOY["A"]])[0] == pytest.approx(5.0)
    # Only "a" is shared, and it weighs 0.
    assert cider.score(["a dog"], [TOY["A"]])[0] == pytest.approx(0.0)
    # "cat" twice: clipped to the reference's count -> unigram cosine 1/2 (1 without clipping);
    # bigrams {"a cat", "cat cat"} vs {"a cat"} -> 1/sqrt(2); one word longer -> exp(-1 / (2 * 6^2)).
    expected = 10 * (0.5 + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)
    assert cider.score(["a cat cat"], [TOY["A"]])[0] == pytest.approx(expected)
    # Mean over the references: 5 against "a cat", 0 against "a dog".
    assert cider.score(["a cat"], [["a cat", "a dog"]])[0] == pytest.approx(2.5)
    # Tokenised first: case and punctuation do not matter.
    assert cider.score(["A cat."], [TOY["A"]])[0] == pytest.approx(5.0)


def test_cider_d_exact_match_of_four_or_more_words_unique_to_its_image_is_ten():
    cider = CiderD({"x": ["the quick brown fox jumps"], "y": ["a lazy dog"]})
    assert cider.score(["the quick brown fox jumps"], [["the quick brown fox jumps"]])[0] == pytest.approx(10.0)


CORPUS = {
    1: ["a dog runs across the green grass", "a brown dog running on a lawn", "the dog is on the grass"],
    2: ["a red bus parked on a city street", "a double decker bus on the road"],
    3: ["two people riding horses on a beach", "riders on horseback along the shore", "two horses on the sand"],
    4: ["a plate of pasta with tomato sauce", "spaghetti and sauce on a white plate"],
    5: ["a man surfing a large wave", "a surfer riding a big ocean wave", "a man on a surfboard"],
    6: ["a cat sleeping on a red couch", "a cat on a sofa"],
}
CANDIDATES = {
    1: "a dog runs on the grass",
    2: "a bus bus bus on the street",  # repeated words: clipping
    3: "horses",  # one word: no bigrams
    4: "",  # empty
    5: "a man riding a wave on a surfboard in the ocean near the beach",  # long: length penalty
    6: "a cat on a red couch",
}


def _pycoco_scores(candidates, refs):
    """pycocoevalcap's CiderScorer (what Cider/score_captions run) on captions tokenised as CiderD does."""
    scorer = CiderScorer(n=4, sigma=6.0)
    for i in refs:
        scorer += (" ".join(tokenize(candidates[i])), [" ".join(tokenize(r)) for r in refs[i]])
    return scorer.compute_score()[1]


def test_cider_d_equals_pycocoevalcap_when_document_frequencies_come_from_the_same_refs():
    """pycocoevalcap's CIDEr already clips and applies the sigma-6 length penalty (it is CIDEr-D);
    it takes document frequencies and log(#images) from the references of the call. Given those
    references as its corpus, CiderD scores every candidate the same (including the empty and
    one-word ones, where pycocoevalcap's bigram-count length differs from the word count)."""
    ids = list(CORPUS)
    ours = CiderD(CORPUS).score([CANDIDATES[i] for i in ids], [CORPUS[i] for i in ids])
    np.testing.assert_allclose(ours, _pycoco_scores(CANDIDATES, CORPUS), rtol=1e-12, atol=1e-12)
    assert ours[ids.index(1)] > 1 and ours[ids.index(4)] == 0.0
    assert CiderD(CORPUS).corpus_score(CANDIDATES, CORPUS) == pytest.approx(_pycoco_scores(CANDIDATES, CORPUS).mean())


def test_cider_d_differs_from_pycocoevalcap_on_a_batch_when_its_corpus_is_larger():
    """The point of CiderD: a batch's scores use the corpus' document frequencies, not the batch's."""
    batch = [1, 2, 6]
    ours = CiderD(CORPUS).score([CANDIDATES[i] for i in batch], [CORPUS[i] for i in batch])
    per_batch = _pycoco_scores(CANDIDATES, {i: CORPUS[i] for i in batch})
    assert not np.allclose(ours, per_batch)
    np.testing.assert_allclose(
        CiderD({i: CORPUS[i] for i in batch}).score([CANDIDATES[i] for i in batch], [CORPUS[i] for i in batch]),
        per_batch, rtol=1e-12,
    )


def test_cider_d_scores_groups_and_caches_nothing_wrong():
    cider = CiderD(list(CORPUS.values()))  # an iterable of lists works as a corpus too
    group = ["a dog on the grass", "a dog", "a bus on the road", "a dog on the grass"]
    together = cider.score(group, [CORPUS[1]] * len(group))
    alone = [cider.score([c], [CORPUS[1]])[0] for c in group]
    np.testing.assert_allclose(together, alone)
    assert together[0] == together[3] and together[0] > together[2]


def test_cider_d_input_errors():
    cider = CiderD(TOY)
    with pytest.raises(ValueError, match="2 candidates but 1"):
        cider.score(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="candidate 0 .*non-empty list"):
        cider.score(["a cat"], [[]])
    with pytest.raises(ValueError, match="non-empty list"):
        cider.score(["a cat"], ["a cat"])
    with pytest.raises(TypeError, match="lists of captions"):
        CiderD(["a cat", "a dog"])
    with pytest.raises(ValueError, match="non-empty"):
        CiderD({})


@pytest.mark.parametrize("text, tokens", [
    ("A man's dog runs, quickly!", "a man 's dog runs quickly"),
    ("Don't park the double-decker bus.", "do n't park the double-decker bus"),
    ("It can't be 2.5 or 1,000 cats' toys", "it ca n't be 2.5 or 1,000 cats toys"),
    ("they're here; we've gone -- I'd go", "they 're here we 've gone i 'd go"),
    ("O'Brien's red/blue car (new)", "o'brien 's red/blue car new"),
    ("Two  red CIRCLES on the left.", "two red circles on the left"),
])
def test_tokenize(text, tokens):
    assert tokenize(text) == tokens.split()


@pytest.mark.skipif(shutil.which("java") is None, reason="PTBTokenizer needs Java")
def test_tokenize_agrees_with_ptb_tokenizer_on_captions():
    """Where caption_metrics' PTBTokenizer (Java) and the in-process tokenizer should agree."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions = [c for refs in CORPUS.values() for c in refs] + [
        "A man's dog runs, quickly!", "Don't park the double-decker bus.", "Two people riding horses; on a beach...",
        "It can't be 2.5 or 1,000 cats' toys", "The cat's \"toy\" is red/blue.", "they're here, we've gone, I'm ok",
        "A BLACK-and-white photo -- of a dog?", "Shapes: 3 red circles and a blue square, at the top left.",
    ]
    ptb = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    assert [tokenize(c) for c in captions] == [ptb[i][0].split() for i in range(len(captions))]


# ---------------------------------------------------------------------- the loss mode

REFS = {"0": ["a red circle on the left", "one red circle"], "1": ["two blue squares", "a pair of blue squares"]}


def images(n=2):
    return torch.randn(n, 3, 112, 112, generator=torch.Generator().manual_seed(0))


def samples(ids=(0, 1)):
    return {"image": images(len(ids)), "text_input": ["unused"] * len(ids), "image_id": torch.tensor(list(ids))}


def tiny_scst_cfg(cls, refs_path, **overrides):
    cfg = OmegaConf.load(cls.default_config_path("tiny")).model
    return OmegaConf.merge(cfg, {"scst": True, "scst_references": str(refs_path), "scst_group_size": 3,
                                 "scst_max_len": 6}, overrides)


@pytest.fixture(scope="module")
def refs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("scst") / "refs.json"
    path.write_text(json.dumps(REFS))
    return path


@pytest.fixture(scope="module")
def built(refs_file):
    torch.manual_seed(0)
    return EVLGenVicuna.from_config(tiny_scst_cfg(EVLGenVicuna, refs_file))


@pytest.fixture
def model(built, refs_file):
    """The module's model with its SCST knobs, references and weights as built (tests change them)."""
    state = {k: v.clone() for k, v in built.state_dict().items()}
    config = dict(built.config.__dict__)
    built.eval()
    yield built
    built.load_state_dict(state)
    built.config.__dict__.update(config)
    built.__dict__.pop("_scst_state", None)
    built.zero_grad(set_to_none=True)


def test_a_loss_mode_of_the_image_models_not_a_model_of_its_own(refs_file):
    """SCST is a config key of evlgen_opt/evlgen_vicuna: no separate arch names, the same parameters
    (checkpoints of either loss load into the other), the captioning loss in eval mode."""
    assert registry.get_model_class("evlgen_vicuna_scst") is None and registry.get_model_class("evlgen_opt_scst") is None
    torch.manual_seed(0)
    plain = load_model("evlgen_vicuna", "tiny")
    assert not plain.config.scst
    torch.manual_seed(0)
    scst = EVLGenVicuna.from_config(tiny_scst_cfg(EVLGenVicuna, refs_file))
    assert scst.config.scst and type(scst) is type(plain)
    assert scst.state_dict().keys() == plain.state_dict().keys()
    with torch.no_grad():  # eval mode: the model's own loss whatever scst says
        torch.testing.assert_close(scst.eval()(samples())["loss"], plain.eval()(samples())["loss"])


def test_forward_returns_the_scst_loss_in_training_and_the_lm_loss_in_eval(model):
    model.train()
    torch.manual_seed(0)
    out = model(samples())
    assert set(out) == {"loss", "loss_scst", "reward"} and out["loss"].requires_grad
    model.eval()
    with torch.no_grad():
        assert set(model(samples())) == {"loss", "loss_lm"}


def test_rescored_logprobs_are_the_logprobs_generate_sampled_from():
    """Teacher-forced re-scoring sees each token at the position generate saw it (left-padded
    prompts of different lengths, both LLM families), and masks what follows the stop token."""
    for cls in (EVLGenVicuna, EVLGenOPT):
        torch.manual_seed(0)
        m = cls.from_config(OmegaConf.merge(OmegaConf.load(cls.default_config_path("tiny")).model,
                                            {"scst_max_len": 8}))
        m.eval()
        prefix = m.encode_image(images())
        prompt_ids, prompt_mask = m._scst_prompt_tokens(["a photo of", "a"], prefix.device)
        embeds, attention_mask, _ = m._scst_inputs(prefix, prompt_ids, prompt_mask)
        torch.manual_seed(1)
        out = m.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, do_sample=True, top_k=0,
                             max_new_tokens=8, num_return_sequences=2, eos_token_id=m.stop_token_ids,
                             pad_token_id=m.tokenizer.pad_token_id, return_dict_in_generate=True, output_logits=True)
        ids = out.sequences
        mask = caption_token_mask(ids, m.stop_token_ids)
        expected = torch.stack(out.logits, 1).log_softmax(-1).gather(-1, ids[..., None])[..., 0] * mask
        with torch.no_grad():
            mean, per_token = m.scst_sequence_logprobs(prefix.repeat_interleave(2, 0), prompt_ids.repeat_interleave(2, 0),
                                                       prompt_mask.repeat_interleave(2, 0), ids, mask)
        torch.testing.assert_close(per_token, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(mean, expected.sum(1) / mask.sum(1))


def test_caption_token_mask_keeps_up_to_the_first_stop():
    ids = torch.tensor([[5, 6, 9, 7, 9], [5, 6, 7, 8, 4], [9, 9, 9, 9, 9]])
    expected = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(caption_token_mask(ids, [9, 11]), expected)


def test_objective_baseline_is_the_group_mean():
    logprobs = torch.tensor([-1.0, -2.0, -3.0, -1.0, -1.0, -1.0], requires_grad=True)
    rewards = torch.tensor([3.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    loss, advantage = scst_objective(logprobs, rewards, group_size=3)
    torch.testing.assert_close(advantage, torch.tensor([2.0, -1.0, -1.0, 0.0, 0.0, 0.0]))
    assert loss.item() == pytest.approx(-(2 * -1.0 - 1 * -2.0 - 1 * -3.0) / 6)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, -advantage / 6)  # descent raises above-mean captions


def _exact_match_refs(model, tmp_path, group_size=4):
    """A references file in which image 0's only reference is one of the captions the model samples
    for it (seed 0): that caption's CIDEr-D is 10 (exact match, >= 4 words, none in image 1's refs)."""
    model.config.scst_group_size = group_size
    torch.manual_seed(0)
    captions = model.scst_step(samples())["captions"][:group_size]
    best = max(range(group_size), key=lambda i: len(tokenize(captions[i])))
    assert len(tokenize(captions[best])) >= 4, captions
    path = tmp_path / "exact.json"
    path.write_text(json.dumps({"0": [captions[best]], "1": ["zzzz qqqq"]}))
    model.config.scst_references = str(path)
    return best, captions[best]


def test_reward_is_cider_d_and_an_above_mean_caption_gains_log_prob_after_one_sgd_step(model, tmp_path):
    best, caption = _exact_match_refs(model, tmp_path)
    torch.manual_seed(0)
    step = model.scst_step(samples())
    k = model.config.scst_group_size
    assert step["captions"][best] == caption
    rewards = step["rewards"]
    assert rewards[best].item() == pytest.approx(10.0)
    expected = CiderD({"0": [caption], "1": ["zzzz qqqq"]}).score(step["captions"], [[caption]] * k + [["zzzz qqqq"]] * k)
    np.testing.assert_allclose(rewards.numpy(), expected, rtol=1e-6)
    assert step["advantage"][best] == pytest.approx(10.0 - rewards[:k].mean().item(), rel=1e-5)
    assert step["advantage"][best] > 0 and step["loss"].requires_grad

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.1)
    opt.zero_grad()
    step["loss"].backward()
    opt.step()
    with torch.no_grad():
        prefix = model.encode_image(samples()["image"]).repeat_interleave(k, 0)
        after, _ = model.scst_sequence_logprobs(prefix, step["prompt_ids"].repeat_interleave(k, 0),
                                                step["prompt_mask"].repeat_interleave(k, 0),
                                                step["caption_ids"], step["caption_mask"])
    before = step["logprobs"].detach()
    assert after[best] > before[best] + 1e-4
    # and the objective improved: the advantage-weighted log-prob went up
    assert (step["advantage"] * after).sum() > (step["advantage"] * before).sum()


def test_gradients_reach_only_trainable_parts(model, tmp_path):
    model.train()  # before sampling the captions the references copy (dropout changes them)
    _exact_match_refs(model, tmp_path)
    torch.manual_seed(0)
    out = model(samples())
    assert out["reward"] > 0
    out["loss"].backward()
    for name in ("ln_vision", "vit_proj", "connector", "llm_proj"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0, name
    assert all(p.grad is None for p in model.llm.parameters())
    assert all(p.grad is None for p in model.visual_encoder.parameters())


def test_no_learning_signal_when_the_group_ties(model):
    torch.manual_seed(0)
    step = model.scst_step(samples())  # random tiny LLM: every caption scores 0 against REFS
    assert torch.all(step["rewards"] == 0) and step["loss"].item() == 0.0


@pytest.mark.parametrize("group_size", [2, 4])
def test_group_size_and_length_knobs(model, group_size):
    model.config.scst_group_size = group_size
    model.config.scst_max_len, model.config.scst_min_len = 5, 3
    torch.manual_seed(0)
    step = model.scst_step(samples())
    assert len(step["captions"]) == step["rewards"].numel() == step["logprobs"].numel() == 2 * group_size
    assert step["caption_ids"].shape[1] <= 5
    assert torch.all(step["caption_mask"].sum(1) >= 3)


def test_sampling_knobs_reach_generate(model):
    torch.manual_seed(0)
    varied = model.scst_step(samples([0]))["captions"]
    assert len(set(varied)) > 1  # sampling: a random tiny LLM gives different captions
    model.config.scst_top_k = 1  # top-k 1 is greedy: the whole group is one caption
    torch.manual_seed(0)
    assert len(set(model.scst_step(samples([0]))["captions"])) == 1
    model.config.scst_top_k, model.config.scst_top_p = 0, 1e-6  # so is a tiny nucleus
    torch.manual_seed(0)
    assert len(set(model.scst_step(samples([0]))["captions"])) == 1
    model.config.scst_top_p, model.config.scst_temperature = 1.0, 1e-4  # and a near-zero temperature
    torch.manual_seed(0)
    assert len(set(model.scst_step(samples([0]))["captions"])) == 1


def test_beam_decoding_gives_the_top_beams(model):
    model.config.scst_decoding = "beam"
    model.config.scst_group_size = 3
    torch.manual_seed(0)
    first = model.scst_step(samples())
    torch.manual_seed(1)
    again = model.scst_step(samples())
    assert first["captions"] == again["captions"]  # deterministic
    assert len(set(first["captions"][:3])) == 3  # three different beams per image
    expected = model.generate({"image": samples()["image"]}, num_beams=3, num_captions=3, max_length=6)
    assert first["captions"] == expected


def test_missing_reference_names_the_image_id(model):
    with pytest.raises(KeyError, match=r"no references for image_id '7' \(and 1 more in this batch\)"):
        model.scst_step(samples([0, 7, 8]))
    with pytest.raises(KeyError, match="image_id"):
        model.scst_step({"image": images(1), "text_input": ["x"]})
    model.config.scst_references = "/no/such/refs.json"
    with pytest.raises(FileNotFoundError, match="scst_references: no file /no/such/refs.json"):
        model.scst_step(samples())


def test_image_ids_as_list_of_str_or_int(model):
    torch.manual_seed(0)
    a = model.scst_step({**samples(), "image_id": ["0", "1"]})
    torch.manual_seed(0)
    b = model.scst_step({**samples(), "image_id": [0, 1]})
    assert a["captions"] == b["captions"]


def test_config_validation_names_the_key():
    assert EVLGenConfig().scst_group_size == 5 and EVLGenConfig().scst_decoding == "sample" and not EVLGenConfig().scst
    with pytest.raises(ValueError, match="scst_references"):
        EVLGenConfig.from_dict({"scst": True})
    with pytest.raises(ValueError, match="scst_decoding"):
        EVLGenConfig.from_dict({"scst_decoding": "greedy"})
    with pytest.raises(ValueError, match="scst_group_size"):
        EVLGenConfig.from_dict({"scst_group_size": 1})
    with pytest.raises(ValueError, match="scst_min_len"):
        EVLGenConfig.from_dict({"scst_min_len": 9, "scst_max_len": 5})
    with pytest.raises(ValueError, match="scst_top_p"):
        EVLGenConfig.from_dict({"scst_top_p": 0.0})
    with pytest.raises(KeyError, match="scst_groupsize"):
        EVLGenConfig.from_dict({"scst_groupsize": 3})
    with pytest.raises(ValueError, match="prefix_ablation"):  # the parent's checks still run
        EVLGenConfig.from_dict({"prefix_ablation": "blind"})
    assert EVLGenConfig.from_dict({"tome_r": [4, 1.0]}).tome_r == (4, 1.0)  # and its from_dict


# ---------------------------------------------------------------------- the references file

def test_references_from_dataset_use_the_dense_ids_samples_carry():
    class Dataset:  # LAVIS's CaptionDataset: image_id of a sample = img_ids[record's image_id]
        annotation = [{"image_id": "coco_9", "caption": "a"}, {"image_id": "coco_4", "caption": "b"},
                      {"image_id": "coco_9", "caption": "c"}]
        img_ids = {"coco_9": 0, "coco_4": 1}

    assert references_from_dataset(Dataset()) == {"0": ["a", "c"], "1": ["b"]}
    del Dataset.img_ids
    assert references_from_dataset(Dataset()) == {"coco_9": ["a", "c"], "coco_4": ["b"]}


def _references_of_a_shapes_config(tmp_path):
    """Runs the CLI on the tiny shapes config (8 train images, fraction 0.5); returns the config,
    its train dataset as LAVIS builds it, and the references file."""
    import argparse
    from pathlib import Path

    import lavis.tasks as tasks
    from lavis.common.config import Config

    config = str(Path(__file__).resolve().parents[1] / "projects/evlgen/tiny/caption.yaml")
    out = tmp_path / "refs.json"
    options = ["datasets.shapes_caption.build_info.num_train=8", "datasets.shapes_caption.build_info.fraction=0.5"]
    scst_references_cli(["--cfg-path", config, "--out", str(out), "--options", *options])
    cfg = Config(argparse.Namespace(cfg_path=config, options=options))
    return cfg, tasks.setup_task(cfg).build_datasets(cfg)["shapes_caption"]["train"], out


def test_references_cli_on_a_shapes_config(tmp_path):
    """The file written for a config keys every training sample's image_id, with fraction < 1
    (dense ids re-assigned after the subset) too."""
    _, train, out = _references_of_a_shapes_config(tmp_path)
    refs = json.loads(out.read_text())
    assert len(refs) == 4 and sum(map(len, refs.values())) == len(train)
    for i in range(len(train)):
        assert train.annotation[i]["caption"] in refs[str(train[i]["image_id"])]


def test_lavis_task_train_step_drives_the_scst_loss(model, tmp_path):
    """What LAVIS's runner does each step: collate dataset samples (image_id becomes a tensor) and
    call task.train_step(model, samples) -> model(samples)["loss"]."""
    import lavis.tasks as tasks

    cfg, train, refs = _references_of_a_shapes_config(tmp_path)
    model.config.scst_references = str(refs)
    batch = train.collater([train[i] for i in (0, 7, 19)])
    assert isinstance(batch["image_id"], torch.Tensor)
    model.train()
    torch.manual_seed(0)
    loss = tasks.setup_task(cfg).train_step(model, batch)
    assert loss.ndim == 0 and loss.requires_grad
    loss.backward()
    assert model.llm_proj.weight.grad is not None
