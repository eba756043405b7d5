"""The paper's data (README, "Paper scale"): LAVIS builders for the sources LAVIS 1.0.2 lacks, and
one clear error when a dataset's files are absent.

- ``laion115M``, ``ccs14M``: BLIP's CapFilt caption sets (the authors' mix, method.md section 5)
  as webdataset shards (``{i}.tar`` of ``jpg`` + ``json`` with ``caption``), read by LAVIS's
  ``LaionDataset`` as its ``laion2B_multi`` builder does; ``build_info.storage`` is relative to
  the cache root unless absolute.
- ``flickr30k_caption``: Flickr30K val/test as caption eval datasets (LAVIS's ``flickr30k`` is a
  retrieval builder whose samples carry no ``image_id``).
- ``msrvtt_cap``: LAVIS's MSR-VTT caption builder under the name its default config uses (see
  ``MSRVTTCaptionBuilder``).
- ``check_dataset_files(cfg)``: before any dataset is built, every image or video folder and shard
  set a config names must exist; otherwise ``DataMissingError`` names the dataset, the path looked at,
  the key that moves it, and how to get the data (``HOW_TO_GET``). Annotation files LAVIS
  downloads itself; a failed download is re-raised naming the file and URL (``annotation_download_error``).
"""
import os
from pathlib import Path

from braceexpand import braceexpand
from lavis.common.registry import registry
from lavis.datasets.builders.base_dataset_builder import BaseDatasetBuilder
from lavis.datasets.builders.caption_builder import MSRVTTCapBuilder
from lavis.datasets.builders.image_text_pair_builder import Laion2BMultiBuilder
from lavis.datasets.datasets.coco_caption_datasets import COCOCapEvalDataset

from lavis_evlgen.common.paths import CONFIG_ROOT, cache_root

BLIP_JSON = "https://storage.googleapis.com/sfr-vision-language-research/BLIP/datasets/{}"
_SHARDS = ("download BLIP's CapFilt annotations {json} and write webdataset shards of jpg + json "
           "(caption) with img2dataset (pip install img2dataset; img2dataset --url_list {name}.json --input_format "
           "json --url_col url --caption_col caption --output_format webdataset --image_size 364 --output_folder {dir})")
HOW_TO_GET = {
    "laion115M": _SHARDS,
    "ccs14M": _SHARDS,
    "coco_caption": "COCO 2014 train and val images (https://cocodataset.org/#download: train2014.zip, val2014.zip) "
                    "unpacked as {dir}/train2014 and {dir}/val2014",
    "coco_vqa": "COCO 2014 images as for coco_caption (https://cocodataset.org/#download), under {dir}",
    "ok_vqa": "COCO 2014 images as for coco_caption (https://cocodataset.org/#download), under {dir}",
    "nocaps": "the nocaps val/test images (https://nocaps.org/download) under {dir}",
    "flickr30k_caption": "the Flickr30K images (https://shannon.cs.illinois.edu/DenotationGraph/) as {dir}/flickr30k-images",
    "gqa": "the GQA images (https://cs.stanford.edu/people/dorarad/gqa/download.html) under {dir}",
    "msrvtt_cap": "the 10,000 MSR-VTT videos (video0.mp4 ... video9999.mp4, as the LAVIS repository's "
                  "lavis/datasets/download_scripts/download_msrvtt.py fetches them) directly under {dir}",
}
SHARD_JSON = {"laion115M": "laion_synthetic_filtered_large.json", "ccs14M": "ccs_synthetic_filtered_large.json"}


class DataMissingError(FileNotFoundError):
    """A dataset's files are absent: the message names the dataset, the path, the key and the remedy."""


def storage_path(storage: str) -> Path:
    """A ``build_info`` storage path: absolute as given, else under the cache root (as LAVIS resolves it)."""
    path = Path(os.path.expanduser(str(storage)))
    return path if path.is_absolute() else cache_root() / path


def _missing(name: str, what: str, path, key: str, remedy_dir) -> DataMissingError:
    remedy = HOW_TO_GET.get(name, "see the dataset's LAVIS card").format(
        dir=remedy_dir, name=name, json=BLIP_JSON.format(SHARD_JSON.get(name, "")))
    return DataMissingError(f"dataset {name}: {what} not found at {path} (config key {key}; move it with --options "
                            f"{key}=PATH). To get it: {remedy}")


def check_dataset_files(datasets_cfg) -> None:
    """DataMissingError for the first dataset whose image or video folder or webdataset shards are absent."""
    for name, dataset_cfg in datasets_cfg.items():
        build_info = dataset_cfg.get("build_info", {})
        key = f"datasets.{name}.build_info"
        for media in ("images", "videos"):
            folder = (build_info.get(media) or {}).get("storage")
            if folder is not None and not storage_path(folder).exists():
                raise _missing(name, f"the {media[:-1]} folder", storage_path(folder), f"{key}.{media}.storage",
                               storage_path(folder))
        shards = build_info.get("storage") if "annotations" not in build_info else None
        if isinstance(shards, str):
            paths = [storage_path(p) for p in braceexpand(shards)]
            absent = [p for p in paths if not p.is_file()]
            if absent:
                raise _missing(name, f"{len(absent)} of {len(paths)} webdataset shards (first: {absent[0].name})",
                               storage_path(shards), f"{key}.storage", absent[0].parent)


def annotation_download_error(datasets_cfg, error: Exception) -> DataMissingError | None:
    """The clear error for a failed LAVIS annotation download: the missing files and their URLs
    (None when no configured annotation file is missing, so ``error`` was something else)."""
    lines = []
    for name, dataset_cfg in datasets_cfg.items():
        for split, ann in ((dataset_cfg.get("build_info") or {}).get("annotations") or {}).items():
            urls, stores = ann.get("url"), ann.get("storage")
            urls, stores = ([urls], [stores]) if isinstance(stores, str) else (list(urls or []), list(stores or []))
            lines += [f"dataset {name}, split {split}: {storage_path(s)} (from {u})"
                      for u, s in zip(urls, stores) if not storage_path(s).is_file()]
    if not lines:
        return None
    return DataMissingError(f"LAVIS could not download annotation files ({error}); put each at its path or run where "
                            "the URLs can be reached (move them with --options datasets.NAME.build_info.annotations."
                            "SPLIT.storage=PATH):\n  " + "\n  ".join(lines))


class _CaptionShardsBuilder(Laion2BMultiBuilder):
    """LAVIS's laion2B_multi builder on shards under the cache root, checked before reading."""

    def build(self):
        check_dataset_files({self.NAME: self.config})
        self.config.build_info.storage = str(storage_path(self.config.build_info.storage))
        return super().build()


@registry.register_builder("laion115M")
class Laion115MBuilder(_CaptionShardsBuilder):
    NAME = "laion115M"
    DATASET_CONFIG_DICT = {"default": str(CONFIG_ROOT / "datasets/laion115m/defaults.yaml")}


@registry.register_builder("ccs14M")
class CCS14MBuilder(_CaptionShardsBuilder):
    NAME = "ccs14M"
    DATASET_CONFIG_DICT = {"default": str(CONFIG_ROOT / "datasets/ccs14m/defaults.yaml")}


@registry.register_builder("msrvtt_cap")
class MSRVTTCaptionBuilder(MSRVTTCapBuilder):
    """LAVIS's MSR-VTT caption builder (``VideoCaptionDataset`` / ``VideoCaptionEvalDataset`` on
    LAVIS's annotation files and the videos under ``<cache_root>/msrvtt/videos``), as it should work.

    LAVIS 1.0.2 registers it as ``msrvtt_caption`` but keys its default config
    (``configs/datasets/msrvtt/defaults_cap.yaml``) ``msrvtt_cap``. LAVIS's ``Config`` merges a
    project's ``datasets.<name>`` with the yaml by that key, so under ``msrvtt_caption`` none of the
    defaults (data type, annotation URLs and paths, video folder) reach the builder, and the yaml's
    own ``msrvtt_cap`` entry becomes a second dataset no builder is registered for. The registry
    refuses a second ``msrvtt_caption``; registered as ``msrvtt_cap``, the same builder and config
    meet (``run_config.check_names`` names this builder when a config asks for ``msrvtt_caption``).
    """


@registry.register_builder("flickr30k_caption")
class Flickr30kCaptionBuilder(BaseDatasetBuilder):
    eval_dataset_cls = COCOCapEvalDataset
    DATASET_CONFIG_DICT = {"default": str(CONFIG_ROOT / "datasets/flickr30k_caption/defaults.yaml")}
