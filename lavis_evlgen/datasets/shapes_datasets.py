"""Torch datasets over a generated shapes world (see ``shapes_world.py``), on LAVIS's classes.

Train datasets read the LAVIS train formats and can keep a seeded fraction of their images (the
paper's "1/10 of the data" rows). Eval datasets add ``ground_truth()``, the references a scorer
needs, read from the same annotation file the samples come from; the caption one also scores
captions against its split's scenes (``grounded_scores``). The builder tells every dataset its
world root and split.
"""
import json
import random
from pathlib import Path

from lavis.datasets.datasets.caption_datasets import CaptionDataset, CaptionEvalDataset
from lavis.datasets.datasets.coco_vqa_datasets import COCOVQADataset, COCOVQAEvalDataset

from lavis_evlgen.datasets.data_check import CheckedMedia
from lavis_evlgen.datasets.scene_scores import score_captions_against_scenes


def subset_by_image(annotation: list[dict], fraction: float, seed: int, key: str = "image") -> list[dict]:
    """Keeps every record of a seeded ``round(fraction * #images)`` images (at least one), an
    image being a distinct ``record[key]`` (the video datasets pass ``key="video"``).

    Images are drawn as a prefix of one seeded shuffle, so a smaller fraction keeps a subset
    of a larger one. Record order is preserved.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"build_info.fraction must be in (0, 1], got {fraction!r}")
    images = sorted({ann[key] for ann in annotation})
    random.Random(f"shapes-world/{seed}/fraction").shuffle(images)
    kept = set(images[: max(1, round(fraction * len(images)))])
    return [ann for ann in annotation if ann[key] in kept]


def read_scenes(path: Path) -> dict[int, list[dict]]:
    """image_id -> its objects, from a ``scenes_{split}.json``."""
    if not path.is_file():
        raise FileNotFoundError(f"no scenes file {path}")
    return {int(scene["image_id"]): scene["objects"] for scene in json.loads(path.read_text())}


def read_held_out_pairs(world_file: Path) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a world keeps out of train/val, from its ``world.json``."""
    world = json.loads(world_file.read_text())
    if "held_out_pairs" not in world:
        raise KeyError(f"{world_file} has no 'held_out_pairs'")
    return [tuple(pair) for pair in world["held_out_pairs"]]


class ShapesCaptionDataset(CheckedMedia, CaptionDataset):
    """Train captions, one record per caption: samples {"image": [3, H, W], "text_input": str,
    "image_id": int (dense index of the image)}."""

    def keep_fraction(self, fraction: float, seed: int) -> None:
        """Drops all but a seeded ``fraction`` of the images (with all their captions)."""
        self.annotation = subset_by_image(self.annotation, fraction, seed)
        self._add_instance_ids()
        unique_ids = dict.fromkeys(ann["image_id"] for ann in self.annotation)
        self.img_ids = {image_id: n for n, image_id in enumerate(unique_ids)}


class ShapesCaptionEvalDataset(CheckedMedia, CaptionEvalDataset):
    """Val/test images: samples {"image": [3, H, W], "image_id": int, "instance_id": str}."""

    MANY_TEXTS = True  # each record holds all the image's reference captions

    # Set by the shapes builder: the world directory and which of its splits this is.
    world_root: Path | None = None
    split: str | None = None

    def ground_truth(self) -> dict[int, list[str]]:
        """image_id -> its reference captions, as written by the generator."""
        return {int(ann["image_id"]): list(ann["caption"]) for ann in self.annotation}

    def grounded_scores(self, captions: dict[int, str]) -> dict[str, float]:
        """``score_captions_against_scenes`` of one generated caption per image of this dataset,
        against ``scenes_{split}.json`` and the held-out pairs of ``world.json``."""
        if self.world_root is None or self.split is None:
            raise ValueError(f"{type(self).__name__} does not know its world root and split: "
                             f"build it with the shapes_caption builder")
        scenes_file = Path(self.world_root) / f"scenes_{self.split}.json"
        scenes = read_scenes(scenes_file)
        image_ids = sorted(self.ground_truth())
        missing = [i for i in image_ids if i not in scenes]
        if missing:
            raise KeyError(f"{scenes_file} lacks {len(missing)} images of the dataset (first ids {missing[:5]})")
        held_out = read_held_out_pairs(Path(self.world_root) / "world.json")
        return score_captions_against_scenes(captions, {i: scenes[i] for i in image_ids}, held_out)


class ShapesVQADataset(CheckedMedia, COCOVQADataset):
    """Train questions: samples {"image": [3, H, W], "text_input": question, "answers": [str],
    "weights": [float]}, batched by LAVIS's ``VQADataset.collater``."""

    TEXT_KEY = "question"

    def keep_fraction(self, fraction: float, seed: int) -> None:
        """Drops all but a seeded ``fraction`` of the images (with all their questions)."""
        self.annotation = subset_by_image(self.annotation, fraction, seed)
        self._add_instance_ids()


class ShapesVQAEvalDataset(CheckedMedia, COCOVQAEvalDataset):
    """Val/test questions: samples {"image": [3, H, W], "text_input": question, "question_id": int,
    "instance_id": str}. ``ann_paths`` = [records, answer list, VQA-v2 questions, VQA-v2
    annotations], so LAVIS's ``vqa`` task finds ``answer_list`` and its scorer's files."""

    TEXT_KEY = "question"
    RECORDS_IN_FIRST_FILE = True

    def ground_truth(self) -> dict[int, list[str]]:
        """question_id -> its ten answers, as written by the generator."""
        return {int(ann["question_id"]): list(ann["answer"]) for ann in self.annotation}
