"""The mini MSR-VTT table (experiments/video.py, run_scripts/video_mini.py): where the image
checkpoints come from, what a finished run may be reused for, the summary on fabricated runs, and
(slow) the whole command at tiny size."""
import argparse
import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from lavis_evlgen.experiments import video

REPO = Path(__file__).resolve().parents[1]
ROW_KEYS = [row.key for row in video.ROWS]


def test_rows_are_the_papers_msrvtt_rows_with_a_config_each():
    assert ROW_KEYS == ["concat", "mean", "image", "video", "video_scst"]
    for row in video.ROWS:
        assert (REPO / "projects/video/mini" / f"{row.key}.yaml").is_file()
        assert video.paper_row(row)["model"] == row.label
    assert [row.start for row in video.ROWS] == ["image", "image", None, "image", "video"]


def test_image_checkpoints_per_seed_or_from_a_main_job(tmp_path):
    given = [tmp_path / "a.pth", tmp_path / "b.pth"]
    for path in given:
        path.touch()
    assert video.image_checkpoints([0, 1], given, None) == {0: given[0], 1: given[1]}
    with pytest.raises(ValueError, match="2 paths for 3 seeds"):
        video.image_checkpoints([0, 1, 2], given, None)
    with pytest.raises(ValueError, match="--image-checkpoint .* or --main-job-dir"):
        video.image_checkpoints([0], None, None)

    # run_scripts/run_mini.py's layout: seed<k>/train/<job>/checkpoint_best.pth, named in seed<k>/scores.json when done.
    main = tmp_path / "main"
    unfinished = main / "seed0/train/20260101000/checkpoint_best.pth"
    unfinished.parent.mkdir(parents=True)
    unfinished.touch()
    finished = main / "seed1/train/20260102000/checkpoint_best.pth"
    finished.parent.mkdir(parents=True)
    finished.touch()
    (main / "seed1/train/20260101000").mkdir()  # an earlier, failed job
    (main / "seed1/train/20260101000/checkpoint_best.pth").touch()
    (main / "seed1/scores.json").write_text(json.dumps({"checkpoint": str(finished)}))
    assert video.image_checkpoints([0, 1], None, main) == {0: unfinished, 1: finished}
    with pytest.raises(FileNotFoundError, match=r"seed 2 needs .*seed2/scores.json or exactly one"):
        video.image_checkpoints([2], None, main)
    unfinished.unlink()
    with pytest.raises(FileNotFoundError, match="seed 0 needs"):
        video.image_checkpoints([0], None, main)
    with pytest.raises(FileNotFoundError, match=r"checkpoint of seed 0: .*gone.pth does not exist"):
        video.image_checkpoints([0], [tmp_path / "gone.pth"], None)


def test_a_run_from_another_image_checkpoint_is_not_reused(tmp_path):
    done = tmp_path / "seed0/mean/row.json"
    done.parent.mkdir(parents=True)
    done.write_text(json.dumps({"image_checkpoint": "/ckpt/a.pth"}))
    video.check_reusable(video.ROWS, {0: Path("/ckpt/a.pth")}, tmp_path)
    with pytest.raises(FileExistsError, match=r"seed0/mean/row.json was made from image checkpoint /ckpt/a.pth, "
                                              r"not /ckpt/b.pth"):
        video.check_reusable(video.ROWS, {0: Path("/ckpt/b.pth")}, tmp_path)


def _scores(cider, event_f1):
    return {"CIDEr": cider, "BLEU-4": cider / 3, "METEOR": 20.0, "ROUGE-L": 40.0, "event F1": event_f1,
            "direction acc": 50.0, "change acc": 40.0, "appearance acc": 30.0, "colour F1": 70.0, "order acc": 60.0,
            "held-out event recall": 5.0, "unparseable": 2.0}


def _fabricated_runs(seeds):
    """video > mean > concat beyond the spread on CIDEr; SCST within it; every row above its blind score."""
    cider = {"concat": 40.0, "mean": 50.0, "image": 45.0, "video": 60.0, "video_scst": 61.0}
    runs = {}
    for key, value in cider.items():
        runs[key] = [{"key": key, "seed": seed, "steps": 0 if key == "image" else 10, "train_seconds": 60.0,
                      "wall_seconds": 120.0, "val": _scores(value + seed, 20.0), "test": _scores(value + seed, 20.0 + seed),
                      "val_blind": _scores(10.0 + seed, 5.0)} for seed in seeds]
    return runs


def test_summary_tables_verdicts_and_figure(tmp_path):
    args = argparse.Namespace(config_dir=REPO / "projects/video/mini", options=[], results_dir=tmp_path, nproc=2,
                              seeds=[0, 1], image_checkpoints={0: Path("/a.pth"), 1: Path("/b.pth")},
                              argv=["--main-job-dir", "output/evlgen/mini", "--seeds", "0", "1"])
    summary = video.summarize(list(video.ROWS), _fabricated_runs([0, 1]), args)
    assert [r["key"] for r in summary["rows"]] == ROW_KEYS
    video_row = summary["rows"][3]
    assert video_row["stats"]["test"]["CIDEr"]["mean"] == 60.5 and video_row["paper"]["C"] == 69.8
    assert summary["clips"] == {"train": 200, "val": 24, "test": 24}
    assert summary["command"] == "python run_scripts/video_mini.py --main-job-dir output/evlgen/mini --seeds 0 1"
    verdicts = "\n".join(summary["verdicts"])
    assert ("- temporal > mean: EVLGen-video vs Baseline (mean), test CIDEr: 60.5 ± 0.7 vs 50.5 ± 0.7, "
            "difference +10.0, exceeds the spread: the miniature agrees; paper (MSR-VTT test CIDEr): 69.8 vs 67.8 (+2.0)"
            in verdicts)
    assert "- mean > concat: Baseline (mean) vs Baseline (concat), test CIDEr" in verdicts
    assert ("- SCST helps: EVLGen-video-scst vs EVLGen-video, test CIDEr: 61.5 ± 0.7 vs 60.5 ± 0.7, difference +1.0, "
            "within the spread: the miniature cannot tell" in verdicts)
    assert "test event F1: 20.5 ± 0.7 vs 20.5 ± 0.7, difference +0.0, within the spread" in verdicts
    assert "- EVLGen-image vs its blind score, val CIDEr: 45.5 ± 0.7 vs 10.5 ± 0.7, difference +35.0, exceeds" in verdicts

    table = (tmp_path / "results.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == json.loads(json.dumps(summary["rows"]))
    assert "| EVLGen-video-scst | 10 | 61.5 ± 0.7 |" in table and "| 74.0 | 49.2 | 33.0 | 66.5 |" in table
    assert "| Baseline (concat) | 20.5 ± 0.7 |" in table  # scene table: event F1 first
    with Image.open(tmp_path / "video_table.png") as image:
        assert image.format == "PNG" and image.size[0] > 800

    one_seed = video.summarize(list(video.ROWS), _fabricated_runs([0]), argparse.Namespace(**{**vars(args), "seeds": [0]}))
    assert all("one seed: no spread to compare against" in line for line in one_seed["verdicts"])


def load_launcher():
    spec = importlib.util.spec_from_file_location("video_mini", REPO / "run_scripts/video_mini.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    return launcher


def tiny_config_dir(tmp_path) -> Path:
    """The mini rows' own files on the tiny video config: a base.yaml that is projects/video/tiny/caption.yaml."""
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    (config_dir / "base.yaml").write_text(f"base: {REPO / 'projects/video/tiny/caption.yaml'}\n")
    for key in ROW_KEYS:
        (config_dir / f"{key}.yaml").write_text((REPO / "projects/video/mini" / f"{key}.yaml").read_text())
    return config_dir


def tiny_image_checkpoint(path: Path) -> Path:
    from lavis_evlgen.common.checkpoint import trainable_state_dict
    from lavis_evlgen.models import EVLGenVicuna

    torch.manual_seed(0)
    model = EVLGenVicuna.from_config(OmegaConf.load(EVLGenVicuna.default_config_path("tiny")).model)
    torch.save({"model": trainable_state_dict(model), "arch": "evlgen_vicuna", "model_type": "tiny"}, path)
    return path


def _finite(value) -> bool:
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


@pytest.mark.slow
def test_video_table_end_to_end_at_tiny_size(tmp_path):
    """Every row of one seed at tiny size (2 steps; SCST from the video row), on one process per job to
    spare the CPU; the second call reuses every finished run."""
    checkpoint = tiny_image_checkpoint(tmp_path / "image.pth")
    argv = ["--seeds", "0", "--nproc", "1", "--image-checkpoint", str(checkpoint),
            "--config-dir", str(tiny_config_dir(tmp_path)), "--output-dir", str(tmp_path / "out"),
            "--results-dir", str(tmp_path / "results"), "--options", "run.max_iters=2", "run.iters_per_inner_epoch=2",
            "model.scst_group_size=2", "model.scst_max_len=6"]
    summary = load_launcher().main(argv)
    assert [r["key"] for r in summary["rows"]] == ROW_KEYS
    for r in summary["rows"]:
        assert set(r["stats"]) == {"val", "val_blind", "test"} and r["steps"] == (0 if r["key"] == "image" else 2)
        assert {"CIDEr", "BLEU-4", "METEOR", "ROUGE-L", "event F1"} <= set(r["stats"]["test"])
        assert "CIDEr" in r["stats"]["val_blind"] and _finite(r["stats"])
    runs = {r["key"]: r["per_seed"][0] for r in summary["rows"]}
    assert runs["video_scst"]["start_checkpoint"] == runs["video"]["checkpoint"]
    assert runs["video"]["start_checkpoint"] == runs["image"]["checkpoint"] == str(checkpoint)
    refs = json.loads((tmp_path / "out/seed0/video_scst/scst_references.json").read_text())
    assert len(refs) == 4  # the tiny world's 4 training clips
    assert re.search(r"prefix_ablation\W+shuffle", (tmp_path / "out/seed0/mean/blind.log").read_text())
    assert len(summary["verdicts"]) == 3 * 2 + 5
    assert (tmp_path / "results/video_table.png").is_file() and "EVLGen-video-scst" in (tmp_path / "results/results.md").read_text()

    again = load_launcher().main(argv)
    assert [r["per_seed"] for r in again["rows"]] == [r["per_seed"] for r in summary["rows"]]
    assert len(list((tmp_path / "out/seed0/mean/train").iterdir())) == 1  # one training job: reused, not rerun
