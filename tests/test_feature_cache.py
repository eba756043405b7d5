"""The frozen-ViT feature cache: same loss as uncached, keyed so a stale cache is never read."""
import json
import os
import shutil
from pathlib import Path

import lavis.tasks as tasks
import pytest
import torch
from lavis.common.config import Config
from PIL import Image

import train
from lavis_evlgen.datasets.feature_cache import CachedViT, attach_feature_cache

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "projects/evlgen/tiny/caption.yaml"


def build(*options: str):
    cfg = Config(train.parse_args(["--cfg-path", str(CONFIG), *(["--options", *options] if options else [])]))
    task = tasks.setup_task(cfg)
    datasets = task.build_datasets(cfg)
    torch.manual_seed(0)
    return task.build_model(cfg).eval(), datasets


def batch(dataset, n: int = 4) -> dict:
    return dataset.collater([dataset[i] for i in range(n)])


def test_cached_tokens_give_the_uncached_loss_and_captions(tmp_path):
    model, datasets = build()
    train_set, test_set = datasets["shapes_caption"]["train"], datasets["shapes_caption"]["test"]
    with torch.no_grad():
        loss = model(batch(train_set))["loss"]
        captions = model.generate(batch(test_set), num_beams=2, max_length=8)

    cached = attach_feature_cache(model, datasets, str(tmp_path))
    assert isinstance(model.visual_encoder, CachedViT)
    assert not list(model.visual_encoder.parameters())  # the ViT's weights are freed
    cached_train = cached["shapes_caption"]["train"]
    assert cached_train[0]["image"].shape == (model.visual_encoder.num_tokens, model.visual_encoder.num_features)
    with torch.no_grad():
        cached_loss = model(batch(cached_train))["loss"]
        cached_captions = model.generate(batch(cached["shapes_caption"]["test"]), num_beams=2, max_length=8)
    torch.testing.assert_close(cached_loss, loss, rtol=1e-6, atol=1e-6)
    assert cached_captions == captions
    # Everything but the image is the wrapped dataset's.
    assert cached_train.annotation is train_set.annotation
    assert cached["shapes_caption"]["test"].ground_truth() == test_set.ground_truth()
    assert len(list(tmp_path.glob("*/meta.json"))) == 3  # one cache per split, all complete


def test_a_changed_image_reads_a_new_cache_never_the_stale_one(tmp_path):
    model, datasets = build()
    dataset = datasets["shapes_caption"]["test"]
    dataset.vis_root = str(shutil.copytree(dataset.vis_root, tmp_path / "images"))  # edit a copy of the world
    test_only = {"shapes_caption": {"test": dataset}}
    first = attach_feature_cache(model, test_only, str(tmp_path / "features"))["shapes_caption"]["test"]
    image = Path(dataset.vis_root) / dataset.annotation[0]["image"]
    Image.new("RGB", Image.open(image).size, "white").save(image)
    model, _ = build()
    second = attach_feature_cache(model, test_only, str(tmp_path / "features"))["shapes_caption"]["test"]
    assert second.cache_dir != first.cache_dir
    assert not torch.equal(second[0]["image"], first[0]["image"])
    assert torch.equal(second[1]["image"], first[1]["image"])  # the other images are unchanged


def test_random_augmentation_and_a_trainable_vit_are_refused(tmp_path):
    model, datasets = build("datasets.shapes_caption.vis_processor.train.name=blip_image_train")
    with pytest.raises(ValueError, match=r"shapes_caption/train .*RandomResizedCrop"):
        attach_feature_cache(model, datasets, str(tmp_path))
    model, datasets = build("model.freeze_vit=False")
    with pytest.raises(ValueError, match="trainable parameters"):
        attach_feature_cache(model, datasets, str(tmp_path))
    assert not any(tmp_path.iterdir())  # nothing half-built left behind


def test_the_cached_model_refuses_pixels(tmp_path):
    model, datasets = build()
    test_only = {"shapes_caption": {"test": datasets["shapes_caption"]["test"]}}
    attach_feature_cache(model, test_only, str(tmp_path))
    with pytest.raises(ValueError, match=r"cached ViT tokens \[B, \d+, \d+\].*shape \[2, 3, 112, 112\]"):
        model.generate({"image": torch.zeros(2, 3, 112, 112)})


@pytest.mark.slow
def test_two_processes_build_one_cache_and_train_on_it(tmp_path):
    from test_train_evlgen import torchrun

    job = torchrun(tmp_path, "run.max_epoch=1", "run.feature_cache=True", f"run.feature_cache_dir={tmp_path / 'features'}")
    caches = sorted((tmp_path / "features").glob("*/meta.json"))
    assert len(caches) == 3 and not list((tmp_path / "features").glob(".*tmp*"))
    assert {"CIDEr", "scene_count_acc"} <= set(json.loads((job / "metrics_test.json").read_text()))
    assert os.path.getsize(caches[0].parent / "tokens.npy") > 0
