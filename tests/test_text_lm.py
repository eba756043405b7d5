"""The mini world's in-house text LM: its corpus uses train text only, and pretraining saves a
loadable LLaMA + tokenizer."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import random
import re

from lavis_evlgen.assets.text_lm import OBJECT_TOKENS, object_token, pretrain_text_lm, scene_text, shapes_corpus, video_corpus
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
    two_line = [d.split("\n")[:2] for d in docs if d.count("\n") == 2 and d.endswith("\n")]
    pairs = [p for p in two_line if p[0] in train]
    assert pairs and all(p[1] in train for p in pairs)
    # the rest are scene documents: the train scene as a list of object tokens, then one of its captions
    scenes = {s["image_id"]: s["objects"] for s in json.loads((world / "scenes_train.json").read_text())}
    image_of = {r["caption"]: r["image_id"] for r in json.loads((world / "captions_train.json").read_text())}
    listed = [p for p in two_line if p[0] not in train]
    assert len(listed) == len(json.loads((world / "captions_train.json").read_text()))  # one per caption record
    for scene_list, caption in listed:
        objects = scenes[image_of[caption]]
        assert sorted(re.findall(r"<[a-z]+_[a-z]+>", scene_list)) == sorted(object_token(o["color"], o["shape"]) for o in objects)
        assert "".join(re.findall(r"<[a-z]+_[a-z]+>", scene_list)) == scene_list


def test_video_corpus_is_train_captions_and_caption_pairs(tmp_path):
    video_world = generate_shapes_video(tmp_path / "v", seed=1, num_train=3, num_val=1, num_test=1, num_frames=8,
                                        frame_size=64)
    train = [r["caption"] for r in json.loads((video_world / "captions_train.json").read_text())]
    docs = video_corpus(video_world)
    assert sorted(d[:-1] for d in docs if d.count("\n") == 1) == sorted(train)
    two_line = [d.split("\n")[:2] for d in docs if d.count("\n") == 2]
    clip_of = {r["caption"]: r["image_id"] for r in json.loads((video_world / "captions_train.json").read_text())}
    pairs = [p for p in two_line if p[0] in clip_of]
    assert len(pairs) == len(train) and all(clip_of[a] == clip_of[b] for a, b in pairs)
    events = {s["image_id"]: s["events"] for s in json.loads((video_world / "scenes_train.json").read_text())}
    listed = [p for p in two_line if p[0] not in clip_of]
    assert len(listed) == len(train)
    assert all(scene_list == scene_text(events[clip_of[caption]], None) for scene_list, caption in listed)


def test_scene_text_lists_objects_in_any_order_and_events_in_time_order():
    objects = [{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "square"}]
    orders = {scene_text(objects, random.Random(seed)) for seed in range(20)}
    assert orders == {"<red_circle><blue_square>", "<blue_square><red_circle>"}
    events = [{"color": "green", "shape": "star", "action": "up", "to_color": None, "window": [8, 16]},
              {"color": "purple", "shape": "square", "action": "change", "to_color": "yellow", "window": [0, 8]}]
    assert scene_text(events, None) == "purple square change yellow, green star up"


def test_pretrain_saves_loadable_lm_without_bos(world, tmp_path):
    docs = shapes_corpus(world)
    out = pretrain_text_lm(docs, tmp_path / "lm", steps=3, batch_size=4, vocab_size=300, added_tokens=OBJECT_TOKENS,
                           hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                           intermediate_size=64)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tokenizer("a red circle").input_ids
    assert tokenizer.bos_token_id not in ids  # soft prompts, not <s>, open each sequence
    assert tokenizer.decode(ids) == "a red circle"
    # each object of a scene list is one token, whatever the BPE merges learned
    listed = tokenizer("<red_circle><blue_square>\na red circle").input_ids
    assert listed[:2] == tokenizer.convert_tokens_to_ids(["<red_circle>", "<blue_square>"])
    assert len(set(tokenizer.convert_tokens_to_ids(OBJECT_TOKENS))) == len(OBJECT_TOKENS) == 24
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tokenizer))
    log = json.loads((out / "pretrain_log.json").read_text())
    assert log["steps"] == 3 and log["documents"] == len(docs)
