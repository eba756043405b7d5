"""Captioning evaluation against the local eval dataset's references (LAVIS's ``captioning``
task downloads COCO Karpathy ground truth and runs ``COCOEvalCap``, SPICE included)."""
import json
import logging
import os
from pathlib import Path

import torch
from lavis.common.dist_utils import main_process
from lavis.common.registry import registry
from lavis.tasks.captioning import CaptionTask

from lavis_evlgen.common.caption_metrics import score_captions


def as_id(value):
    """A sample id as a JSON- and dict-friendly key: int when it is numeric, else str."""
    if isinstance(value, torch.Tensor):
        return int(value.item())
    try:
        return int(value)
    except (TypeError, ValueError):
        return str(value)


def caption_ground_truth(dataset) -> dict:
    """image_id -> reference captions of an eval dataset.

    ``dataset.ground_truth()`` when it has one; otherwise its LAVIS eval annotation records
    {"image": path, "caption": str | list[str]} or {"video": path, "caption": ..., "image_id"},
    each keyed by the id the dataset's samples carry: ``dataset.img_ids[record["image_id"]]`` when
    the dataset maps ids (LAVIS's ``CaptionDataset``); else a video record's "image_id" as it is
    (LAVIS's ``VideoCaptionEvalDataset``, MSR-VTT), an image record's number at the end of its
    file name (LAVIS's ``COCOCapEvalDataset``).
    """
    if hasattr(dataset, "ground_truth"):
        return {as_id(i): list(caps) for i, caps in dataset.ground_truth().items()}
    records = getattr(dataset, "annotation", None)
    if not records or not all(("image" in r or ("video" in r and "image_id" in r)) and "caption" in r for r in records):
        raise ValueError(
            f"{type(dataset).__name__} has no ground truth: it needs ground_truth() or annotation "
            "records with 'image' and 'caption' fields, or 'video', 'image_id' and 'caption' fields"
        )
    img_ids = getattr(dataset, "img_ids", None)
    gts = {}
    for r in records:
        if img_ids is not None and "image_id" in r:
            image_id = img_ids[r["image_id"]]
        elif "video" in r:
            image_id = as_id(r["image_id"])
        else:
            image_id = as_id(Path(r["image"]).stem.split("_")[-1])
        captions = [r["caption"]] if isinstance(r["caption"], str) else list(r["caption"])
        gts.setdefault(image_id, []).extend(captions)
    return gts


@registry.register_task("evlgen_captioning")
class EvlgenCaptionTask(CaptionTask):
    """Generate a caption per image (``run.num_beams``, ``max_len``, ``min_len``, optional
    ``prompt`` and ``repetition_penalty``) and score it with ``score_captions``; agg_metrics =
    CIDEr + Bleu_4. A dataset with ``grounded_scores(captions)`` (the shapes world) adds its scores
    as ``scene_<name>``.

    ``repetition_penalty`` (HF generate's, on the tokens generated so far) is a run key so that every
    model a comparison evaluates decodes alike; null leaves each model's own default."""

    def __init__(self, num_beams, max_len, min_len, evaluate, report_metric=True, prompt="", repetition_penalty=None):
        super().__init__(num_beams, max_len, min_len, evaluate, report_metric=report_metric)
        if repetition_penalty is not None and not float(repetition_penalty) > 0:
            raise ValueError(f"run.repetition_penalty: expected a positive number or null, got {repetition_penalty!r}")
        self.prompt = prompt
        self.repetition_penalty = None if repetition_penalty is None else float(repetition_penalty)
        self.ground_truth = None
        self.dataset = None

    @classmethod
    def setup_task(cls, cfg):
        run_cfg = cfg.run_cfg
        return cls(
            num_beams=run_cfg.num_beams,
            max_len=run_cfg.max_len,
            min_len=run_cfg.min_len,
            evaluate=run_cfg.evaluate,
            report_metric=run_cfg.get("report_metric", True),
            prompt=run_cfg.get("prompt", ""),
            repetition_penalty=run_cfg.get("repetition_penalty"),
        )

    def before_evaluation(self, model, dataset, **kwargs):
        super().before_evaluation(model, dataset, **kwargs)
        self.ground_truth = caption_ground_truth(dataset)
        self.dataset = dataset

    def valid_step(self, model, samples):
        """Captions for one batch: [{"caption": str, "image_id": int | str}]."""
        if self.prompt:
            samples = {**samples, "prompt": self.prompt}
        decoding = {} if self.repetition_penalty is None else {"repetition_penalty": self.repetition_penalty}
        captions = model.generate(
            samples,
            use_nucleus_sampling=False,
            num_beams=self.num_beams,
            max_length=self.max_len,
            min_length=self.min_len,
            **decoding,
        )
        return [{"caption": c, "image_id": as_id(i)} for c, i in zip(captions, samples["image_id"])]

    def after_evaluation(self, val_result, split_name, epoch, **kwargs):
        result_file = self.save_result(
            result=val_result,
            result_dir=registry.get_path("result_dir"),
            filename=f"{split_name}_epoch{epoch}",
            remove_duplicate="image_id",
        )
        if not self.report_metric:
            return {"agg_metrics": 0.0}
        return self._report_metrics(eval_result_file=result_file, split_name=split_name)

    @main_process
    def _report_metrics(self, eval_result_file, split_name):
        with open(eval_result_file) as f:
            res = {as_id(r["image_id"]): [r["caption"]] for r in json.load(f)}
        unknown = sorted(set(res) - set(self.ground_truth), key=str)
        if unknown:
            raise KeyError(
                f"{len(unknown)} generated image ids have no reference in {type(self.dataset).__name__} "
                f"(first {unknown[:5]})"
            )
        if len(res) < len(self.ground_truth):
            logging.warning("%s: scoring %d of %d images.", split_name, len(res), len(self.ground_truth))
        metrics = score_captions({i: self.ground_truth[i] for i in res}, res)
        if hasattr(self.dataset, "grounded_scores"):
            grounded = self.dataset.grounded_scores({i: captions[0] for i, captions in res.items()})
            metrics.update({f"scene_{name}": value for name, value in grounded.items()})
        metrics["agg_metrics"] = metrics["CIDEr"] + metrics["Bleu_4"]
        logging.info("%s: %s", split_name, json.dumps(metrics))
        with open(os.path.join(registry.get_path("output_dir"), f"metrics_{split_name}.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        return metrics
