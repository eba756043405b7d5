"""Fidelity switches of the paper-row configs (README, "Paper scale") at tiny size: the LLM in train
mode, the authors' Vicuna text conventions, the config's repetition penalty."""
import torch
from omegaconf import OmegaConf

import lavis_evlgen.models
from lavis_evlgen.models.evlgen import EVLGen

IMAGES = torch.zeros(2, 3, 112, 112)


def _tiny_vicuna(**overrides):
    cfg = OmegaConf.load(lavis_evlgen.models.EVLGenVicuna.default_config_path("tiny")).model
    return EVLGen.from_config(OmegaConf.merge(cfg, overrides))


def _labels_of_one_step(model) -> torch.Tensor:
    seen = {}
    hook = model.llm.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs), with_kwargs=True)
    model.caption_loss(model.encode_image(IMAGES), {"text_input": ["a red square", "two blue circles on the left"]})
    hook.remove()
    return seen["labels"]


def test_llm_train_mode_turns_its_dropout_on_in_training_only():
    default, faithful = _tiny_vicuna(), _tiny_vicuna(llm_train_mode=True)
    assert not default.train().llm.training
    assert faithful.train().llm.training and not faithful.eval().llm.training
    assert not any(p.requires_grad for p in faithful.llm.parameters())


def test_vicuna_authors_convention_tokens_targets_and_stops():
    model = _tiny_vicuna(text_convention="vicuna_authors", repetition_penalty=1.5)
    tok = model.tokenizer
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("[PAD]", "</s>", "</s>")
    assert model.llm.get_input_embeddings().num_embeddings >= len(tok)
    assert model.stop_token_ids == [tok.eos_token_id]
    labels = _labels_of_one_step(model)
    num_prefix = model.encode_image(IMAGES).shape[1]
    text_labels = labels[:, num_prefix:]
    for row in text_labels:
        kept = row[row != -100].tolist()
        assert kept[-1] == tok.eos_token_id  # targets end with </s>
    assert (text_labels[:, 0] == -100).all()  # the BOS (first text token) is never a target

    default_labels = _labels_of_one_step(_tiny_vicuna())
    newline = model.tokenizer("\n", add_special_tokens=False).input_ids[-1]
    assert all(row[row != -100].tolist()[-1] == newline for row in default_labels[:, num_prefix:])

    seen = {}

    def fake_generate(**kwargs):
        seen.update(kwargs)
        return torch.full((2, 1), tok.eos_token_id)

    model.llm.generate = fake_generate
    model.generate({"image": IMAGES})
    assert seen["repetition_penalty"] == 1.5 and seen["eos_token_id"] == [tok.eos_token_id]
    model.generate({"image": IMAGES}, repetition_penalty=1.0)
    assert seen["repetition_penalty"] == 1.0
