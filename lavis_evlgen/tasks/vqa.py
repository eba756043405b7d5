"""Zero-shot open-ended VQA: generate a short answer per question, score it with the standard
VQA accuracy against the eval dataset's human answers (no COCO-format question/answer files)."""
import json
import logging
import os

from lavis.common.dist_utils import main_process
from lavis.common.registry import registry
from lavis.common.vqa_tools.vqa_eval import VQAEval
from lavis.tasks.base_task import BaseTask

from lavis_evlgen.common.prompts import VQA_PROMPT
from lavis_evlgen.tasks.captioning import as_id

# Only its answer normalisation is used; VQAEval() without data is cheap.
_VQA_EVAL = VQAEval()


def normalize_answer(answer: str) -> str:
    """The official VQA normalisation (LAVIS's VQAEval): whitespace, punctuation, lower case,
    number words to digits ("two" -> "2"), articles dropped ("a dog" -> "dog"), contractions."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _VQA_EVAL.processDigitArticle(_VQA_EVAL.processPunctuation(answer))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Standard VQA accuracy of one prediction, in [0, 1].

    min(#human answers equal to it / 3, 1), averaged over the leave-one-out subsets of the
    human answers as the official evaluation does (10 answers in VQAv2). With a single reference
    (GQA) it is exact match.
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    prediction = normalize_answer(prediction)
    matches = [normalize_answer(a) == prediction for a in answers]
    if len(matches) == 1:
        return float(matches[0])
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3.0) for m in matches) / len(matches)


def vqa_ground_truth(dataset) -> dict:
    """question_id -> human answers of an eval dataset: ``dataset.ground_truth()`` when it has one
    (the shapes world), else its LAVIS annotation records {"question_id", "answer": str | list[str]}
    (LAVIS's ``coco_vqa``, ``ok_vqa``: 10 answers per question; ``gqa``: one)."""
    if hasattr(dataset, "ground_truth"):
        return {as_id(q): list(a) for q, a in dataset.ground_truth().items()}
    records = getattr(dataset, "annotation", None)
    if not records or not all("question_id" in r and "answer" in r for r in records):
        raise ValueError(f"{type(dataset).__name__} has no ground truth: it needs ground_truth() (question_id -> "
                         "list of answers) or annotation records with 'question_id' and 'answer' fields")
    return {as_id(r["question_id"]): [r["answer"]] if isinstance(r["answer"], str) else list(r["answer"])
            for r in records}


def question_types(dataset) -> dict:
    """question_id -> "question_type" of an eval dataset's annotation records ({} when they carry
    none, as generic VQA datasets; the shapes world's are count, color, shape, position)."""
    records = getattr(dataset, "annotation", None) or []
    untyped = [r.get("question_id") for r in records if "question_type" not in r]
    if len(untyped) == len(records):
        return {}
    if untyped:
        raise ValueError(f"{type(dataset).__name__}: {len(untyped)} annotation records lack 'question_type' "
                         f"while others carry it (first question ids {untyped[:5]})")
    return {as_id(r["question_id"]): r["question_type"] for r in records}


def accuracy_by_type(accuracies: dict, types: dict) -> dict[str, float]:
    """``accuracy_<type>`` (mean of ``accuracies``, question_id -> [0, 1], in %) and
    ``num_questions_<type>`` for each question type in ``types`` (question_id -> type)."""
    by_type = {}
    for question_id, accuracy in accuracies.items():
        by_type.setdefault(types[question_id], []).append(accuracy)
    metrics = {}
    for question_type, values in sorted(by_type.items()):
        metrics[f"accuracy_{question_type}"] = 100.0 * sum(values) / len(values)
        metrics[f"num_questions_{question_type}"] = len(values)
    return metrics


@registry.register_task("evlgen_vqa")
class EvlgenVQATask(BaseTask):
    """``model.predict_answers`` with run_cfg ``num_beams`` (5), ``max_len`` (10), ``min_len`` (1),
    ``prompt`` (``VQA_PROMPT``), ``length_penalty`` (0); agg_metrics = accuracy (%).
    Datasets whose records carry "question_type" also get accuracy_<type> and num_questions_<type>."""

    def __init__(self, num_beams=5, max_len=10, min_len=1, prompt=VQA_PROMPT, length_penalty=0.0):
        super().__init__()
        self.num_beams = num_beams
        self.max_len = max_len
        self.min_len = min_len
        self.prompt = prompt
        self.length_penalty = length_penalty
        self.ground_truth = None
        self.question_types = {}
        self.dataset_name = None

    @classmethod
    def setup_task(cls, cfg):
        run_cfg = cfg.run_cfg
        return cls(
            num_beams=int(run_cfg.get("num_beams", 5)),
            max_len=int(run_cfg.get("max_len", 10)),
            min_len=int(run_cfg.get("min_len", 1)),
            prompt=run_cfg.get("prompt", VQA_PROMPT),
            length_penalty=float(run_cfg.get("length_penalty", 0.0)),
        )

    def before_evaluation(self, model, dataset, **kwargs):
        super().before_evaluation(model, dataset, **kwargs)
        self.dataset_name = type(dataset).__name__
        self.ground_truth = vqa_ground_truth(dataset)
        self.question_types = question_types(dataset)

    def valid_step(self, model, samples):
        """Answers for one batch: [{"question_id": int | str, "answer": str}]."""
        answers = model.predict_answers(
            samples,
            num_beams=self.num_beams,
            inference_method="generate",
            max_len=self.max_len,
            min_len=self.min_len,
            prompt=self.prompt,
            length_penalty=self.length_penalty,
        )
        return [{"question_id": as_id(q), "answer": a} for a, q in zip(answers, samples["question_id"])]

    def after_evaluation(self, val_result, split_name, epoch=None, **kwargs):
        result_file = self.save_result(
            val_result,
            result_dir=registry.get_path("result_dir"),
            filename=f"{split_name}_vqa_result_epoch{epoch}",
            remove_duplicate="question_id",
        )
        return self._report_metrics(result_file, split_name)

    @main_process
    def _report_metrics(self, result_file, split_name):
        with open(result_file) as f:
            predictions = {as_id(r["question_id"]): r["answer"] for r in json.load(f)}
        if not predictions:
            raise ValueError(f"{result_file} holds no answers: the {split_name} split of {self.dataset_name} is empty")
        unknown = sorted(set(predictions) - set(self.ground_truth), key=str)
        if unknown:
            raise KeyError(f"{len(unknown)} question ids have no answers in {self.dataset_name} (first {unknown[:5]})")
        if len(predictions) < len(self.ground_truth):
            logging.warning("%s: scoring %d of %d questions.", split_name, len(predictions), len(self.ground_truth))
        accuracies = {q: vqa_accuracy(p, self.ground_truth[q]) for q, p in predictions.items()}
        accuracy = 100.0 * sum(accuracies.values()) / len(accuracies)
        metrics = {"accuracy": accuracy, "num_questions": len(predictions), "agg_metrics": accuracy}
        if self.question_types:
            metrics.update(accuracy_by_type(accuracies, self.question_types))
        logging.info("%s: VQA accuracy %.2f on %d questions", split_name, accuracy, len(predictions))
        with open(os.path.join(registry.get_path("output_dir"), f"metrics_{split_name}.json"), "w") as f:
            json.dump(metrics, f, indent=2)
        return metrics
