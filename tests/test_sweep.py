"""The r sweep (run_scripts/sweep_r.py, lavis_evlgen/experiments/sweep.py): its points, its budget
options, its table and figure, and the command end to end on tiny models."""
import importlib.util
import json
from pathlib import Path

import pytest
from PIL import Image

from lavis_evlgen.experiments import sweep

REPO = Path(__file__).resolve().parents[1]
BASE_CONFIG = REPO / "projects/compare/mini/evlgen_two_layers.yaml"


def test_points_of_the_mini_sweep():
    points = sweep.sweep_points(65, 2, [29, 65, 49, 33, 17], [2, 3, 6], 29)
    assert [p.key for p in points] == [
        "tomeformer_L2_t65", "tomeformer_L2_t49", "tomeformer_L2_t33", "tomeformer_L2_t29", "tomeformer_L2_t17",
        "avgpool_L2_t49", "avgpool_L2_t33", "avgpool_L2_t29", "avgpool_L2_t17",
        "tomeformer_L3_t29", "tomeformer_L6_t29", "mlp_t65"]
    by_key = {p.key: p for p in points}
    assert by_key["tomeformer_L2_t65"].r == (0, 0)  # every token kept, through the same BERT
    assert by_key["tomeformer_L2_t17"].r == (32, 16)  # r=24 twice would be capped at 21 tokens
    assert by_key["avgpool_L2_t29"].r == by_key["tomeformer_L2_t29"].r == (18, 18)
    assert by_key["tomeformer_L6_t29"].options() == ["model.connector=tomeformer", "model.num_layers=6",
                                                    "model.tome_r=[6,6,6,6,6,6]"]
    assert by_key["mlp_t65"].options() == ["model.connector=mlp"]


def test_unreachable_points_are_refused_before_any_job():
    with pytest.raises(ValueError, match="65 tokens cannot reach 29 in 1 layer"):
        sweep.sweep_points(65, 2, [29], [1], 29)


def test_budget_options():
    assert sweep.budget_options(BASE_CONFIG, ["run.seed=3"], None, True) == ["run.seed=3", "run.feature_cache=True"]
    # The config validates every 100 steps: a 40-step budget trains one chunk of 40, not 100.
    assert sweep.budget_options(BASE_CONFIG, [], 40, False) == [
        "run.feature_cache=False", "run.max_iters=40", "run.iters_per_inner_epoch=40"]
    assert sweep.budget_options(BASE_CONFIG, [], 200, True)[1:] == ["run.max_iters=200"]


def fake_run(seed: int, cider: float, minutes: float) -> dict:
    return {"seed": seed, "steps": 200, "train_seconds": 60 * minutes, "wall_seconds": 90 * minutes,
            "val": {"CIDEr": cider, "BLEU-4": 30.0, "count acc": cider / 2, "pair F1": 5.0}}


def test_table_verdicts_and_figure(tmp_path):
    points = sweep.sweep_points(65, 2, [65, 29], [3], 29)
    scores = {"tomeformer_L2_t65": (90, 92, 2.0), "tomeformer_L2_t29": (80, 84, 1.0),
              "avgpool_L2_t29": (60, 62, 1.0), "tomeformer_L3_t29": (70, 75, 1.5), "mlp_t65": (85, 86, 0.5)}
    summaries = [sweep.point_summary(p, [fake_run(0, scores[p.key][0], scores[p.key][2]),
                                         fake_run(1, scores[p.key][1], scores[p.key][2])], 1000) for p in points]
    summary = {"command": "python run_scripts/sweep_r.py", "date": "today", "machine": "here", "nproc": 2,
               "seeds": [0, 1], "options": [], "num_tokens": 65, "base_layers": 2, "steps": 200, "wall_minutes": 1,
               "points": summaries, "verdicts": sweep.verdicts(summaries, 65, 2)}
    assert ("- ToMe r=[18, 18], 2 layers vs avg pool to 29, 2 BERT layers, val CIDEr: 82.0 ± 2.8 vs 61.0 ± 1.4: "
            "difference +21.0, exceeds the spread") in summary["verdicts"]
    assert any("ToMe r=[0, 0], 2 layers 2.00 ± 0.00 min, ToMe r=[18, 18], 2 layers 1.00 ± 0.00 min (every token: 2.00x the time)" in line
               for line in summary["verdicts"])
    table = sweep.markdown(summary)
    assert "| avg pool to 29, 2 BERT layers | avgpool | 2 | [18, 18] | 29 | 0.00M | 1.00 ± 0.00 | 61.0 ± 1.4 |" in table
    assert "| MLP projector, all 65 tokens | mlp | — | — | 65 |" in table
    sweep.plot(summary, tmp_path / "r_sweep.png")
    with Image.open(tmp_path / "r_sweep.png") as image:
        assert image.format == "PNG" and image.size[0] > 1000


def load_launcher():
    spec = importlib.util.spec_from_file_location("sweep_r", REPO / "run_scripts/sweep_r.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_sweep_end_to_end_on_tiny_models(tmp_path):
    """Three points (merging and pooling to 33 tokens, the MLP on all 65), one seed, two steps each,
    on the tiny builtins, through the feature cache; no test split (val scores only)."""
    world = [f"datasets.shapes_caption.build_info.{k}={v}" for k, v in {"num_train": 16, "num_val": 8,
                                                                         "num_test": 8}.items()]
    argv = ["--seeds", "0", "--nproc", "1", "--tokens", "33", "--layers", "--max-iters", "2",
            "--output-dir", str(tmp_path / "out"), "--results-dir", str(tmp_path / "results"),
            "--options", "model.model_type=tiny", "run.batch_size_train=4", "run.batch_size_eval=8",
            "run.num_beams=1", "run.max_len=5", "run.test_splits=[]", *world]
    launcher = load_launcher()
    summary = launcher.main(argv)
    assert [p["key"] for p in summary["points"]] == ["tomeformer_L2_t33", "avgpool_L2_t33", "mlp_t65"]
    assert summary["num_tokens"] == 65 and summary["steps"] == 2
    for p in summary["points"]:
        (run,) = p["per_seed"]
        assert run["train_seconds"] > 0 and 0 <= run["val"]["CIDEr"] and 0 <= run["val"]["count acc"] <= 100
        assert "run.feature_cache=True" in run["options"] and "test" not in p["stats"]
    params = {p["key"]: p["trainable_params"] for p in summary["points"]}
    assert params["mlp_t65"] < params["avgpool_L2_t33"] == params["tomeformer_L2_t33"]
    assert "ToMe r=[16, 16], 2 layers vs avg pool to 33, 2 BERT layers, val CIDEr" in summary["verdicts"][0]
    results = tmp_path / "results"
    assert json.loads((results / "results.json").read_text())["points"] == summary["points"]
    table = (results / "results.md").read_text()
    assert all(p["label"] in table for p in summary["points"]) and "sweep_r.py --seeds 0" in table
    with Image.open(results / "r_sweep.png") as image:
        assert image.format == "PNG"
    # A finished (point, seed) is reused, not retrained.
    again = launcher.main(argv)
    assert [p["per_seed"] for p in again["points"]] == [p["per_seed"] for p in summary["points"]]
