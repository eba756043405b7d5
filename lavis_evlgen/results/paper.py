"""The paper's tables (docs/paper_results.yaml) as the results tool fills them: which rows, which
columns can be measured, and which benchmark (evaluation) feeds each column.

A paper row is selected by attributes (``find_row``); each table names its rows with short keys
(``TABLES[...].rows``) that ``--run TABLE.ROW:BENCHMARK=DIR`` uses. A benchmark names the kind of
evaluation (caption metrics or VQA accuracy), the split the paper reports, and the cells it fills.
"""
from dataclasses import dataclass
from pathlib import Path

import yaml

from lavis_evlgen.common.jobs import REPO_ROOT

PAPER_RESULTS = REPO_ROOT / "docs/paper_results.yaml"


@dataclass(frozen=True)
class Benchmark:
    """An evaluation: ``kind`` "caption" (metrics x100) or "vqa" (accuracy %) or "train" (clock
    hours of a training run), the ``split`` the paper reports, and ``cells``: the table's column ->
    our score label (``experiments/report.py``'s labels: CIDEr, BLEU-4, ..., all)."""

    kind: str
    split: str | None
    cells: dict[str, str]


@dataclass(frozen=True)
class PaperTable:
    """One table of docs/paper_results.yaml: ``rows`` key -> selector of the yaml row (None: a row of
    ours the paper does not have), ``columns`` in order -> label, ``benchmarks`` that fill them."""

    key: str
    title: str
    rows: dict[str, dict]
    columns: dict[str, str]
    benchmarks: dict[str, Benchmark]
    # The row the relative table divides by (the paper's claims are ratios to it), if any.
    reference_row: str | None = None


CAPTION_CELLS = {"C": "CIDEr", "B4": "BLEU-4", "M": "METEOR", "R": "ROUGE-L"}


def _caption_cells(prefix: str) -> dict[str, str]:
    return {f"{prefix}{column}": label for column, label in CAPTION_CELLS.items()}


TABLES = {
    "zero_shot_main": PaperTable(
        key="zero_shot_main",
        title="Zero-shot VQA and COCO captioning, OPT-2.7b (paper's main table)",
        rows={
            "vl_t5": {"model": "VL-T5"}, "fewvlm": {"model": "FewVLM"}, "frozen": {"model": "Frozen"},
            "vlkd": {"model": "VLKD"},
            "blip2_one_stage": {"model": "BLIP-2 (one stage, no stage-1)"},
            "blip2": {"model": "BLIP-2"},
            "evlgen_55m": {"model": "EVLGen", "trainable_params": "55M"},
            "evlgen_11m_data": {"model": "EVLGen", "pretrain_pairs": "11M"},
            "evlgen_150k": {"model": "EVLGen", "pretrain_pairs": "104M", "trainable_params": "110M",
                            "stage2_steps": "150k"},
            "evlgen_250k": {"model": "EVLGen", "pretrain_pairs": "104M", "trainable_params": "110M",
                            "stage2_steps": "250k"},
        },
        columns={"vqav2_val": "VQAv2 val", "gqa_testdev": "GQA test-dev", "okvqa_test": "OK-VQA test",
                 "coco_val_cider": "COCO val CIDEr", "clock_hours": "clock h"},
        benchmarks={
            "vqav2": Benchmark("vqa", "val", {"vqav2_val": "all"}),
            "gqa": Benchmark("vqa", "testdev", {"gqa_testdev": "all"}),
            "okvqa": Benchmark("vqa", "test", {"okvqa_test": "all"}),
            "coco": Benchmark("caption", "val", {"coco_val_cider": "CIDEr"}),
            "train": Benchmark("train", None, {"clock_hours": "hours"}),
        },
        reference_row="blip2",
    ),
    "zero_shot_captioning": PaperTable(
        key="zero_shot_captioning",
        title="Zero-shot captioning: NoCaps val, Flickr30K test",
        rows={"blip2_opt": {"model": "BLIP-2", "llm": "OPT"}, "evlgen_opt": {"model": "EVLGen", "llm": "OPT"},
              "blip2_vicuna": {"model": "BLIP-2", "llm": "Vicuna"},
              "evlgen_vicuna": {"model": "EVLGen", "llm": "Vicuna"}},
        columns={**{f"nocaps_{c}": f"NoCaps {c}" for c in CAPTION_CELLS},
                 **{f"flickr30k_{c}": f"Flickr30K {c}" for c in CAPTION_CELLS}},
        benchmarks={"nocaps": Benchmark("caption", "val", _caption_cells("nocaps_")),
                    "flickr30k": Benchmark("caption", "test", _caption_cells("flickr30k_"))},
    ),
    "msrvtt_captioning": PaperTable(
        key="msrvtt_captioning",
        title="MSR-VTT video captioning (test)",
        rows={"concat": {"model": "Baseline (concat)"}, "mean": {"model": "Baseline (mean)"},
              "image": {"model": "EVLGen-image"}, "video": {"model": "EVLGen-video"},
              "video_scst": {"model": "EVLGen-video-scst"}, "video_llama": {"model": "Video-LLaMA"},
              "videochat": {"model": "VideoChat"}, "videococa": {"model": "VideoCoCa (open)"}},
        columns={c: c for c in CAPTION_CELLS},
        benchmarks={"msrvtt": Benchmark("caption", "test", {c: label for c, label in CAPTION_CELLS.items()})},
    ),
}
# The dataset of the zero_shot_captioning yaml rows, by the prefix of our column keys.
CAPTIONING_DATASETS = {"nocaps_": "NoCaps", "flickr30k_": "Flickr30K"}


def load_paper(path: Path = PAPER_RESULTS) -> dict:
    """The parsed paper results file (docs/paper_results.yaml)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"paper results file {path} does not exist")
    return yaml.safe_load(Path(path).read_text())


def find_row(table: str, selector: dict, paper: dict | None = None) -> dict:
    """The one row of ``table`` whose attributes equal ``selector``'s (compared as strings)."""
    rows = (paper or load_paper())[table]["rows"]
    matches = [r for r in rows if all(str(r.get(k)) == str(v) for k, v in selector.items())]
    if len(matches) != 1:
        raise KeyError(f"docs/paper_results.yaml {table}: {len(matches)} rows match {selector}, expected one")
    return matches[0]


def paper_value(table: PaperTable, row_key: str, column: str, paper: dict):
    """The paper's number (or word, e.g. "collapse") for a cell; None where the paper has none (or
    the row is one of ours that is not in ``table.rows``)."""
    selector = table.rows.get(row_key)
    if selector is None:
        return None
    if table.key == "zero_shot_captioning":
        prefix = next(p for p in CAPTIONING_DATASETS if column.startswith(p))
        row = find_row(table.key, {**selector, "dataset": CAPTIONING_DATASETS[prefix]}, paper)
        return row.get(column[len(prefix):])
    row = find_row(table.key, selector, paper)
    if column == "coco_val_cider" and "coco_val_cider" not in row and "result" in row:
        return row["result"]  # the one-stage BLIP-2 row: "collapse"
    return row.get(column)


def row_description(table: PaperTable, row_key: str, paper: dict) -> str:
    """How the paper names one of ``table.rows``: its model and, in the main table, data / parameters / steps."""
    selector = table.rows[row_key]
    if table.key == "zero_shot_captioning":
        return f"{selector['model']}, {selector['llm']}"
    row = find_row(table.key, selector, paper)
    details = [f"{row[k]} {name}" for k, name in (("pretrain_pairs", "pairs"), ("trainable_params", "trainable"))
               if k in row]
    steps = " + ".join(str(row[k]) for k in ("stage1_steps", "stage2_steps") if k in row)
    if steps:
        details.append(f"{steps} steps")
    return row["model"] + (f" ({', '.join(details)})" if details else "")
