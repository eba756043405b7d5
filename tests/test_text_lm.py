"""The mini world's in-house text LM: its corpus uses train text only, and pretraining saves a
loadable LLaMA + tokenizer."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lavis_evlgen.assets.text_lm import pretrain_text_lm, shapes_corpus, video_corpus
from lavis_evlgen.datasets.shapes_video import generate_shapes_video
from lavis_evlgen.datasets.shapes_world import generate_shapes_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return generate_shapes_world(tmp_path_factory.mktemp("world") / "w", seed=3, num_train=6, num_val=3, num_test=3)


def test_corpus_is_train_text_only(world):
    docs = shapes_corpus(world)
    train = {r["caption"] for r in json.loads((world / "captions_train.json").read_text())}
    held = {c for split in ("val", "test") for r in json.loads((world / f"captions_{split}.json").read_text())
            for c in r["caption"]} - train
    assert held and not any(c in doc for doc in docs for c in held)
    assert {d[:-1] for d in docs if d.count("\n") == 1 and d.endswith("\n")} == train
    assert any("Question: " in d and " Short answer: " in d for d in docs)
    pairs = [d for d in docs if d.count("\n") == 2 and d.endswith("\n")]
    assert pairs and all(set(p.split("\n")[:2]) <= train for p in pairs)


def test_video_corpus_is_train_captions_and_caption_pairs(tmp_path):
    video_world = generate_shapes_video(tmp_path / "v", seed=1, num_train=3, num_val=1, num_test=1, num_frames=8,
                                        frame_size=64)
    train = [r["caption"] for r in json.loads((video_world / "captions_train.json").read_text())]
    docs = video_corpus(video_world)
    assert sorted(d[:-1] for d in docs if d.count("\n") == 1) == sorted(train)
    pairs = [d.split("\n")[:2] for d in docs if d.count("\n") == 2]
    clip_of = {r["caption"]: r["image_id"] for r in json.loads((video_world / "captions_train.json").read_text())}
    assert len(pairs) == len(train) and all(clip_of[a] == clip_of[b] for a, b in pairs)


def test_pretrain_saves_loadable_lm_without_bos(world, tmp_path):
    docs = shapes_corpus(world)
    out = pretrain_text_lm(docs, tmp_path / "lm", steps=3, batch_size=4, vocab_size=300,
                           hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                           intermediate_size=64)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tokenizer("a red circle").input_ids
    assert tokenizer.bos_token_id not in ids  # soft prompts, not <s>, open each sequence
    assert tokenizer.decode(ids) == "a red circle"
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tokenizer))
    log = json.loads((out / "pretrain_log.json").read_text())
    assert log["steps"] == 3 and log["documents"] == len(docs)
