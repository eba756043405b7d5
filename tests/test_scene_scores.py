"""Scene-grounded caption scores (lavis_evlgen/datasets/scene_scores.py) and their hook into the
shapes caption dataset and the captioning task. CPU only, no model: captions are the world's own."""
import json
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
from lavis.common.config import Config
from lavis.common.registry import registry
from omegaconf import OmegaConf

import lavis_evlgen.tasks  # noqa: F401  (registers the tasks)
from lavis_evlgen.datasets.scene_scores import Mention, parse_caption, score_captions_against_scenes
from lavis_evlgen.datasets.shapes_world import SPLITS, generate_shapes_world
from lavis_evlgen.tasks import EvlgenCaptionTask, captioning

SMALL = {"num_train": 10, "num_val": 10, "num_test": 10, "image_size": 64}
RATES = ("count_acc", "position_acc") + tuple(
    f"{name}_{rate}" for name in ("color", "shape", "pair") for rate in ("precision", "recall", "f1"))


def _load(root: Path, name: str):
    return json.loads((root / name).read_text())


def _references(root: Path, split: str) -> dict[int, list[str]]:
    """image_id -> the generator's captions of one split (train: five records per image)."""
    refs = defaultdict(list)
    for record in _load(root, f"captions_{split}.json"):
        caption = record["caption"]
        refs[record["image_id"]] += [caption] if isinstance(caption, str) else caption
    return dict(refs)


def _scenes(root: Path, split: str) -> dict[int, list[dict]]:
    return {scene["image_id"]: scene["objects"] for scene in _load(root, f"scenes_{split}.json")}


def _obj(color: str, shape: str, position: str = "center", size: str = "small") -> dict:
    return {"color": color, "shape": shape, "position": position, "size": size}


@pytest.fixture
def world(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("EVLGEN_CACHE", str(tmp_path))
    return generate_shapes_world(tmp_path / "world", seed=0, **SMALL)


def test_every_generated_caption_parses_and_scores_perfectly(world):
    held_out = [tuple(pair) for pair in _load(world, "world.json")["held_out_pairs"]]
    for split in SPLITS:
        scenes, refs = _scenes(world, split), _references(world, split)
        for image_id, objects in scenes.items():
            true = {(o["color"], o["shape"]): o for o in objects}
            for caption in refs[image_id]:
                parsed = parse_caption(caption + "  \n")  # generated text may end in whitespace
                assert parsed.parsed, caption
                assert {(m.color, m.shape) for m in parsed.objects} == set(true), caption
                assert len(parsed.objects) == len(objects)
                for m in parsed.objects:
                    assert m.size in (None, true[(m.color, m.shape)]["size"]), caption
                    assert m.position in (None, true[(m.color, m.shape)]["position"]), caption
                assert parsed.stated_count in (None, len(objects)), caption

        # Each of the five wordings, as if it were the generated caption of every image.
        for k in range(5):
            scores = score_captions_against_scenes({i: refs[i][k] for i in scenes}, scenes, held_out)
            assert {name: scores[name] for name in RATES} == dict.fromkeys(RATES, 100.0)
            assert scores["unparseable"] == 0 and scores["repeated"] == 0 and scores["num_images"] == 10
            if split == "test":  # every test image holds a held-out pair
                assert scores["held_out_recall"] == 100.0 and scores["num_held_out_objects"] >= 10
            else:
                assert "held_out_recall" not in scores and scores["num_held_out_objects"] == 0
    # Over the splits, the counting frames of both tables are read.
    counts = {parse_caption(c).stated_count for split in SPLITS for refs in _references(world, split).values()
              for c in refs}
    assert {1, 2, 3} <= counts


def test_parse_reads_sizes_positions_and_counts():
    parsed = parse_caption("There are two shapes , a big orange star in the upper part and a little red circle\n")
    assert parsed.parsed and parsed.stated_count == 2
    assert parsed.objects == (Mention("orange", "star", "large", "top"), Mention("red", "circle", "small"))
    assert parse_caption("a picture with a single shape, an orange square").stated_count == 1
    assert parse_caption("an image of a green triangle at the center").objects == (
        Mention("green", "triangle", None, "center"),)
    for wrong in ("a red circle, a blue square",          # the generator always joins with " and "
                  "an red circle",                        # wrong article
                  "there is a red circle and a blue star",  # single-object frame, two objects
                  "there are two shapes, a red circle"):  # multi-object frame, one object
        assert not parse_caption(wrong).parsed, wrong


def test_unparseable_caption_is_read_leniently_and_counted():
    parsed = parse_caption("i see the small red circle on the left and also a blue square")
    assert not parsed.parsed and parsed.stated_count is None
    assert parsed.objects == (Mention("red", "circle", "small", "left"), Mention("blue", "square"))

    scenes = {1: [_obj("red", "circle", "left"), _obj("blue", "square", "right")], 2: [_obj("green", "star")]}
    captions = {1: "i see the small red circle on the left and also a blue square", 2: "a green star"}
    scores = score_captions_against_scenes(captions, scenes)
    assert scores["unparseable"] == 1 and scores["num_images"] == 2
    assert scores["pair_recall"] == 100.0 and scores["count_acc"] == 100.0
    assert scores["position_acc"] == 100.0 and scores["num_positioned_mentions"] == 1
    assert "held_out_recall" not in scores and "num_held_out_objects" not in scores


def test_wrong_colour_lowers_colour_and_pair_scores():
    scenes = {1: [_obj("red", "circle"), _obj("blue", "square")], 2: [_obj("green", "star")]}
    captions = {1: "there are two shapes, a red circle and a yellow square", 2: "a green star"}
    scores = score_captions_against_scenes(captions, scenes)
    # 3 colours said, 3 in the scenes, 2 in common (micro-averaged over both images).
    for name in ("color", "pair"):
        assert scores[f"{name}_precision"] == pytest.approx(200 / 3)
        assert scores[f"{name}_recall"] == pytest.approx(200 / 3)
        assert scores[f"{name}_f1"] == pytest.approx(200 / 3)
    assert scores["shape_f1"] == 100.0 and scores["count_acc"] == 100.0 and scores["unparseable"] == 0

    # One colour too many: precision drops, recall does not.
    captions[2] = "there are two shapes, a green star and a purple circle"
    scores = score_captions_against_scenes(captions, scenes)
    assert scores["color_precision"] == pytest.approx(50.0) and scores["color_recall"] == pytest.approx(200 / 3)
    assert scores["count_acc"] == 50.0


def test_swapped_pairs_keep_colours_and_shapes_but_not_pairs():
    scenes = {7: [_obj("red", "circle", "left"), _obj("blue", "square", "right")]}
    scores = score_captions_against_scenes(
        {7: "a blue circle on the left and a red square on the right"}, scenes)
    assert scores["color_f1"] == 100.0 and scores["shape_f1"] == 100.0 and scores["count_acc"] == 100.0
    assert scores["pair_f1"] == 0.0 and scores["pair_precision"] == 0.0 and scores["pair_recall"] == 0.0
    # Positions only count for mentions of objects that are there.
    assert "position_acc" not in scores and scores["num_positioned_mentions"] == 0


def test_position_accuracy():
    scenes = {1: [_obj("red", "circle", "left"), _obj("blue", "square", "right")]}
    scores = score_captions_against_scenes({1: "a red circle on the right and a blue square on the right"}, scenes)
    assert scores["position_acc"] == 50.0 and scores["num_positioned_mentions"] == 2


def test_held_out_recall():
    held_out = [("purple", "circle"), ("red", "triangle"), ("green", "star")]
    scenes = {1: [_obj("purple", "circle"), _obj("yellow", "square")], 2: [_obj("red", "triangle")],
              3: [_obj("blue", "star")]}
    captions = {1: "a purple circle and a yellow square", 2: "a blue triangle", 3: "a blue star"}
    scores = score_captions_against_scenes(captions, scenes, held_out)
    assert scores["held_out_recall"] == 50.0 and scores["num_held_out_objects"] == 2

    no_held_out_objects = score_captions_against_scenes({3: "a blue star"}, {3: scenes[3]}, held_out)
    assert "held_out_recall" not in no_held_out_objects and no_held_out_objects["num_held_out_objects"] == 0


def test_caption_ids_must_match_scene_ids():
    scenes = {1: [_obj("red", "circle")], 2: [_obj("blue", "star")]}
    with pytest.raises(KeyError, match=r"1 scene images have no caption \(first ids \[2\]\)"):
        score_captions_against_scenes({1: "a red circle"}, scenes)
    with pytest.raises(KeyError, match=r"1 captioned image ids are not in the scenes \(first ids \[3\]\)"):
        score_captions_against_scenes({1: "a red circle", 2: "a blue star", 3: "a red circle"}, scenes)


# ---------------------------------------------------------------------- dataset and task hook
def _build(name: str, **overrides):
    """Builds a dataset the way LAVIS's tasks do: default yaml merged with a project config."""
    cfg = Config.build_dataset_config(OmegaConf.create({"datasets": {name: overrides}}))
    return registry.get_builder_class(name)(cfg.datasets[name]).build_datasets()


def test_grounded_scores_through_builder_and_caption_task(tmp_path, monkeypatch):
    monkeypatch.setenv("EVLGEN_CACHE", str(tmp_path))
    datasets = _build("shapes_caption", build_info={**SMALL, "storage": "tiny"})
    root = tmp_path / "data" / "tiny"
    test = datasets["test"]
    assert (test.world_root, test.split) == (root, "test")
    first_refs = {i: refs[0] for i, refs in test.ground_truth().items()}

    scores = test.grounded_scores(first_refs)
    assert scores["pair_f1"] == 100.0 and scores["held_out_recall"] == 100.0 and scores["num_images"] == 10
    val_refs = {i: refs[0] for i, refs in datasets["val"].ground_truth().items()}
    assert datasets["val"].grounded_scores(val_refs)["num_held_out_objects"] == 0
    with pytest.raises(KeyError, match="scene images have no caption"):
        test.grounded_scores(dict(list(first_refs.items())[1:]))

    # The captioning task adds them, prefixed, beside the caption metrics (scoring stubbed: no Java).
    monkeypatch.setattr(captioning, "score_captions", lambda gts, res: {"Bleu_4": 0.5, "CIDEr": 2.0})
    (tmp_path / "result").mkdir()
    monkeypatch.setitem(registry.mapping["paths"], "result_dir", str(tmp_path / "result"))
    monkeypatch.setitem(registry.mapping["paths"], "output_dir", str(tmp_path))
    run_cfg = OmegaConf.create({"num_beams": 1, "max_len": 30, "min_len": 1, "evaluate": True})
    task = EvlgenCaptionTask.setup_task(cfg=SimpleNamespace(run_cfg=run_cfg))
    task.before_evaluation(model=SimpleNamespace(before_evaluation=lambda **kwargs: None), dataset=test)
    metrics = task.after_evaluation([{"caption": c, "image_id": i} for i, c in first_refs.items()],
                                    split_name="test", epoch="best")
    assert metrics["agg_metrics"] == 2.5
    assert {k: v for k, v in metrics.items() if k.startswith("scene_")} == {f"scene_{k}": v for k, v in scores.items()}
    assert json.loads((tmp_path / "metrics_test.json").read_text()) == metrics

    # The held-out pairs come from world.json, not from the generator.
    world_file = root / "world.json"
    world_file.write_text(json.dumps({**_load(root, "world.json"), "held_out_pairs": []}))
    assert "held_out_recall" not in test.grounded_scores(first_refs)
    world_file.write_text(json.dumps({"name": "shapes_world"}))
    with pytest.raises(KeyError, match=f"{world_file} has no 'held_out_pairs'"):
        test.grounded_scores(first_refs)


def test_an_object_named_twice_is_counted_as_repeated_and_misses_the_count():
    scenes = {1: [_obj("red", "circle"), _obj("blue", "square")], 2: [_obj("green", "star"), _obj("red", "star")]}
    captions = {1: "there are two shapes, a red circle and a red circle",
                2: "there are two shapes, a green star and a red star"}
    scores = score_captions_against_scenes(captions, scenes)
    assert scores["repeated"] == 1 and scores["unparseable"] == 0
    assert scores["count_acc"] == 50.0 and scores["pair_precision"] == 100.0 and scores["pair_recall"] == 75.0
