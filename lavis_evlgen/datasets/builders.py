"""LAVIS dataset builders for the shapes world: ``shapes_caption`` and ``shapes_vqa``.

Both read one generated world, described by ``build_info`` in their yaml (seed, split sizes,
image size, train fraction, storage). ``_download_data`` generates it (the main process only;
LAVIS puts a barrier after it); ``build`` points LAVIS's annotation and image paths at it, so
no ``/export`` cache path or download URL is ever involved, and tells each dataset its world root
and split (``world_root``, ``split``).
"""
from pathlib import Path

from lavis.common.registry import registry
from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder
from omegaconf import OmegaConf

from lavis_evlgen.common.paths import CONFIG_ROOT, cache_root
from lavis_evlgen.datasets.shapes_datasets import (
    ShapesCaptionDataset,
    ShapesCaptionEvalDataset,
    ShapesVQADataset,
    ShapesVQAEvalDataset,
)
from lavis_evlgen.datasets.shapes_world import ensure_shapes_world, shapes_world_dir

WORLD_KEYS = ("seed", "num_train", "num_val", "num_test", "image_size")


class ShapesWorldBuilder(BaseDatasetBuilder):
    """What both shapes builders share; subclasses say which annotation files each split reads."""

    def world_settings(self) -> dict:
        """The generator's arguments, from ``build_info`` (all of WORLD_KEYS are required)."""
        build_info = self.config.build_info
        missing = [key for key in WORLD_KEYS if build_info.get(key) is None]
        if missing:
            raise KeyError(f"datasets config of {type(self).__name__}: build_info lacks {missing}")
        return {key: build_info[key] for key in WORLD_KEYS}

    def storage(self) -> Path | None:
        """``build_info.storage`` as a directory (relative: under the cache's ``data/``), or None."""
        storage = self.config.build_info.get("storage")
        if not storage:
            return None
        path = Path(storage).expanduser()
        return path if path.is_absolute() else cache_root() / "data" / path

    def world_root(self) -> Path:
        """Where the world lives: ``storage()``, else the cache directory for these settings."""
        return self.storage() or shapes_world_dir(**self.world_settings())

    def _download_data(self):
        ensure_shapes_world(self.storage(), **self.world_settings())

    def annotation_files(self, split: str) -> list[str]:
        """The files (under the world root) ``split`` reads, in its dataset class's order.

        Abstract: each registered builder (caption, VQA) names its own annotation files.
        """
        raise NotImplementedError(f"{type(self).__name__} must say which annotation files a split reads")

    def build(self):
        root = self.world_root()
        if not (root / "world.json").is_file():
            raise FileNotFoundError(f"no shapes world at {root} (world.json missing): "
                                    f"build_datasets() generates it, build() alone does not")
        annotations = {split: {"storage": [str(root / name) for name in self.annotation_files(split)]}
                       for split in ("train", "val", "test")}
        self.config = OmegaConf.merge(self.config, {"build_info": {
            "annotations": annotations, self.data_type: {"storage": str(root)}}})
        datasets = super().build()
        for split, dataset in datasets.items():
            # Scene-grounded scoring reads the split's scenes and world.json beside its annotations.
            dataset.world_root, dataset.split = root, split

        fraction = self.config.build_info.get("fraction", 1.0)
        if fraction != 1.0:
            datasets["train"].keep_fraction(fraction, seed=self.config.build_info.seed)
        return datasets


@registry.register_builder("shapes_caption")
class ShapesCaptionBuilder(ShapesWorldBuilder):
    train_dataset_cls = ShapesCaptionDataset
    eval_dataset_cls = ShapesCaptionEvalDataset

    DATASET_CONFIG_DICT = {"default": str(CONFIG_ROOT / "datasets" / "shapes" / "caption.yaml")}

    def annotation_files(self, split: str) -> list[str]:
        return [f"captions_{split}.json"]


@registry.register_builder("shapes_vqa")
class ShapesVQABuilder(ShapesWorldBuilder):
    train_dataset_cls = ShapesVQADataset
    eval_dataset_cls = ShapesVQAEvalDataset

    DATASET_CONFIG_DICT = {"default": str(CONFIG_ROOT / "datasets" / "shapes" / "vqa.yaml")}

    def annotation_files(self, split: str) -> list[str]:
        if split == "train":
            return ["vqa_train.json"]
        # The order COCOVQAEvalDataset reads: records, answer list, VQA-v2 questions, annotations.
        return [f"vqa_{split}.json", "answer_list.json", f"vqa_{split}_questions.json",
                f"vqa_{split}_annotations.json"]
