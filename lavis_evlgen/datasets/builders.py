"""LAVIS dataset builders for the shapes world: ``shapes_caption`` and ``shapes_vqa``.

Both read one generated world, described by ``build_info`` in their yaml (seed, split sizes,
image size, train fraction, storage). ``_download_data`` generates it (the main process only;
LAVIS puts a barrier after it); ``build`` points LAVIS's annotation and image paths at it, so
no ``/export`` cache path or download URL is ever involved, and tells each dataset its world root
and split (``world_root``, ``split``). Every split's data is checked before it is returned
(``data_check.py``; ``build_info.data_check``): first by the main process in ``_download_data``,
which fills the manifest of decoded files, then by every process in ``build``.
"""
from pathlib import Path

from lavis.common.registry import registry
from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder
from omegaconf import OmegaConf

from lavis_evlgen.common.paths import CONFIG_ROOT, cache_root
from lavis_evlgen.datasets.data_check import (
    DataCheckConfig,
    apply_reports,
    check_dataset,
    check_media,
    check_records_file,
    read_annotation_file,
)
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
        self.check_media_first()

    def check_config(self) -> DataCheckConfig:
        return DataCheckConfig.from_dict(self.config.build_info.get("data_check"))

    def split_files(self, root: Path) -> dict[str, tuple[list[Path], list[Path]]]:
        """split -> (its annotation files, those of them that hold its records)."""
        out = {}
        for split in ("train", "val", "test"):
            dataset_cls = self.train_dataset_cls if split == "train" else self.eval_dataset_cls
            files = [root / name for name in self.annotation_files(split)]
            out[split] = files, files[:1] if dataset_cls.RECORDS_IN_FIRST_FILE else files
        return out

    def check_media_first(self) -> None:
        """The main process decodes every media file once into the manifest, before the others build."""
        check = self.check_config()
        if not check.manifest:
            return
        root = self.world_root()
        media_key = self.train_dataset_cls.MEDIA_KEY
        paths = [str(root / record[media_key]) for _, record_files in self.split_files(root).values()
                 for path in record_files for record in check_records_file(path)
                 if isinstance(record.get(media_key), str)]
        check_media(paths, media_key, check)

    def parse_annotations(self, root: Path) -> dict[str, list[tuple[str, int]]]:
        """Parses every annotation file (errors name the file); split -> (records file, records)."""
        sizes = {}
        for split, (files, record_files) in self.split_files(root).items():
            for path in files:
                if path not in record_files:
                    read_annotation_file(path)
            sizes[split] = [(str(path), len(check_records_file(path))) for path in record_files]
        return sizes

    def registered_name(self) -> str:
        return next(name for name, cls in registry.mapping["builder_name_mapping"].items() if cls is type(self))

    def prepare_check(self, datasets: dict) -> None:
        """Called on the built datasets before they are checked (the video builder sets its clip rules)."""

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
        check = self.check_config()
        sizes = self.parse_annotations(root)  # before LAVIS reads them, which would name no file
        annotations = {split: {"storage": [str(root / name) for name in self.annotation_files(split)]}
                       for split in ("train", "val", "test")}
        self.config = OmegaConf.merge(self.config, {"build_info": {
            "annotations": annotations, self.data_type: {"storage": str(root)}}})
        datasets = super().build()
        for split, dataset in datasets.items():
            # Scene-grounded scoring reads the split's scenes and world.json beside its annotations.
            dataset.world_root, dataset.split = root, split
        self.prepare_check(datasets)
        reports = {split: check_dataset(dataset, f"{self.registered_name()} {split}", sizes[split], check)
                   for split, dataset in datasets.items()}
        apply_reports(datasets, reports, check)
        for split, dataset in datasets.items():
            dataset.data_check = reports[split]

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
