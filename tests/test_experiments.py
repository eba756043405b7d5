"""The experiment library behind run_mini.py and probe_mini.py: statistics over seeds, tables, resume
rules, linear probes (tiny world and model)."""
import json
import math
import re

import pytest
import torch

from lavis_evlgen.datasets.shapes_world import COLORS, SHAPES
from lavis.models import load_model_and_preprocess

from lavis_evlgen.experiments import mini, report
from lavis_evlgen.experiments.probe import (TARGETS, probe_accuracy, probe_model, scene_labels, set_f1, set_targets,
                                           supervised_connector)


def test_mean_std_and_format():
    stat = report.mean_std([1.0, 2.0, 3.0])
    assert stat["mean"] == 2.0 and stat["std"] == 1.0 and stat["n"] == 3
    assert report.fmt(stat) == "2.0 ± 1.0"
    assert report.fmt(report.mean_std([5.0])) == "5.0"  # one seed: no spread to show
    assert report.fmt(None) == "—"
    with pytest.raises(ValueError):
        report.mean_std([])


def test_exceeds_spread():
    a, b = report.mean_std([10.0, 12.0]), report.mean_std([15.0, 17.0])  # std 1.41 each
    assert report.exceeds_spread(a, b)
    assert not report.exceeds_spread(a, report.mean_std([12.0, 14.0]))


def test_aggregate_drops_keys_missing_in_a_run():
    stats = report.aggregate([{"x": 1.0, "y": 2.0}, {"x": 3.0}])
    assert set(stats) == {"x"} and stats["x"]["mean"] == 2.0


def test_caption_and_vqa_scores_name_columns():
    metrics = {"CIDEr": 0.5, "Bleu_4": 0.25, "METEOR": 0.2, "ROUGE_L": 0.4, "scene_count_acc": 90.0,
               "scene_pair_f1": 80.0, "agg_metrics": 0.75}
    scores = report.caption_scores(metrics)
    assert scores["CIDEr"] == 50.0 and scores["count acc"] == 90.0 and scores["pair F1"] == 80.0
    assert "held-out pair recall" not in scores  # val has no held-out pairs: left out, not 0
    assert report.vqa_scores({"accuracy": 40.0, "accuracy_color": 20.0}) == {"all": 40.0, "colour": 20.0}
    # The video world's metrics (datasets/video_scene_scores.py) get its labels; colour and pair
    # scores of the image world's table are not read from them.
    video = {"CIDEr": 0.5, "Bleu_4": 0.25, "METEOR": 0.2, "ROUGE_L": 0.4, "scene_event_f1": 30.0,
             "scene_color_f1": 70.0, "scene_pair_f1": 60.0, "scene_held_out_recall": 5.0, "scene_order_acc": 50.0}
    assert report.caption_scores(video) == {"CIDEr": 50.0, "BLEU-4": 25.0, "METEOR": 20.0, "ROUGE-L": 40.0,
                                            "event F1": 30.0, "colour F1": 70.0, "order acc": 50.0,
                                            "held-out event recall": 5.0}


def test_seed_options_set_training_and_world_seed():
    assert mini.seed_options(2, "shapes_vqa") == ["run.seed=2", "datasets.shapes_vqa.build_info.seed=2"]


def _fake_result(seed, cider):
    split = {"CIDEr": cider, "count acc": 90.0 + seed}
    return {"seed": seed, "model_type": "mini", "options": [], "train_wall_seconds": 60, "wall_seconds": 120,
            "scores": {"EVLGen": {"val": split, "test": split, "vqa": {"all": 30.0}},
                       "blind (shuffled soft prompts)": {"val": split, "test": split, "vqa": {"all": 20.0}}}}


def test_finished_seed_is_reused_only_with_the_same_settings(tmp_path):
    assert mini.finished_seed(tmp_path, 0, "mini", []) is None
    (tmp_path / "scores.json").write_text(json.dumps(_fake_result(0, 50.0)))
    assert mini.finished_seed(tmp_path, 0, "mini", [])["seed"] == 0
    with pytest.raises(FileExistsError, match="scores.json holds seed 0.*another --output-dir"):
        mini.finished_seed(tmp_path, 0, "mini", ["model.vit_layer=5"])


def test_reevaluate_evaluates_the_finished_checkpoint_again_without_training(tmp_path, monkeypatch):
    """--reevaluate: evaluation jobs only (trained and blind), the recorded training time kept."""
    checkpoint = tmp_path / "train" / "checkpoint_best.pth"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"weights")
    out = tmp_path / "seed0"
    out.mkdir()
    (out / "scores.json").write_text(json.dumps({**_fake_result(0, 50.0), "nproc": 1, "checkpoint": str(checkpoint)}))
    launched = []

    def fake_launch(script, cfg, nproc, job_dir, options, log):
        launched.append((script, cfg.name, options))
        job_dir.mkdir(parents=True, exist_ok=True)
        metrics = {"accuracy": 40.0} if cfg.name == "vqa.yaml" else {
            "CIDEr": 0.7, "Bleu_4": 0.3, "METEOR": 0.2, "ROUGE_L": 0.5, "scene_count_acc": 96.0, "scene_pair_f1": 90.0, "scene_repeated": 2}
        for split in ("val", "test"):
            (job_dir / f"metrics_{split}.json").write_text(json.dumps(metrics))
        return job_dir

    monkeypatch.setattr(mini, "launch_job", fake_launch)
    monkeypatch.setattr(mini, "prepare", lambda *args: None)
    summary = mini.run_main_job([0], "mini", 1, tmp_path, [], [], command="test", reevaluate=True)
    assert [script for script, _, _ in launched] == ["evaluate.py"] * 4
    assert all(f"model.finetuned={checkpoint}" in options for _, _, options in launched)
    result = json.loads((out / "scores.json").read_text())
    assert result["train_wall_seconds"] == 60 and result["scores"]["EVLGen"]["val"]["CIDEr"] == 70.0
    assert result["scores"]["EVLGen"]["val"]["repeated"] == 2.0 and "evaluated" in result
    assert summary["scores"]["EVLGen"]["val"]["count acc"]["mean"] == 96.0

    checkpoint.unlink()
    with pytest.raises(FileNotFoundError, match="checkpoint_best.pth .*scores.json.* is missing"):
        mini.run_main_job([0], "mini", 1, tmp_path, [], [], command="test", reevaluate=True)


def test_summary_tables_hold_mean_and_spread():
    results = [_fake_result(0, 50.0), _fake_result(1, 60.0)]
    summary = {"command": "python run_scripts/run_mini.py --seeds 0 1", "date": "2026-01-01", "machine": "m",
               "nproc": 2, "seeds": [0, 1], "wall_minutes": 4.0, "train_minutes": report.mean_std([1.0, 1.0]),
               "scores": mini.summarize(results)}
    text = mini.markdown(summary)
    assert "| EVLGen, val | 55.0 ± 7.1 |" in text
    assert "90.5 ± 0.7" in text  # count acc
    assert "| blind (shuffled soft prompts) | 20.0 ± 0.0 |" in text


def test_probe_accuracy_separates_signal_from_noise():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (300,), generator=g)
    signal = torch.nn.functional.one_hot(labels, 3).float() + 0.1 * torch.randn(300, 3, generator=g)
    noise = torch.randn(300, 3, generator=g)
    assert probe_accuracy(signal[:200], labels[:200], signal[200:], labels[200:]) > 95
    assert probe_accuracy(noise[:200], labels[:200], noise[200:], labels[200:]) < 60


@pytest.mark.slow
def test_probe_model_reports_every_stage(tmp_path):
    from lavis_evlgen.datasets.shapes_world import generate_shapes_world

    world = generate_shapes_world(tmp_path / "world", seed=0, num_train=12, num_val=6, num_test=2, image_size=64)
    labels = scene_labels(json.loads((world / "scenes_val.json").read_text()))
    assert labels["colour set"].shape == (6, 6) and labels["count"].max() <= 2
    torch.manual_seed(0)
    model, vis, _ = load_model_and_preprocess("evlgen_vicuna", "tiny", is_eval=True)
    results = probe_model(model, vis["eval"], world, num_train=12, num_val=6)
    assert {"chance", "ViT layer 1", "ViT layer 2", "connector output", "soft prompts"} <= set(results)
    assert all(set(scores) == set(TARGETS) for scores in results.values())


def test_set_targets_and_f1_count_pairs_of_the_scene():
    scenes = [{"objects": [{"color": "red", "shape": "star"}, {"color": "blue", "shape": "circle"}]}]
    truth = set_targets(scenes)
    assert truth.shape == (1, 34) and truth.sum() == 2 + 2 + 2
    assert set_f1(truth, truth) == {"colour F1": 100.0, "shape F1": 100.0, "pair F1": 100.0}
    swapped = set_targets([{"objects": [{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "star"}]}])
    assert set_f1(swapped, truth) == {"colour F1": 100.0, "shape F1": 100.0, "pair F1": 0.0}


def test_supervised_connector_trains_only_the_trainable_parts(tmp_path):
    from lavis_evlgen.datasets.shapes_world import generate_shapes_world

    world = generate_shapes_world(tmp_path / "world", seed=0, num_train=12, num_val=6, num_test=2, image_size=64)
    torch.manual_seed(0)
    model, vis, _ = load_model_and_preprocess("evlgen_vicuna", "tiny", is_eval=True)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("visual_encoder.", "llm."))}
    rows = supervised_connector(model, vis["eval"], world, steps=4, every=2, batch_size=4, num_train=12, num_val=6)
    assert [row["step"] for row in rows] == [2, 4]
    assert all(0.0 <= row["pair F1"] <= 100.0 and math.isfinite(row["loss"]) for row in rows)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())


def test_text_ceiling_scores_what_the_llm_writes_after_the_scene_list(tmp_path):
    """An LLM that copies its context (the scene list) is perfect on colour-shape pairs; one that
    ignores it is not: the ceiling reads the context the model was given, scene by scene."""
    from types import SimpleNamespace

    from lavis_evlgen.assets.text_lm import OBJECT_TOKENS, train_tokenizer
    from lavis_evlgen.datasets.shapes_world import generate_shapes_world
    from lavis_evlgen.experiments.probe import text_ceiling

    world = generate_shapes_world(tmp_path / "world", seed=0, num_train=4, num_val=6, num_test=2, image_size=64)
    tokenizer = train_tokenizer([f"a {c} {s}, " for c in COLORS for s in SHAPES], vocab_size=300, added_tokens=OBJECT_TOKENS)

    class Echo:
        """Writes the object tokens of its context in words ("red circle, "), or always ``fixed``."""
        def __init__(self, fixed=None):
            self.fixed = fixed

        def generate(self, input_ids, attention_mask, eos_token_id, pad_token_id, **kwargs):
            contexts = tokenizer.batch_decode(input_ids, skip_special_tokens=True)
            said = [self.fixed or re.sub(r"<([a-z]+)_([a-z]+)>", r"\1 \2, ", c) for c in contexts]
            return torch.cat([input_ids, tokenizer(said, return_tensors="pt", padding=True).input_ids], 1)

    def model(llm):
        return SimpleNamespace(tokenizer=tokenizer, llm=llm, stop_token_ids=[tokenizer.eos_token_id], eval=lambda: None)

    copied = text_ceiling(model(Echo()), world, "val", batch_size=4)
    assert copied["num_images"] == 6 and copied["pair_f1"] == 100.0 and copied["count_acc"] == 100.0
    fixed = text_ceiling(model(Echo("a red star")), world, "val", batch_size=4)
    assert fixed["num_images"] == 6 and fixed["pair_f1"] < 50.0


def test_shape_copy_probability_is_chance_for_an_llm_that_reads_nothing(tmp_path):
    from types import SimpleNamespace

    from lavis_evlgen.assets.text_lm import train_tokenizer
    from lavis_evlgen.datasets.shapes_world import generate_shapes_world
    from lavis_evlgen.experiments.probe import shape_copy_probability

    world = generate_shapes_world(tmp_path / "world", seed=0, num_train=4, num_val=5, num_test=2, image_size=64)
    tokenizer = train_tokenizer([f"a picture with two shapes, a {c} {s}, " for c in COLORS for s in SHAPES], vocab_size=300)
    uniform = lambda ids: SimpleNamespace(logits=torch.zeros(1, ids.shape[1], len(tokenizer)))
    llm = SimpleNamespace(eval=lambda: uniform)
    result = shape_copy_probability(SimpleNamespace(tokenizer=tokenizer, llm=llm), world, "val", num_images=5)
    scenes = json.loads((world / "scenes_val.json").read_text())
    assert result["objects"] == sum(len(s["objects"]) for s in scenes)
    assert result["with list"] == pytest.approx(1 / len(SHAPES)) and result["without list"] == pytest.approx(1 / len(SHAPES))
