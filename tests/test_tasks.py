"""The evlgen_captioning and evlgen_vqa tasks with fake models and datasets (no Java: caption
scoring is stubbed here and tested in test_caption_metrics.py)."""
import json
from types import SimpleNamespace

import pytest
import torch
from lavis.common.registry import registry
from omegaconf import OmegaConf

import lavis_evlgen.tasks  # noqa: F401  (registers the tasks)
from lavis_evlgen.common.lemmatize import lemmatize_with
from lavis_evlgen.tasks import EvlgenCaptionTask, EvlgenVQATask, caption_ground_truth, normalize_answer, vqa_accuracy
from lavis_evlgen.tasks import captioning
from lavis_evlgen.tasks.captioning import as_id
from lavis_evlgen.tasks.vqa import vqa_ground_truth


class FakeModel:
    """Records what the task asks for; answers/captions are fixed strings."""

    def __init__(self):
        self.calls = []

    def before_evaluation(self, **kwargs):
        pass

    def generate(self, samples, **kwargs):
        self.calls.append((samples, kwargs))
        return ["a dog"] * len(samples["image_id"])

    def predict_answers(self, samples, **kwargs):
        self.calls.append((samples, kwargs))
        return ["Two"] * len(samples["question_id"])


class GroundTruthDataset:
    def __init__(self, gt):
        self.gt = gt

    def ground_truth(self):
        return self.gt


def setup(task_cls, **run):
    return task_cls.setup_task(cfg=SimpleNamespace(run_cfg=OmegaConf.create(run)))


@pytest.fixture
def output_dirs(tmp_path, monkeypatch):
    """What the runner registers: result_dir and output_dir."""
    (tmp_path / "result").mkdir()
    monkeypatch.setitem(registry.mapping["paths"], "result_dir", str(tmp_path / "result"))
    monkeypatch.setitem(registry.mapping["paths"], "output_dir", str(tmp_path))
    return tmp_path


# ---------------------------------------------------------------------- VQA
@pytest.mark.parametrize(
    "prediction, answer",
    [("Two", "2"), ("a dog", "dog"), ("The dog.", "dog"), ("dont", "don't"), ("  yes\n", "yes")],
)
def test_vqa_normalisation(prediction, answer):
    assert normalize_answer(prediction) == normalize_answer(answer)
    assert vqa_accuracy(prediction, [answer] * 10) == 1.0


def test_vqa_accuracy_counts_human_answers():
    assert vqa_accuracy("dog", ["cat"] * 10) == 0.0
    # Official: min(#others matching / 3, 1) over the 10 leave-one-out subsets.
    assert vqa_accuracy("dog", ["dog"] * 3 + ["cat"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert vqa_accuracy("dog", ["dog"] + ["cat"] * 9) == pytest.approx((9 * 1 / 3) / 10)
    assert vqa_accuracy("dog", ["dog"] * 4 + ["cat"] * 6) == 1.0
    assert vqa_accuracy("a dog", ["dog"]) == 1.0  # single reference (GQA): exact match
    with pytest.raises(ValueError, match="at least one reference"):
        vqa_accuracy("dog", [])


def test_vqa_task_defaults_and_generate_call():
    task = setup(EvlgenVQATask)
    model = FakeModel()
    samples = {"question_id": torch.tensor([7, 8]), "text_input": ["how many?", "how many?"]}
    results = task.valid_step(model, samples)
    assert results == [{"question_id": 7, "answer": "Two"}, {"question_id": 8, "answer": "Two"}]
    _, kwargs = model.calls[0]
    assert kwargs == {"num_beams": 5, "inference_method": "generate", "max_len": 10, "min_len": 1,
                      "prompt": "Question: {} Short answer:", "length_penalty": 0.0}
    assert setup(EvlgenVQATask, num_beams=3, prompt="Q: {} A:").valid_step(model, samples)
    assert model.calls[-1][1]["num_beams"] == 3 and model.calls[-1][1]["prompt"] == "Q: {} A:"


def test_vqa_task_scores_against_dataset_ground_truth(output_dirs):
    task = setup(EvlgenVQATask)
    task.before_evaluation(FakeModel(), GroundTruthDataset({7: ["2"] * 10, 8: ["three"] * 10}))
    metrics = task.after_evaluation([{"question_id": 7, "answer": "Two"}, {"question_id": 8, "answer": "Two"}],
                                    split_name="val", epoch=0)
    assert metrics["accuracy"] == pytest.approx(50.0) and metrics["agg_metrics"] == metrics["accuracy"]
    assert set(metrics) == {"accuracy", "num_questions", "agg_metrics"}  # no question types: no breakdown
    assert json.loads((output_dirs / "metrics_val.json").read_text()) == metrics


class TypedDataset(GroundTruthDataset):
    """A VQA eval dataset whose annotation records carry "question_type", as the shapes world's."""

    def __init__(self, records):
        super().__init__({r["question_id"]: r["answer"] for r in records})
        self.annotation = records


def test_vqa_task_accuracy_per_question_type(output_dirs):
    records = [{"question_id": 1, "question_type": "count", "answer": ["2"] * 10},
               {"question_id": 2, "question_type": "count", "answer": ["3"] * 10},
               {"question_id": 3, "question_type": "color", "answer": ["red"] * 10}]
    task = setup(EvlgenVQATask)
    task.before_evaluation(FakeModel(), TypedDataset(records))
    metrics = task.after_evaluation([{"question_id": q, "answer": a} for q, a in ((1, "two"), (2, "two"), (3, "red"))],
                                    split_name="test", epoch=0)
    assert metrics == {"accuracy": pytest.approx(200 / 3), "num_questions": 3, "agg_metrics": pytest.approx(200 / 3),
                       "accuracy_color": 100.0, "num_questions_color": 1,
                       "accuracy_count": 50.0, "num_questions_count": 2}
    assert json.loads((output_dirs / "metrics_test.json").read_text()) == metrics

    del records[2]["question_type"]
    with pytest.raises(ValueError, match=r"1 annotation records lack 'question_type' .* \[3\]"):
        task.before_evaluation(FakeModel(), TypedDataset(records))


def test_vqa_task_errors(output_dirs):
    task = setup(EvlgenVQATask)
    with pytest.raises(ValueError, match="object has no ground truth: it needs ground_truth"):
        task.before_evaluation(FakeModel(), object())
    task.before_evaluation(FakeModel(), GroundTruthDataset({7: ["2"] * 10}))
    with pytest.raises(KeyError, match="1 question ids have no answers in GroundTruthDataset"):
        task.after_evaluation([{"question_id": 9, "answer": "2"}], split_name="val", epoch=0)


class LavisVQARecords:
    """A LAVIS VQA eval dataset as far as the task sees it: annotation records, no ground_truth()."""

    def __init__(self, records):
        self.annotation = records


def test_vqa_ground_truth_of_lavis_coco_vqa_ok_vqa_and_gqa_records():
    # coco_vqa / ok_vqa eval records carry the 10 human answers as a list; gqa's one answer as a str.
    vqav2 = LavisVQARecords([{"question_id": 262148000, "question": "q", "image": "x.jpg", "answer": ["down"] * 10}])
    gqa = LavisVQARecords([{"question_id": "20968379", "question": "q", "image": "n1.jpg", "answer": "left"}])
    assert vqa_ground_truth(vqav2) == {262148000: ["down"] * 10}
    assert vqa_ground_truth(gqa) == {as_id("20968379"): ["left"]}
    task = setup(EvlgenVQATask)
    task.before_evaluation(FakeModel(), gqa)
    assert task.ground_truth == {as_id("20968379"): ["left"]}


def test_lemmatizer_keeps_all_but_nouns_and_verbs():
    class Token:
        def __init__(self, text, lemma, pos):
            self.text, self.lemma_, self.pos_ = text, lemma, pos

    def nlp(answer):
        table = {"dogs": ("dog", "NOUN"), "running": ("run", "VERB"), "red": ("red", "ADJ"), "is": ("be", "AUX")}
        return [Token(w, *table[w]) for w in answer.split()]

    assert lemmatize_with(nlp, ["dogs running", "red", "is running"]) == ["dog run", "red", "is run"]


def test_lemmatizer_without_its_model_names_the_install_command(monkeypatch):
    import lavis_evlgen.common.lemmatize as lemmatize_module

    lemmatize_module._nlp.cache_clear()
    monkeypatch.setattr(lemmatize_module, "SPACY_MODEL", "en_core_web_nope")
    with pytest.raises((OSError, ImportError), match="python -m spacy download en_core_web_nope"):
        lemmatize_module.lemmatize(["dogs"])
    lemmatize_module._nlp.cache_clear()


# ---------------------------------------------------------------------- captioning
CAPTION_RUN = {"num_beams": 5, "max_len": 30, "min_len": 8, "evaluate": True}


def test_caption_ground_truth_sources():
    assert caption_ground_truth(GroundTruthDataset({"3": ("a", "b")})) == {3: ["a", "b"]}

    coco = SimpleNamespace(annotation=[
        {"image": "val2014/COCO_val2014_000000391895.jpg", "caption": ["a man", "a person"]},
        {"image": "val2014/COCO_val2014_000000000042.jpg", "caption": "a cat"},
    ])
    assert caption_ground_truth(coco) == {391895: ["a man", "a person"], 42: ["a cat"]}

    mapped = SimpleNamespace(img_ids={"coco_9": 0, "coco_4": 1}, annotation=[
        {"image": "x.jpg", "image_id": "coco_9", "caption": "one"},
        {"image": "x.jpg", "image_id": "coco_9", "caption": "two"},
        {"image": "y.jpg", "image_id": "coco_4", "caption": "three"},
    ])
    assert caption_ground_truth(mapped) == {0: ["one", "two"], 1: ["three"]}

    with pytest.raises(ValueError, match="SimpleNamespace has no ground truth"):
        caption_ground_truth(SimpleNamespace(annotation=[{"image": "x.jpg"}]))


def test_caption_ground_truth_of_video_records_is_keyed_as_the_samples(tmp_path):
    """MSR-VTT's eval records name the media ``video``; LAVIS's VideoCaptionEvalDataset hands out their
    ``image_id`` as it is, and the references must carry the same keys."""
    from lavis.datasets.datasets.video_caption_datasets import VideoCaptionEvalDataset

    records = [{"video": "video7010.mp4", "caption": ["a man sings", "a man is singing"], "image_id": "video7010"},
               {"video": "video7011.mp4", "caption": "a cat runs", "image_id": "video7011"}]
    (tmp_path / "cap_test.json").write_text(json.dumps(records))
    dataset = VideoCaptionEvalDataset(lambda path: torch.zeros(3, 4, 8, 8), None, str(tmp_path),
                                      [str(tmp_path / "cap_test.json")])
    gts = caption_ground_truth(dataset)
    assert gts == {"video7010": ["a man sings", "a man is singing"], "video7011": ["a cat runs"]}
    assert {as_id(dataset[i]["image_id"]) for i in range(len(dataset))} == set(gts)

    with pytest.raises(ValueError, match="'video', 'image_id' and 'caption'"):
        caption_ground_truth(SimpleNamespace(annotation=[{"video": "v.mp4", "caption": "a cat"}]))


def test_caption_prompt_goes_to_generate():
    samples = {"image": torch.zeros(2, 3), "image_id": torch.tensor([5, 6])}
    model = FakeModel()
    results = setup(EvlgenCaptionTask, **CAPTION_RUN, prompt="a photo of").valid_step(model, samples)
    assert results == [{"caption": "a dog", "image_id": 5}, {"caption": "a dog", "image_id": 6}]
    sent, kwargs = model.calls[0]
    assert sent["prompt"] == "a photo of" and "prompt" not in samples
    assert kwargs == {"use_nucleus_sampling": False, "num_beams": 5, "max_length": 30, "min_length": 8}

    setup(EvlgenCaptionTask, **CAPTION_RUN).valid_step(model, samples)
    assert "prompt" not in model.calls[-1][0]


def test_caption_repetition_penalty_is_a_run_key_passed_to_every_model():
    samples = {"image": torch.zeros(2, 3), "image_id": torch.tensor([5, 6])}
    model = FakeModel()
    setup(EvlgenCaptionTask, **CAPTION_RUN, repetition_penalty=1.2).valid_step(model, samples)
    assert model.calls[-1][1]["repetition_penalty"] == 1.2
    setup(EvlgenCaptionTask, **CAPTION_RUN, repetition_penalty=None).valid_step(model, samples)
    assert "repetition_penalty" not in model.calls[-1][1]  # each model's own default
    with pytest.raises(ValueError, match="run.repetition_penalty: expected a positive number or null, got -1"):
        setup(EvlgenCaptionTask, **CAPTION_RUN, repetition_penalty=-1)


def test_caption_metrics_and_agg(output_dirs, monkeypatch):
    scored = {}

    def fake_score(gts, res):
        scored.update(gts=gts, res=res)
        return {"Bleu_4": 0.25, "CIDEr": 1.5}

    monkeypatch.setattr(captioning, "score_captions", fake_score)
    task = setup(EvlgenCaptionTask, **CAPTION_RUN)
    task.before_evaluation(FakeModel(), GroundTruthDataset({1: ["a dog"], 2: ["a cat"], 3: ["a bus"]}))
    metrics = task.after_evaluation([{"caption": "a dog", "image_id": 1}, {"caption": "a cow", "image_id": 2}],
                                    split_name="test", epoch="best")
    assert metrics["agg_metrics"] == pytest.approx(1.75)
    assert not [k for k in metrics if k.startswith("scene_")]  # no grounded_scores: caption metrics only
    assert scored["res"] == {1: ["a dog"], 2: ["a cow"]} and scored["gts"] == {1: ["a dog"], 2: ["a cat"]}
    assert json.loads((output_dirs / "metrics_test.json").read_text()) == metrics
    assert (output_dirs / "result" / "test_epochbest.json").is_file()

    with pytest.raises(KeyError, match="1 generated image ids have no reference in GroundTruthDataset"):
        task.after_evaluation([{"caption": "a dog", "image_id": 9}], split_name="test", epoch=0)
