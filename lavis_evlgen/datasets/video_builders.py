"""LAVIS dataset builder for the shapes video world: ``shapes_video_caption``.

As the image world's builders (``builders.ShapesWorldBuilder``): ``build_info`` in
``configs/datasets/shapes_video/caption.yaml`` describes one generated world (seed, split sizes,
frames, frame size, fps, train fraction, storage); ``_download_data`` generates it (the main
process only; LAVIS puts a barrier after it); ``build`` points LAVIS's annotation and video paths
at it and tells each dataset its world root and split; every split is checked as the image
world's (``data_check.py``), clips shorter than ``n_frms`` in the ``build_info.short_video`` mode.
"""
from pathlib import Path

from lavis.common.registry import registry

from lavis_evlgen.common.paths import CONFIG_ROOT
from lavis_evlgen.datasets.builders import ShapesWorldBuilder
from lavis_evlgen.datasets.shapes_video import ensure_shapes_video, shapes_video_dir
from lavis_evlgen.datasets.video_datasets import ShapesVideoCaptionDataset, ShapesVideoCaptionEvalDataset

VIDEO_WORLD_KEYS = ("seed", "num_train", "num_val", "num_test", "num_frames", "frame_size", "fps")


@registry.register_builder("shapes_video_caption")
class ShapesVideoCaptionBuilder(ShapesWorldBuilder):
    train_dataset_cls = ShapesVideoCaptionDataset
    eval_dataset_cls = ShapesVideoCaptionEvalDataset

    DATASET_CONFIG_DICT = {"default": str(CONFIG_ROOT / "datasets" / "shapes_video" / "caption.yaml")}

    def world_settings(self) -> dict:
        """The generator's arguments, from ``build_info`` (all of VIDEO_WORLD_KEYS are required)."""
        build_info = self.config.build_info
        missing = [key for key in VIDEO_WORLD_KEYS if build_info.get(key) is None]
        if missing:
            raise KeyError(f"datasets config of {type(self).__name__}: build_info lacks {missing}")
        return {key: build_info[key] for key in VIDEO_WORLD_KEYS}

    def world_root(self) -> Path:
        return self.storage() or shapes_video_dir(**self.world_settings())

    def _download_data(self):
        ensure_shapes_video(self.storage(), **self.world_settings())
        self.check_media_first()

    def annotation_files(self, split: str) -> list[str]:
        return [f"captions_{split}.json"]

    def prepare_check(self, datasets: dict) -> None:
        short_video = self.config.build_info.get("short_video") or "error"
        for dataset in datasets.values():
            dataset.set_short_video(short_video)

    def build(self):
        datasets = super().build()
        for dataset in datasets.values():
            dataset.log_short_videos(self.registered_name())
        return datasets
