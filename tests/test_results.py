"""The results tool (python -m lavis_evlgen.results) on small fabricated run outputs and on the
committed mini summaries: cells are our mean ± std over runs, the paper's number and the difference."""
import json
from pathlib import Path

import pytest

from lavis_evlgen.results import paper as paper_tables
from lavis_evlgen.results import sources
from lavis_evlgen.results.__main__ import main

REPO = Path(__file__).resolve().parents[1]


def caption_metrics(cider: float) -> dict:
    """A caption task's metrics file: pycocoevalcap fractions."""
    return {"Bleu_4": 0.40, "METEOR": 0.30, "ROUGE_L": 0.60, "CIDEr": cider, "agg_metrics": cider + 0.40}


def job(root: Path, name: str, files: dict) -> Path:
    """A LAVIS output dir ``root/name`` holding one job directory with ``files`` (name -> json or text)."""
    directory = root / name / "20270101120000"
    directory.mkdir(parents=True)
    for filename, content in files.items():
        (directory / filename).write_text(content if isinstance(content, str) else json.dumps(content))
    return root / name


@pytest.fixture
def runs(tmp_path):
    log = "\n".join(['{"run": {"task": "evlgen_captioning"},', ' "multi-line": "config"}',
                     json.dumps({"train_seconds": 1800.0}), json.dumps({"val_iters": 1, "val_best_iters": 1}),
                     json.dumps({"train_seconds": 5400.0})])
    return {
        "coco0": job(tmp_path, "coco0", {"metrics_val.json": caption_metrics(1.30), "metrics_test.json": caption_metrics(0.1)}),
        "coco1": job(tmp_path, "coco1", {"metrics_val.json": caption_metrics(1.34)}),
        "vqav2": job(tmp_path, "vqav2", {"metrics_val.json": {"accuracy": 45.0, "agg_metrics": 45.0}}),
        "gqa": job(tmp_path, "gqa", {"metrics_test.json": {"accuracy": 31.5}}),
        "train": job(tmp_path, "train", {"log.txt": log}),
        "nocaps": job(tmp_path, "nocaps", {"metrics_val.json": caption_metrics(1.2)}),
        "video": job(tmp_path, "video", {"metrics_test.json": caption_metrics(0.7)}),
        "two": job(tmp_path, "two", {"metrics_val.json": caption_metrics(1.0), "metrics_test.json": caption_metrics(1.0)}),
    }


def cells(result, table, row):
    (found,) = [r for r in result["tables"][table]["rows"] if r["key"] == row]
    return found["cells"]


def test_run_directories_fill_the_paper_tables_with_the_difference_beside(runs, tmp_path, capsys):
    out = tmp_path / "out"
    result = main(["--out", str(out),
                   "--run", f"zero_shot_main.evlgen_55m:coco={runs['coco0']}",
                   "--run", f"zero_shot_main.evlgen_55m:coco={runs['coco1']}",
                   "--run", f"zero_shot_main.evlgen_55m:vqav2={runs['vqav2']}",
                   "--run", f"zero_shot_main.evlgen_55m:gqa={runs['gqa']}",
                   "--run", f"zero_shot_main.evlgen_55m:train={runs['train']}",
                   "--run", f"zero_shot_captioning.evlgen_opt:nocaps={runs['nocaps']}",
                   "--run", f"msrvtt_captioning.video={runs['video']}"])
    row = cells(result, "zero_shot_main", "evlgen_55m")
    coco = row["coco_val_cider"]
    assert coco["ours"]["values"] == pytest.approx([130.0, 134.0])  # the val split, two runs: two seeds
    assert coco["paper"] == 134.0 and coco["difference"] == pytest.approx(-2.0)
    assert row["vqav2_val"]["difference"] == pytest.approx(45.0 - 45.9)
    assert row["gqa_testdev"]["ours"]["mean"] == 31.5  # the only metrics file, test
    assert row["clock_hours"]["ours"]["mean"] == pytest.approx(2.0) and row["clock_hours"]["paper"] == 47
    assert row["okvqa_test"]["ours"] is None and row["okvqa_test"]["paper"] == 25.8
    nocaps = cells(result, "zero_shot_captioning", "evlgen_opt")
    assert nocaps["nocaps_C"]["difference"] == pytest.approx(120.0 - 117.4)
    assert nocaps["flickr30k_C"] == {"ours": None, "paper": 82.0, "difference": None}
    assert cells(result, "msrvtt_captioning", "video")["C"]["difference"] == pytest.approx(70.0 - 69.8)

    written = json.loads((out / "results.json").read_text())
    assert written["tables"].keys() == {"zero_shot_main", "zero_shot_captioning", "msrvtt_captioning"}
    md = (out / "results.md").read_text()
    assert md == capsys.readouterr().out.split("written: ")[0]
    assert "| EVLGen (104M pairs, 55M trainable, 90k steps) | 45.0 / 45.9 (-0.9) | 31.5 / 30.6 (+0.9) | — / 25.8 " \
           "| 132.0 ± 2.8 / 134.0 (-2.0) | 2.00 / 47 (-45.00) |" in md
    assert "metrics_test.json (the paper reports testdev)" in md
    # The relative table: ours and the paper's as multiples of BLIP-2's, only where BLIP-2 is measured.
    assert written["tables"]["zero_shot_main"]["relative"] == []


def test_run_specs_that_do_not_fit_are_errors_naming_the_choices(runs):
    with pytest.raises(KeyError, match="has no row 'evlgen_55'; rows: .*'evlgen_55m'"):
        sources.from_run_dir(f"zero_shot_main.evlgen_55:coco={runs['coco0']}")
    with pytest.raises(KeyError, match=r"say which benchmark .*:vqav2\|:gqa"):
        sources.from_run_dir(f"zero_shot_main.evlgen_55m={runs['coco0']}")
    with pytest.raises(KeyError, match="unknown table 'main'"):
        sources.from_run_dir(f"main.evlgen_55m:coco={runs['coco0']}")
    with pytest.raises(ValueError, match="expected TABLE.ROW"):
        sources.from_run_dir(str(runs["coco0"]))
    with pytest.raises(FileNotFoundError, match=r"no metrics_testdev\.json, and 2 other metrics files"):
        sources.from_run_dir(f"zero_shot_main.blip2:gqa={runs['two']}")
    with pytest.raises(FileNotFoundError, match="has no log.txt"):
        sources.from_run_dir(f"zero_shot_main.blip2:train={runs['coco0']}")


def compare_summary(per_seed: bool) -> dict:
    def run(seed, cider):
        return {"seed": seed, "val": {"CIDEr": cider}, "vqa": {"all": 30.0 + seed}, "train_seconds": 360.0 * (seed + 1)}

    rows = [("blip2_two_stage", 80.0, 90.0), ("evlgen_half_depth", 100.0, 110.0), ("evlgen_two_layers", 50.0, 60.0)]
    if per_seed:
        return {"date": "2027-01-01", "seeds": [0, 1],
                "rows": [{"key": key, "per_seed": [run(0, a), run(1, b)]} for key, a, b in rows]}
    return {"date": "2026-11-29", "rows": [{"key": key, "val": {"CIDEr": a}, "vqa_test_accuracy": 25.0,
                                            "train_seconds": 720.0} for key, a, _ in rows]}


def test_mini_comparison_summaries_of_both_formats(tmp_path):
    paper = paper_tables.load_paper()
    new = sources.from_compare_summary(tmp_path / "results.json", compare_summary(per_seed=True), paper)
    old = sources.from_compare_summary(tmp_path / "old.json", compare_summary(per_seed=False), paper)
    assert {m.row for m in new.measurements} == {"blip2", "evlgen_55m", "evlgen_two_layers"}
    half = [m.value for m in new.measurements if m.row == "evlgen_55m" and m.column == "coco_val_cider"]
    assert half == [100.0, 110.0]
    assert [m.value for m in old.measurements if m.row == "blip2" and m.column == "vqav2_val"] == [25.0]
    (path := tmp_path / "results.json").write_text(json.dumps(compare_summary(per_seed=True)))
    result = main([str(path), "--out", str(tmp_path / "out")])
    relative = {(r["row"], r["column"]): r for r in result["tables"]["zero_shot_main"]["relative"]}
    clock = relative[("evlgen_55m", "clock_hours")]  # (360 + 720) / (360 + 720): same hours as BLIP-2 here
    assert clock["ours"] == pytest.approx(1.0) and clock["paper"] == pytest.approx(47 / 234)
    assert relative[("evlgen_55m", "coco_val_cider")]["ours"] == pytest.approx(105.0 / 85.0)
    assert relative[("evlgen_two_layers", "coco_val_cider")]["paper"] is None
    (two_layers,) = [r for r in result["tables"]["zero_shot_main"]["rows"] if r["key"] == "evlgen_two_layers"]
    assert not two_layers["in_paper"] and two_layers["label"] == "EVLGen, 2 layers (mini only)"


def test_the_committed_mini_results_render(tmp_path):
    result = main([str(REPO / "docs/results/compare_mini"), str(REPO / "docs/results/main_job/summary.json"),
                   "--out", str(tmp_path)])
    blip2 = cells(result, "zero_shot_main", "blip2")["coco_val_cider"]
    assert (round(blip2["ours"]["mean"], 2), blip2["paper"]) == (87.16, 137.7)
    main_job = cells(result, "zero_shot_main", "main_job")["coco_val_cider"]["ours"]
    summary = json.loads((REPO / "docs/results/main_job/summary.json").read_text())
    committed = summary["scores"]["EVLGen"]["val"]["CIDEr"]
    assert main_job["n"] == committed["n"] == len(summary["seeds"]) and main_job["mean"] == pytest.approx(committed["mean"])
    md = (tmp_path / "results.md").read_text()
    assert "| 87.2 / 137.7 (-50.5) |" in md and "42.1 / collapse |" in md


def test_summary_that_is_neither_kind_is_refused(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"something": 1}))
    with pytest.raises(ValueError, match="neither a mini comparison"):
        sources.from_summary(tmp_path / "x.json", {})
