"""Data checked at dataset build (lavis_evlgen/datasets/data_check.py): broken annotation files,
records and images are named with file and entry before any step; skip mode drops and counts."""
import json
import logging
import shutil
from pathlib import Path

import pytest
from lavis.common.config import Config
from lavis.common.registry import registry
from omegaconf import OmegaConf
from PIL import Image, ImageFile

import lavis_evlgen  # noqa: F401  (imports LAVIS, whose caption datasets set LOAD_TRUNCATED_IMAGES)
from lavis_evlgen.datasets import data_check
from lavis_evlgen.datasets.data_check import DataError
from lavis_evlgen.datasets.shapes_world import generate_shapes_world

TINY = {"num_train": 4, "num_val": 2, "num_test": 2}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return generate_shapes_world(tmp_path_factory.mktemp("world") / "s0", seed=0, **TINY)


@pytest.fixture
def damaged(world, tmp_path, monkeypatch) -> Path:
    """A copy of the tiny world to break, with a cache (and so a manifest) of its own."""
    monkeypatch.setenv("EVLGEN_CACHE", str(tmp_path / "cache"))
    return Path(shutil.copytree(world, tmp_path / "damaged"))


def _build(root: Path, name: str = "shapes_caption", **build_info):
    cfg = Config.build_dataset_config(OmegaConf.create(
        {"datasets": {name: {"build_info": {**TINY, "storage": str(root), **build_info}}}}))
    return registry.get_builder_class(name)(cfg.datasets[name]).build_datasets()


def _edit(path: Path, change) -> list:
    records = json.loads(path.read_text())
    change(records)
    path.write_text(json.dumps(records))
    return records


def _truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_plugin_turns_off_lavis_truncated_images_flag():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_annotation_file_names_the_file(damaged):
    _truncate(damaged / "captions_val.json")
    with pytest.raises(DataError, match=rf"annotation file {damaged / 'captions_val.json'} is not valid JSON: .* line 1"):
        _build(damaged)
    _truncate(damaged / "vqa_test_annotations.json")  # not a records file: parsed all the same
    with pytest.raises(DataError, match="vqa_test_annotations.json is not valid JSON"):
        _build(damaged, "shapes_vqa")


def test_bad_records_are_listed_with_file_and_entry(damaged, monkeypatch):
    train = _edit(damaged / "captions_train.json", lambda r: (r[3].pop("caption"), r[5].update(caption="  ")))
    _edit(damaged / "captions_val.json", lambda r: r[1].update(caption=[]))
    with pytest.raises(DataError) as error:
        _build(damaged)
    message = str(error.value)
    assert message.startswith("3 bad records")
    assert f"no 'caption' (annotation entry 3 of {damaged / 'captions_train.json'}: " \
           f'{{"image": "{train[3]["image"]}", "image_id": {train[3]["image_id"]}}})' in message
    assert f"an empty caption (annotation entry 5 of {damaged / 'captions_train.json'}" in message
    assert f"an empty list of captions (annotation entry 1 of {damaged / 'captions_val.json'}" in message

    monkeypatch.setattr(registry.get_builder_class("shapes_caption"), "_download_data", lambda self: None)
    (damaged / "captions_train.json").write_text(json.dumps({"not": "a list"}))
    with pytest.raises(DataError, match="must hold a list of records, not a dict"):
        _build(damaged)


def test_missing_and_truncated_images_are_errors_even_with_lavis_flag_on(damaged, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as LAVIS leaves it
    val = json.loads((damaged / "captions_val.json").read_text())
    truncated, missing = damaged / val[0]["image"], damaged / val[1]["image"]
    _truncate(truncated)
    missing.unlink()
    with pytest.raises(DataError) as error:
        _build(damaged)
    message = str(error.value)
    assert f"image {truncated} cannot be decoded: OSError: image file is truncated" in message
    assert f"image {missing} is missing (annotation entry 1 of {damaged / 'captions_val.json'}" in message
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored after the check
    # The truncated image is named by the VQA builder too (records of vqa_val.json name it).
    with pytest.raises(DataError, match=rf"image {truncated} cannot be decoded.*vqa_val.json"):
        _build(damaged, "shapes_vqa")


def test_skip_mode_drops_counts_and_reports(damaged, caplog, tmp_path):
    train = json.loads((damaged / "captions_train.json").read_text())
    broken = damaged / train[0]["image"]  # image 0: train records 0..4
    _truncate(broken)
    _edit(damaged / "captions_train.json", lambda r: r[7].update(caption=""))
    _edit(damaged / "captions_test.json", lambda r: r[0]["caption"].append(" ".join(["word"] * 60)))
    with pytest.raises(KeyError, match=r"data_check: unknown key\(s\) \['on_error'\]"):
        _build(damaged, data_check={"on_error": "skip"})
    with pytest.raises(ValueError, match="on_bad must be one of"):
        _build(damaged, data_check={"on_bad": "ignore"})

    with caplog.at_level(logging.INFO):
        datasets = _build(damaged, data_check={"on_bad": "skip", "show": 2})
    train_set = datasets["train"]
    assert len(train_set) == len(train) - 6
    assert {a["image"] for a in train_set.annotation} == {r["image"] for r in train} - {train[0]["image"]}
    assert sorted(train_set.img_ids.values()) == list(range(3))  # dense again
    assert [a["instance_id"] for a in train_set.annotation] == [str(k) for k in range(len(train_set))]
    report = train_set.data_check.summary(show=2)
    assert report["bad"] == report["skipped"] == 6 and report["records"] == len(train)
    assert len(report["first_bad"]) == 2 and "cannot be decoded" in report["first_bad"][0]
    assert datasets["test"].data_check.over_long == 1 and datasets["test"].data_check.max_words == 50
    logs = " ".join(r.getMessage() for r in caplog.records)
    assert "skipped 6 bad records" in logs and "... and 4 more" in logs
    assert "shapes_caption test: 1 captions have more than 50 words" in logs
    written = json.loads(data_check.write_data_check({"shapes_caption": datasets}, tmp_path).read_text())
    assert written["shapes_caption"]["train"]["skipped"] == 6 and written["shapes_caption"]["val"]["bad"] == 0


def test_manifest_decodes_each_file_once_until_it_changes(damaged, monkeypatch):
    decoded = []
    real = data_check.image_status
    monkeypatch.setattr(data_check, "image_status", lambda path: decoded.append(path) or real(path))
    _build(damaged)
    images = {r["image"] for split in ("train", "val", "test")
              for r in json.loads((damaged / f"captions_{split}.json").read_text())}
    assert sorted(decoded) == sorted(str(damaged / i) for i in images)  # each once, main process first
    decoded.clear()
    _build(damaged)
    assert decoded == []
    changed = damaged / sorted(images)[0]
    Image.new("RGB", (8, 8)).save(changed)
    _build(damaged)
    assert decoded == [str(changed)]
