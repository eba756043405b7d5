"""The comparison (run_scripts/compare_mini.py, lavis_evlgen/experiments/compare.py) end to end on tiny
models and a tiny budget, over seeds."""
import importlib.util
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from lavis_evlgen.common.run_config import load_config
from lavis_evlgen.experiments import compare as experiment

REPO = Path(__file__).resolve().parents[1]
ROW_CONFIGS = REPO / "projects/compare/mini"
# Each mini row on the tiny builtins: the tiny BERT has 2 layers, so "full depth" is 2 and "half" 1.
TINY_MODELS = {
    "blip2_stage1": {"model_type": "tiny"},
    "blip2_stage2": {"model_type": "tiny"},
    "blip2_one_stage": {"model_type": "tiny"},
    "evlgen_full_depth": {"model_type": "tiny", "num_layers": 2, "tome_r": 16},
    "evlgen_half_depth": {"model_type": "tiny", "num_layers": 1, "tome_r": 16},
    "evlgen_tenth_data": {"model_type": "tiny", "num_layers": 2, "tome_r": 16},
    "evlgen_two_layers": {"model_type": "tiny"},
}
WORLD = {"num_train": 16, "num_val": 8, "num_test": 8}
EVAL = ["run.batch_size_eval=8", "run.num_beams=1", "run.max_len=5"]


def load_compare():
    spec = importlib.util.spec_from_file_location("compare_mini", REPO / "run_scripts/compare_mini.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_row_configs(directory: Path) -> Path:
    """The committed row configs (their bases merged in) with their models swapped for tiny ones."""
    directory.mkdir()
    for name, model in TINY_MODELS.items():
        cfg = load_config(ROW_CONFIGS / f"{name}.yaml")
        cfg.model = OmegaConf.merge(cfg.model, model)
        OmegaConf.save(cfg, directory / f"{name}.yaml")
    return directory


def compare_argv(tmp_path, rows, results="results", seeds=(0,)):
    world = [f"datasets.shapes_caption.build_info.{k}={v}" for k, v in WORLD.items()]
    vqa_world = [f"datasets.shapes_vqa.build_info.{k}={v}" for k, v in WORLD.items()]
    return ["--seeds", *map(str, seeds), "--nproc", "1", "--config-dir", str(tmp_path / "configs"),
            "--output-dir", str(tmp_path / "out"),
            "--results-dir", str(tmp_path / results), "--rows", *rows,
            "--options", "run.max_iters=4", "run.iters_per_inner_epoch=2", "run.batch_size_train=4", *EVAL, *world,
            "--vqa-options", *EVAL, *vqa_world]


def run_compare(tmp_path, rows):
    compare = load_compare()
    tiny_row_configs(tmp_path / "configs")
    return compare, compare.main(compare_argv(tmp_path, rows))


def check_outputs(summary, results: Path, rows, seeds=(0,)):
    assert [r["key"] for r in summary["rows"]] == rows
    for r in summary["rows"]:
        assert r["seeds"] == list(seeds) and len(r["per_seed"]) == len(seeds)
        for run in r["per_seed"]:
            assert [p["iters"] for p in run["curve"]] == [2, 4]
            times = [p["train_seconds"] for p in run["curve"]]
            assert 0 < times[0] < times[1] <= run["train_seconds"] + 0.1
            assert run["steps"] == 4 * len(run["stages"])
            assert all(0 <= run[split]["CIDEr"] for split in ("val", "test", "val_blind"))
            # Scene-grounded scores and per-type VQA ride along with every evaluation.
            assert 0 <= run["val"]["count acc"] <= 100 and "held-out pair recall" in run["test"]
            assert set(run["vqa"]) == {"all", "count", "colour", "shape", "position"}
        cider = r["stats"]["val"]["CIDEr"]
        assert cider["n"] == len(seeds)
        assert cider["mean"] == pytest.approx(sum(run["val"]["CIDEr"] for run in r["per_seed"]) / len(seeds))
        assert all(p > 0 for p in r["trainable_params"])
    on_disk = json.loads((results / "results.json").read_text())
    assert on_disk["rows"] == summary["rows"]
    table = (results / "results.md").read_text()
    for r in summary["rows"]:
        assert r["label"] in table
    assert "its blind twin" in table  # the verdicts section
    with Image.open(results / "convergence.png") as image:
        assert image.format == "PNG" and image.size[0] > 400


@pytest.mark.slow
def test_compare_two_rows_end_to_end(tmp_path):
    rows = ["blip2_two_stage", "evlgen_half_depth"]
    compare, summary = run_compare(tmp_path, rows)
    check_outputs(summary, tmp_path / "results", rows)
    blip2, evlgen = summary["rows"]
    # BLIP-2 two-stage: stage 2 started from stage 1's checkpoint; its curve starts after stage 1.
    (run,) = blip2["per_seed"]
    assert len(run["stages"]) == 2 and run["curve"][0]["train_seconds"] > run["stages"][0]["train_seconds"]
    assert "blip2_stage1" in (tmp_path / "out/seed0/blip2_two_stage/blip2_stage2.log").read_text()
    # The target is 0.95 x BLIP-2's best val CIDEr, which BLIP-2 itself reaches by its best point.
    assert summary["target"]["value"] == pytest.approx(0.95 * run["val"]["CIDEr"], abs=0.01)
    if run["val"]["CIDEr"] > 0:
        assert blip2["blip2_two_stage_time_ratio"] == 1.0
    # The paper's rows sit beside the measured ones.
    assert blip2["paper"]["coco_val_cider"] == 137.7 and evlgen["paper"]["trainable_params"] == "55M"
    assert "137.7" in (tmp_path / "results/results.md").read_text()
    # A finished (row, seed) is reused, not retrained; a second seed adds runs to the mean.
    alone = compare.main(compare_argv(tmp_path, ["evlgen_half_depth"], results="results2", seeds=(0, 1))
                         + ["--reference", str(tmp_path / "results/results.json")])
    check_outputs(alone, tmp_path / "results2", ["evlgen_half_depth"], seeds=(0, 1))
    assert alone["rows"][0]["per_seed"][0] == evlgen["per_seed"][0]
    assert "--seeds 0 1" in alone["command"]
    # A run without BLIP-2 takes its target and BLIP-2 line from an earlier results.json.
    assert alone["target"]["value"] == summary["target"]["value"]
    assert alone["reference_row"]["key"] == "blip2_two_stage"
    # Reusing a run made with other options is refused, naming the file.
    with pytest.raises(FileExistsError, match="row.json was made with options"):
        experiment.finished_run(tmp_path / "out/seed0/evlgen_half_depth", ["run.seed=7"])


def test_every_row_has_a_config_and_at_most_one_paper_row():
    assert set(experiment.HEADLINE_ROWS) <= {row.key for row in experiment.ROWS}
    for row in experiment.ROWS:
        assert all((ROW_CONFIGS / f"{name}.yaml").is_file() for name in row.configs)
        if row.paper is not None:
            assert experiment.paper_row(row.paper)["model"] == row.paper["model"]


def test_every_row_builds_its_models(tmp_path):
    """prepare() builds each row's model(s) from its config (tiny parts) and counts what trains."""
    world = [f"datasets.shapes_caption.build_info.{k}={v}" for k, v in WORLD.items()]
    params = experiment.prepare(tiny_row_configs(tmp_path / "configs"), experiment.ROWS, world)
    assert set(params) == {row.key for row in experiment.ROWS}
    assert all(len(params[row.key]) == len(row.configs) and min(params[row.key]) > 0 for row in experiment.ROWS)
    assert params["evlgen_half_depth"][0] < params["evlgen_full_depth"][0] == params["evlgen_tenth_data"][0]
