"""Evaluation tasks on local data. Importing this package registers ``evlgen_captioning`` and
``evlgen_vqa`` with LAVIS's registry."""
from lavis_evlgen.tasks.captioning import EvlgenCaptionTask, caption_ground_truth
from lavis_evlgen.tasks.vqa import EvlgenVQATask, normalize_answer, vqa_accuracy

__all__ = ["EvlgenCaptionTask", "EvlgenVQATask", "caption_ground_truth", "normalize_answer", "vqa_accuracy"]
