"""Tests of the synthetic shapes world: the generator, its LAVIS datasets and builders."""
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from lavis.common.config import Config
from lavis.common.registry import registry
from lavis.common.vqa_tools.vqa import VQA
from lavis.common.vqa_tools.vqa_eval import VQAEval
from omegaconf import OmegaConf
from PIL import Image

from lavis_evlgen.datasets import shapes_world
from lavis_evlgen.datasets.shapes_world import ensure_shapes_world, generate_shapes_world, shapes_world_dir

TINY = {"num_train": 12, "num_val": 4, "num_test": 4}


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _load(root: Path, name: str):
    return json.loads((root / name).read_text())


def _drawn_shape(image: Image.Image, obj: dict) -> str:
    """Recognises the shape painted in ``obj["rgb"]`` from pixels alone. Its area over the
    circumscribed disc separates circle (~1), square (~0.64) and triangle/star (~0.42); a circle at
    0.7 x the circumradius leaves the shape 3 times for a triangle, 5 times for a star."""
    mask = (np.asarray(image) == obj["rgb"]).all(-1)  # [S, S]; backgrounds are never saturated
    fill = mask.sum() / (math.pi * obj["radius"] ** 2)
    if fill > 0.85:
        return "circle"
    if fill > 0.55:
        return "square"
    (x, y), r, n = obj["center"], 0.7 * obj["radius"], 720
    hits = [mask[round(y + r * math.sin(2 * math.pi * k / n)), round(x + r * math.cos(2 * math.pi * k / n))]
            for k in range(n)]
    # Pixel rounding flickers at the edges; close gaps under 10 degrees (real ones are >= 50).
    inside = [any(hits[(k + j) % n] for j in range(-10, 11)) for k in range(n)]
    return {3: "triangle", 5: "star"}.get(sum(not inside[k - 1] and inside[k] for k in range(n)), "unknown")


def _nearest_color(rgb: list[int]) -> str:
    return min(shapes_world.COLORS, key=lambda c: sum((a - b) ** 2 for a, b in zip(shapes_world.COLORS[c], rgb)))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return generate_shapes_world(tmp_path_factory.mktemp("world") / "s0", seed=0, **TINY)


def test_same_seed_gives_identical_files(world, tmp_path):
    # A fresh interpreter with another hash seed: set/dict ordering must not leak into the output.
    code = ("import sys; from lavis_evlgen.datasets.shapes_world import generate_shapes_world; "
            "generate_shapes_world(sys.argv[1], seed=0, num_train=12, num_val=4, num_test=4)")
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "again")], check=True, env=env,
                   capture_output=True)
    first, again = _hashes(world), _hashes(tmp_path / "again")
    assert len(first) == 20 + 15  # 20 images, 15 json files
    assert first == again


def test_other_seed_gives_other_world(world, tmp_path):
    other = generate_shapes_world(tmp_path / "s1", seed=1, **TINY)
    first, second = _hashes(world), _hashes(other)
    assert first.keys() == second.keys()
    images = [k for k in first if k.endswith(".png")]
    assert sum(first[k] != second[k] for k in images) >= len(images) - 2
    assert first["captions_train.json"] != second["captions_train.json"]
    assert _load(world, "world.json")["seed"] == 0 and _load(other, "world.json")["seed"] == 1
    # Held-out pairs do not follow the seed: every seed's test split holds the same unseen pairs.
    assert _load(world, "world.json")["held_out_pairs"] == _load(other, "world.json")["held_out_pairs"]
    assert {tuple(p) for p in _load(other, "world.json")["held_out_pairs"]} == set(shapes_world.HELD_OUT_PAIRS)


def test_held_out_pairs_only_in_test(world):
    info = _load(world, "world.json")
    held_out = {tuple(pair) for pair in info["held_out_pairs"]}
    assert len(held_out) == len(shapes_world.SHAPES)
    assert len({color for color, _ in held_out}) == len(held_out)  # one colour per shape

    for split in ("train", "val"):
        for scene in _load(world, f"scenes_{split}.json"):
            assert not {(o["color"], o["shape"]) for o in scene["objects"]} & held_out
        text = json.dumps(_load(world, f"captions_{split}.json")) + json.dumps(_load(world, f"vqa_{split}.json"))
        assert not [pair for pair in held_out if " ".join(pair) in text]

    test_captions = {c["image_id"]: c["caption"] for c in _load(world, "captions_test.json")}
    for scene in _load(world, "scenes_test.json"):
        novel = {(o["color"], o["shape"]) for o in scene["objects"]} & held_out
        assert novel, f"test image {scene['image']} has no held-out pair"
        for caption in test_captions[scene["image_id"]]:
            assert any(" ".join(pair) in caption for pair in novel)


def test_annotations_point_at_existing_images(world):
    names = [f"{kind}_{split}.json" for kind in ("scenes", "captions", "vqa") for split in shapes_world.SPLITS]
    for name in names:
        for record in _load(world, name):
            with Image.open(world / record["image"]) as image:
                assert image.mode == "RGB" and image.size == (224, 224), record["image"]
    ids = [s["image_id"] for split in shapes_world.SPLITS for s in _load(world, f"scenes_{split}.json")]
    assert ids == list(range(20))


def test_images_and_captions_follow_the_scene(world):
    for split in shapes_world.SPLITS:
        captions = _load(world, f"captions_{split}.json")
        refs = {}
        for record in captions:
            caption = record["caption"]
            refs.setdefault(record["image_id"], []).extend(caption if isinstance(caption, list) else [caption])
        for scene in _load(world, f"scenes_{split}.json"):
            objects = scene["objects"]
            assert 1 <= len(objects) <= 3
            # The pixels show each object's colour and shape: the image carries what captions say.
            with Image.open(world / scene["image"]) as image:
                for o in objects:
                    assert list(image.getpixel(tuple(int(v) for v in o["center"]))) == o["rgb"]
                    assert _nearest_color(o["rgb"]) == o["color"], scene["image"]
                    assert _drawn_shape(image, o) == o["shape"], scene["image"]
            image_refs = refs[scene["image_id"]]
            assert len(set(image_refs)) == shapes_world.CAPTIONS_PER_IMAGE
            absent_colors = set(shapes_world.COLORS) - {o["color"] for o in objects}
            absent_shapes = set(shapes_world.SHAPES) - {o["shape"] for o in objects}
            absent_places = [p for pos in set(shapes_world.POSITIONS) - {o["position"] for o in objects}
                             for p in shapes_world.POSITION_PHRASES[pos]]
            for caption in image_refs:
                for o in objects:
                    assert f"{o['color']} {o['shape']}" in caption, (scene["image"], caption)
                words = caption.replace(",", "").split()
                assert not (absent_colors | absent_shapes) & set(words), (scene["image"], caption)
                assert not [p for p in absent_places if p in caption], (scene["image"], caption)


def test_vqa_answers_follow_the_scene(world):
    scenes = {s["image_id"]: s["objects"]
              for split in shapes_world.SPLITS for s in _load(world, f"scenes_{split}.json")}
    for split in shapes_world.SPLITS:
        questions = _load(world, f"vqa_{split}.json")
        assert len(questions) == 4 * TINY[f"num_{split}"]
        for q in questions:
            objects, answers = scenes[q["image_id"]], q["answer"]
            assert len(answers) == 10
            canonical = max(set(answers), key=answers.count)
            kind, words = q["question_type"], set(q["question"].rstrip("?").split())
            if kind == "count":
                expected = {str(len(objects))}
            elif kind == "color":
                expected = {o["color"] for o in objects if o["shape"] in words}
            elif kind == "shape":
                expected = {o["shape"] for o in objects if o["color"] in words}
            else:
                expected = {o["position"] for o in objects if {o["color"], o["shape"]} <= words}
            assert expected == {canonical}, q


def test_vqa_v2_files_score_with_lavis_scorer(world, tmp_path):
    records = _load(world, "vqa_test.json")
    canonical = [{"question_id": q["question_id"], "answer": max(set(q["answer"]), key=q["answer"].count)}
                 for q in records]
    blind = [{"question_id": q["question_id"], "answer": "red"} for q in records]
    accuracy = {}
    for name, result in (("canonical", canonical), ("blind", blind)):
        (tmp_path / f"{name}.json").write_text(json.dumps(result))
        vqa = VQA(str(world / "vqa_test_annotations.json"), str(world / "vqa_test_questions.json"))
        scorer = VQAEval(vqa, vqa.loadRes(str(tmp_path / f"{name}.json"), str(world / "vqa_test_questions.json")))
        scorer.evaluate()
        accuracy[name] = scorer.accuracy
    assert accuracy["canonical"]["overall"] == 100.0
    assert set(accuracy["canonical"]["perAnswerType"]) == {"count", "color", "shape", "position"}
    assert accuracy["blind"]["overall"] < 50.0


def _build(name: str, **overrides):
    """Builds a dataset the way LAVIS's tasks do: default yaml merged with a project config."""
    cfg = Config.build_dataset_config(OmegaConf.create({"datasets": {name: overrides}}))
    return registry.get_builder_class(name)(cfg.datasets[name]).build_datasets()


def test_caption_builder_through_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("EVLGEN_CACHE", str(tmp_path))
    datasets = _build("shapes_caption", build_info=TINY, vis_processor={"train": {"image_size": 112}})
    root = shapes_world_dir(seed=0, **TINY)
    assert root.is_relative_to(tmp_path) and (root / "world.json").is_file()
    assert {k: len(v) for k, v in datasets.items()} == {"train": 60, "val": 4, "test": 4}

    sample = datasets["train"][0]
    assert set(sample) == {"image", "text_input", "image_id"}
    assert sample["image"].shape == (3, 112, 112)
    assert sample["text_input"] == _load(root, "captions_train.json")[0]["caption"]
    for split in ("val", "test"):
        sample = datasets[split][1]
        assert sample["image"].shape == (3, 224, 224)
        assert isinstance(sample["image_id"], int)
        expected = {c["image_id"]: c["caption"] for c in _load(root, f"captions_{split}.json")}
        assert datasets[split].ground_truth() == expected
        assert sample["image_id"] in expected


def test_vqa_builder_through_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("EVLGEN_CACHE", str(tmp_path))
    datasets = _build("shapes_vqa", build_info={**TINY, "storage": "mine"})
    root = tmp_path / "data" / "mine"
    assert (root / "world.json").is_file()
    assert {k: len(v) for k, v in datasets.items()} == {"train": 48, "val": 16, "test": 16}

    batch = datasets["train"].collater([datasets["train"][i] for i in range(3)])
    assert batch["image"].shape == (3, 3, 224, 224) and len(batch["text_input"]) == 3
    test = datasets["test"]
    sample = test[2]
    assert set(sample) == {"image", "text_input", "question_id", "instance_id"}
    assert isinstance(sample["question_id"], int)
    assert sample["text_input"] == test.annotation[2]["question"]
    expected = {q["question_id"]: q["answer"] for q in _load(root, "vqa_test.json")}
    assert test.ground_truth() == expected
    assert {max(set(a), key=a.count) for a in expected.values()} <= set(test.answer_list)
    assert Path(test.coco_fmt_qust_file) == root / "vqa_test_questions.json"


def test_fraction_keeps_a_seeded_half_of_train_images(tmp_path, monkeypatch):
    monkeypatch.setenv("EVLGEN_CACHE", str(tmp_path))
    full = _build("shapes_caption", build_info=TINY)["train"]
    half = _build("shapes_caption", build_info={**TINY, "fraction": 0.5})["train"]
    half_again = _build("shapes_caption", build_info={**TINY, "fraction": 0.5})["train"]
    quarter = _build("shapes_caption", build_info={**TINY, "fraction": 0.25})["train"]

    images = lambda d: {a["image"] for a in d.annotation}  # noqa: E731
    assert len(images(half)) == 6 and len(half) == 30
    assert half.annotation == half_again.annotation
    assert images(quarter) < images(half) < images(full)
    assert sorted(half.img_ids.values()) == list(range(6))  # dense ids after the cut
    records = lambda d: [(a["image"], a["caption"]) for a in d.annotation]  # noqa: E731
    assert records(half) == [r for r in records(full) if r[0] in images(half)]
    assert {half[i]["image_id"] for i in range(len(half))} == set(range(6))

    with pytest.raises(ValueError, match="fraction"):
        _build("shapes_caption", build_info={**TINY, "fraction": 0.0})


def test_ensure_reuses_validates_and_repairs(tmp_path, monkeypatch):
    monkeypatch.setenv("EVLGEN_CACHE", str(tmp_path))
    root = ensure_shapes_world(seed=3, **TINY)
    stamp = (root / "world.json").stat().st_mtime_ns
    assert ensure_shapes_world(seed=3, **TINY) == root
    assert (root / "world.json").stat().st_mtime_ns == stamp
    assert not [p for p in root.parent.iterdir() if ".tmp-" in p.name]

    with pytest.raises(ValueError, match="seed"):
        ensure_shapes_world(root, seed=4, **TINY)
    with pytest.raises(ValueError, match="num_val"):
        ensure_shapes_world(root, seed=3, num_train=12, num_val=0, num_test=4)

    # An incomplete cache directory (no world.json) is regenerated, a foreign user directory is not.
    (root / "world.json").unlink()
    assert (ensure_shapes_world(seed=3, **TINY) / "world.json").is_file()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="foreign"):
        ensure_shapes_world(foreign, seed=3, **TINY)
