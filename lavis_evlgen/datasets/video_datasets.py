"""Torch datasets over a generated shapes video world (see ``shapes_video.py``), on LAVIS's video
caption classes, with checked clips.

Samples are LAVIS's: train {"video": float [C, T, H, W], "text_input": str, "image_id": int (dense
index of the clip)}, val/test {"video", "image_id": int (the clip id), "instance_id": str}; a
batch's "video" is [B, C, T, H, W]. Frames come from the split's LAVIS video processor
(``alpro_video_eval``: uniform; ``alpro_video_train`` / ``evlgen_video_headtail``: headtail), which
decodes with decord and gives T = its ``n_frms``.

Bad clips are caught, not passed on as wrong-length tensors (LAVIS's ``load_video`` silently
returns ``min(n_frms, frames in the file)`` frames): the builder checks every split with
``data_check.check_dataset`` (each clip opened, its frames counted and its last frame decoded
once); a missing or unreadable clip, and one shorter than ``n_frms`` unless the mode is "repeat"
(``build_info.short_video``), is a bad record named with its file and annotation entry (an error,
or skipped with ``build_info.data_check.on_bad: skip``). In "repeat" mode a short clip's frames are
repeated up to ``n_frms`` (``repeat_indices``), and the split logs how many clips that concerns,
once, when it is built (``log_short_videos``).
"""
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from decord import VideoReader
from lavis.common.registry import registry
from lavis.datasets.datasets.video_caption_datasets import VideoCaptionDataset, VideoCaptionEvalDataset
from lavis.processors.alpro_processors import AlproVideoTrainProcessor

from lavis_evlgen.datasets.data_check import CheckedMedia, DataError
from lavis_evlgen.datasets.shapes_datasets import subset_by_image
from lavis_evlgen.datasets.video_processors import VideoHeadtailProcessor
from lavis_evlgen.datasets.video_scene_scores import score_video_captions_against_scenes

SHORT_VIDEO_MODES = ("error", "repeat")


class BadVideoError(DataError):
    """A clip that is missing, unreadable or too short, named with its annotation entry."""


def repeat_indices(num_available: int, num_frames: int) -> list[int]:
    """``num_frames`` sorted frame indices into a clip of ``num_available`` frames, each frame
    repeated as evenly as possible: (3, 8) -> [0, 0, 0, 1, 1, 1, 2, 2]."""
    if num_available < 1:
        raise ValueError(f"cannot repeat the frames of a clip with {num_available} frames")
    return [k * num_available // num_frames for k in range(num_frames)]


def read_frames(path: str, indices: list[int], image_size: int) -> torch.Tensor:
    """Frames ``indices`` of a video, resized by decord to ``image_size`` as LAVIS's ``load_video``
    does: float [C, T, H, W] in 0..255."""
    batch = VideoReader(uri=str(path), height=image_size, width=image_size).get_batch(indices)
    frames = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(batch.asnumpy())  # [T, H, W, C]
    return frames.permute(3, 0, 1, 2).float()


class CheckedVideos(CheckedMedia):
    """What the shapes video datasets share: clip paths, the frame-count check and loading."""

    MEDIA_KEY = "video"

    # The split's name, set by the builder (for messages and grounded scores).
    split: str | None = None

    def _remember_entries(self, ann_paths) -> None:
        """Called by __init__: where each record comes from, and empty clip state."""
        self.ann_paths = [str(p) for p in ann_paths]
        for index, ann in enumerate(self.annotation):
            ann.setdefault("ann_entry", index)
        self.short_video = "error"
        self.video_lengths: dict[str, int] = {}  # path -> frames, filled as clips are checked or loaded
        self.short_videos: dict[str, int] = {}  # path -> frames, of the clips the check found short

    def video_path(self, ann: dict) -> str:
        return os.path.join(self.vis_root, ann["video"])

    def num_frames(self) -> int | None:
        """Frames per sample the split's processor asks for (None: all of the clip)."""
        n = getattr(self.vis_processor, "n_frms", None)
        return None if n is None or n >= registry.get("MAX_INT") else int(n)

    def where(self, ann: dict) -> str:
        """The annotation entry of a record, as "entry N of FILE: {record}"."""
        entry = ann.get("ann_entry", "?")
        record = {k: ann[k] for k in ("video", "image_id") if k in ann}
        if len(self.ann_paths) == 1:
            return f"annotation entry {entry} of {self.ann_paths[0]}: {json.dumps(record)}"
        # Entries count through the files one after the other.
        if isinstance(entry, int):
            for path in self.ann_paths:
                size = len(json.loads(Path(path).read_text()))
                if entry < size:
                    return f"annotation entry {entry} of {path}: {json.dumps(record)}"
                entry -= size
        return f"annotation entry {ann.get('ann_entry', '?')} of {self.ann_paths}: {json.dumps(record)}"

    def video_length(self, ann: dict) -> int:
        """Frames in the record's clip (cached); BadVideoError when it is missing or unreadable."""
        path = self.video_path(ann)
        if path in self.video_lengths:
            return self.video_lengths[path]
        if not os.path.isfile(path):
            raise BadVideoError(f"video {path} is missing ({self.where(ann)})")
        try:
            length = len(VideoReader(uri=path))
        except Exception as error:  # decord raises a bare RuntimeError ("Error reading ...")
            reason = str(error).strip()[:200]
            raise BadVideoError(f"video {path} cannot be read: {reason} ({self.where(ann)})") from error
        if length < 1:
            raise BadVideoError(f"video {path} has no frames ({self.where(ann)})")
        self.video_lengths[path] = length
        return length

    @staticmethod
    def _too_short_reason(path: str, length: int, wanted: int) -> str:
        return (f"video {path} has {length} frames, fewer than the {wanted} the processor samples (n_frms); "
                f"set build_info.short_video: repeat to repeat its frames instead")

    def _too_short(self, path: str, length: int, wanted: int, ann: dict) -> BadVideoError:
        return BadVideoError(f"{self._too_short_reason(path, length, wanted)} ({self.where(ann)})")

    def set_short_video(self, short_video: str = "error") -> None:
        """The short-clip rule for the check and for loading; clears what earlier checks found."""
        if short_video not in SHORT_VIDEO_MODES:
            raise ValueError(f"build_info.short_video must be one of {SHORT_VIDEO_MODES}, got {short_video!r}")
        wanted = self.num_frames()
        if wanted is not None and wanted % 2 and isinstance(self.vis_processor, (AlproVideoTrainProcessor,
                                                                                  VideoHeadtailProcessor)):
            raise ValueError(f"{type(self.vis_processor).__name__} samples headtail: n_frms must be even, got {wanted}")
        if short_video == "repeat" and not all(hasattr(self.vis_processor, a) for a in ("transform", "image_size")):
            raise ValueError(f"short_video: repeat needs a LAVIS video processor with .transform and .image_size "
                             f"(alpro_video_*), not {type(self.vis_processor).__name__}")
        self.short_video, self.video_lengths, self.short_videos = short_video, {}, {}

    def remember_media(self, statuses: dict[str, tuple[str | None, int | None]]) -> None:
        self.video_lengths = {path: frames for path, (error, frames) in statuses.items() if error is None}

    def media_problem(self, record: dict, status: tuple[str | None, int | None]) -> str | None:
        """The clip's check result, and the short-clip rule: an error in "error" mode, else noted."""
        error, length = status
        wanted = self.num_frames()
        if error or wanted is None or length >= wanted:
            return error
        path = self.video_path(record)
        if self.short_video == "error":
            return self._too_short_reason(path, length, wanted)
        self.short_videos[path] = length
        return None

    def log_short_videos(self, name: str = "") -> None:
        """Logs, once, how many clips of the split have their frames repeated ("repeat" mode)."""
        short = self.short_videos
        if not short:
            return
        label = f"{name} {self.split}".strip() or type(self).__name__
        total = len({self.video_path(ann) for ann in self.annotation})
        examples = ", ".join(f"{os.path.relpath(path, self.vis_root)} ({frames} frames)"
                             for path, frames in list(short.items())[:3])
        logging.warning("%s: %d of %d videos have fewer than %d frames; their frames are repeated "
                        "(build_info.short_video: repeat): %s%s", label, len(short), total, self.num_frames(),
                        examples, ", ..." if len(short) > 3 else "")

    def load_video(self, ann: dict) -> torch.Tensor:
        """The record's clip through the split's processor: float [C, T, H, W], T = n_frms."""
        path, wanted = self.video_path(ann), self.num_frames()
        length = self.video_length(ann)
        try:
            if wanted is not None and length < wanted:
                if self.short_video != "repeat":
                    raise self._too_short(path, length, wanted, ann)
                video = self.vis_processor.transform(read_frames(path, repeat_indices(length, wanted),
                                                                 self.vis_processor.image_size))
            else:
                video = self.vis_processor(path)
        except BadVideoError:
            raise
        except Exception as error:
            raise BadVideoError(f"video {path} could not be decoded: {type(error).__name__}: "
                                f"{str(error).strip()[:200]} ({self.where(ann)})") from error
        if wanted is not None and video.shape[1] != wanted:
            raise BadVideoError(f"video {path} gave {video.shape[1]} frames, not the {wanted} requested "
                                f"({self.where(ann)})")
        return video


class ShapesVideoCaptionDataset(CheckedVideos, VideoCaptionDataset):
    """Train captions, one record per caption: samples {"video": [C, T, H, W], "text_input": str,
    "image_id": int (dense index of the clip)}."""

    def __init__(self, vis_processor, text_processor, vis_root, ann_paths):
        super().__init__(vis_processor, text_processor, vis_root, ann_paths)
        self._remember_entries(ann_paths)

    def keep_fraction(self, fraction: float, seed: int) -> None:
        """Drops all but a seeded ``fraction`` of the clips (with all their captions)."""
        self.annotation = subset_by_image(self.annotation, fraction, seed, key="video")
        self._add_instance_ids()
        unique_ids = dict.fromkeys(ann["image_id"] for ann in self.annotation)
        self.img_ids = {image_id: n for n, image_id in enumerate(unique_ids)}

    def __getitem__(self, index):
        ann = self.annotation[index]
        return {
            "video": self.load_video(ann),
            "text_input": self.text_processor(ann["caption"]),
            "image_id": self.img_ids[ann["image_id"]],
        }


class ShapesVideoCaptionEvalDataset(CheckedVideos, VideoCaptionEvalDataset):
    """Val/test clips: samples {"video": [C, T, H, W], "image_id": int, "instance_id": str}."""

    MANY_TEXTS = True  # each record holds all the clip's reference captions

    # Set by the shapes video builder: the world directory (split: see CheckedVideos).
    world_root: Path | None = None

    def __init__(self, vis_processor, text_processor, vis_root, ann_paths):
        super().__init__(vis_processor, text_processor, vis_root, ann_paths)
        self._remember_entries(ann_paths)

    def __getitem__(self, index):
        ann = self.annotation[index]
        return {"video": self.load_video(ann), "image_id": ann["image_id"], "instance_id": ann["instance_id"]}

    def ground_truth(self) -> dict[int, list[str]]:
        """clip id -> its reference captions, as written by the generator."""
        return {int(ann["image_id"]): list(ann["caption"]) for ann in self.annotation}

    def grounded_scores(self, captions: dict[int, str]) -> dict[str, float]:
        """``score_video_captions_against_scenes`` of one generated caption per clip of this
        dataset, against ``scenes_{split}.json`` and the held-out events of ``world.json``."""
        if self.world_root is None or self.split is None:
            raise ValueError(f"{type(self).__name__} does not know its world root and split: "
                             f"build it with the shapes_video_caption builder")
        root = Path(self.world_root)
        scenes_file = root / f"scenes_{self.split}.json"
        if not scenes_file.is_file():
            raise FileNotFoundError(f"no scenes file {scenes_file}")
        scenes = {int(scene["image_id"]): scene for scene in json.loads(scenes_file.read_text())}
        clip_ids = sorted(self.ground_truth())
        missing = [i for i in clip_ids if i not in scenes]
        if missing:
            raise KeyError(f"{scenes_file} lacks {len(missing)} clips of the dataset (first ids {missing[:5]})")
        world = json.loads((root / "world.json").read_text())
        if "held_out_events" not in world:
            raise KeyError(f"{root / 'world.json'} has no 'held_out_events'")
        held_out = [tuple(pair) for pair in world["held_out_events"]]
        return score_video_captions_against_scenes(captions, {i: scenes[i] for i in clip_ids}, held_out)
