"""Reading the evaluation outputs of runs into cells of the paper's tables.

Three kinds of source (README, "Results tool"):

- a LAVIS run directory (``evaluate.py`` / ``train.py`` output: ``metrics_{split}.json``, and for
  training runs ``log.txt``), assigned to a cell by ``TABLE.ROW[:BENCHMARK]=DIR``: the benchmark
  says which evaluation it is (``paper.TABLES[TABLE].benchmarks``) and so which split and columns;
- a mini comparison summary (``results.json`` of ``run_scripts/compare_mini.py``, either format:
  rows with ``per_seed`` runs, or the one-seed rows of 2026-11-29);
- a main-job summary (``summary.json`` of ``run_scripts/run_mini.py``).

Each yields ``Measurement``s (one value per seed) and one line saying what it measured; the mini
world's scores stand in for the paper's benchmarks (shapes-world val CIDEr in the COCO column,
shapes-world VQA in the VQAv2 column), which the line says.
"""
import json
import re
from dataclasses import dataclass
from pathlib import Path

from lavis_evlgen.experiments import report
from lavis_evlgen.results.paper import TABLES, find_row

RUN_SPEC = re.compile(r"^(?P<table>[a-z0-9_]+)\.(?P<row>[a-z0-9_]+)(?::(?P<benchmark>[a-z0-9_]+))?=(?P<path>.+)$")
METRICS_FILE = re.compile(r"^metrics_(?P<split>.+)\.json$")
# Rows of ours that the paper does not have: key -> label.
MINI_ROWS = {"evlgen_two_layers": "EVLGen, 2 layers (mini only)",
             "main_job": "main job: EVLGen, 2 layers (run_mini.py)",
             "main_job_blind": "main job, blind (shuffled soft prompts)"}


@dataclass(frozen=True)
class Measurement:
    """One value of one cell: ``table``/``row``/``column`` keys of ``paper.TABLES``, from one seed
    or run; ``label``: the row's name when it is one of ours the paper lacks (None otherwise)."""

    table: str
    row: str
    column: str
    value: float
    label: str | None = None


@dataclass
class Source:
    """What one input contributed: its measurements and a line saying what they are."""

    path: str
    description: str
    measurements: list[Measurement]


def shown(path: Path) -> str:
    """``path`` relative to the working directory when it is below it."""
    path = Path(path).resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


# ---------------------------------------------------------------------------- LAVIS run directories
def job_dir(path: Path) -> Path:
    """The LAVIS job directory at ``path``: itself when it holds metrics or a log, else its one
    subdirectory that does (LAVIS writes ``output_dir/<job id>/``)."""
    def is_job(p: Path) -> bool:
        return (p / "log.txt").is_file() or any(p.glob("metrics_*.json"))

    if not path.is_dir():
        raise FileNotFoundError(f"run directory {path} does not exist")
    if is_job(path):
        return path
    jobs = [p for p in sorted(path.iterdir()) if p.is_dir() and is_job(p)]
    if len(jobs) != 1:
        raise FileNotFoundError(f"{path} holds no metrics_*.json or log.txt, and {len(jobs)} job directories "
                                f"that do ({[p.name for p in jobs]}); name one")
    return jobs[0]


def metrics_for(job: Path, split: str) -> tuple[dict, str]:
    """(metrics, split read) of ``job``: ``metrics_{split}.json``, else its only metrics file."""
    wanted = job / f"metrics_{split}.json"
    if wanted.is_file():
        return json.loads(wanted.read_text()), split
    found = sorted(p.name for p in job.glob("metrics_*.json"))
    if len(found) != 1:
        raise FileNotFoundError(f"{job}: no metrics_{split}.json, and {len(found)} other metrics files {found}")
    return json.loads((job / found[0]).read_text()), METRICS_FILE.match(found[0])["split"]


def training_hours(job: Path) -> float:
    """Hours spent in training steps by a ``runner_evlgen_iter`` run (its log.txt's train_seconds)."""
    from lavis_evlgen.experiments.compare import read_training_log

    if not (job / "log.txt").is_file():
        raise FileNotFoundError(f"{job} has no log.txt: the train benchmark reads a training run's log")
    seconds, _ = read_training_log(job)
    if not seconds:
        raise ValueError(f"{job / 'log.txt'} records no train_seconds (not a runner_evlgen_iter training run?)")
    return sum(seconds) / 3600


def parse_run_spec(spec: str) -> tuple[str, str, str, Path]:
    """``TABLE.ROW[:BENCHMARK]=DIR`` -> (table, row, benchmark, DIR); the benchmark may be left out
    when the table has only one."""
    match = RUN_SPEC.match(spec)
    if match is None:
        raise ValueError(f"--run {spec!r}: expected TABLE.ROW[:BENCHMARK]=DIR, e.g. zero_shot_main.evlgen_55m:coco=DIR")
    table = TABLES.get(match["table"])
    if table is None:
        raise KeyError(f"--run {spec!r}: unknown table {match['table']!r}; tables: {sorted(TABLES)}")
    if match["row"] not in table.rows:
        raise KeyError(f"--run {spec!r}: {table.key} has no row {match['row']!r}; rows: {list(table.rows)}")
    benchmark = match["benchmark"]
    if benchmark is None:
        if len(table.benchmarks) != 1:
            raise KeyError(f"--run {spec!r}: say which benchmark the run evaluated (:{'|:'.join(table.benchmarks)})")
        (benchmark,) = table.benchmarks
    if benchmark not in table.benchmarks:
        raise KeyError(f"--run {spec!r}: {table.key} has no benchmark {benchmark!r}; benchmarks: {list(table.benchmarks)}")
    return table.key, match["row"], benchmark, Path(match["path"])


def from_run_dir(spec: str) -> Source:
    """The cells one LAVIS run directory fills (``TABLE.ROW[:BENCHMARK]=DIR``)."""
    table_key, row, benchmark_key, path = parse_run_spec(spec)
    benchmark = TABLES[table_key].benchmarks[benchmark_key]
    job = job_dir(path)
    if benchmark.kind == "train":
        values = {"hours": training_hours(job)}
        read = "log.txt (hours in training steps)"
    else:
        metrics, split = metrics_for(job, benchmark.split)
        values = report.caption_scores(metrics) if benchmark.kind == "caption" else report.vqa_scores(metrics)
        read = f"metrics_{split}.json" + ("" if split == benchmark.split else f" (the paper reports {benchmark.split})")
    measurements = [Measurement(table_key, row, column, values[label]) for column, label in benchmark.cells.items()]
    return Source(shown(job), f"{table_key}.{row}, {benchmark_key}: {read}", measurements)


# ---------------------------------------------------------------------------- mini summaries
def compare_row_key(row_key: str, paper: dict) -> tuple[str, str | None]:
    """(zero_shot_main row key, label) of a mini comparison row: the paper row its selector in
    ``experiments/compare.py`` picks, or one of ``MINI_ROWS``."""
    from lavis_evlgen.experiments.compare import ROWS

    row = next((r for r in ROWS if r.key == row_key), None)
    if row is None or row.paper is None:
        return row_key, MINI_ROWS.get(row_key, row.label if row else row_key)
    target = find_row("zero_shot_main", row.paper, paper)
    key = next(k for k, selector in TABLES["zero_shot_main"].rows.items()
               if find_row("zero_shot_main", selector, paper) == target)
    return key, None


def from_compare_summary(path: Path, summary: dict, paper: dict) -> Source:
    """Cells of the main table from a mini comparison: val CIDEr of the best-val checkpoint (COCO
    column), VQA test accuracy (VQAv2 column), hours in training steps (clock column), per seed."""
    measurements = []
    for row in summary["rows"]:
        key, label = compare_row_key(row["key"], paper)
        for run in row.get("per_seed") or [row]:  # the 2026-11-29 format: each row is its one run
            vqa = run["vqa"]["all"] if "vqa" in run else run["vqa_test_accuracy"]
            for column, value in (("coco_val_cider", run["val"]["CIDEr"]), ("vqav2_val", vqa),
                                  ("clock_hours", run["train_seconds"] / 3600)):
                measurements.append(Measurement("zero_shot_main", key, column, float(value), label))
    seeds = summary.get("seeds", [0])
    description = (f"mini comparison ({summary.get('date', '?')}, seeds {', '.join(map(str, seeds))}): COCO val "
                   "CIDEr <- shapes-world val CIDEr of the best-val checkpoint, VQAv2 val <- shapes-world zero-shot "
                   "VQA test accuracy, clock h <- hours in training steps (all stages, validation excluded)")
    return Source(shown(path), description, measurements)


def from_main_job_summary(path: Path, summary: dict) -> Source:
    """Cells of the main table from the main job: val CIDEr and VQA accuracy per seed, for EVLGen
    and its blind twin; the training job's wall time for EVLGen (the blind twin is not trained)."""
    measurements = []
    for model, row in (("EVLGen", "main_job"), ("blind (shuffled soft prompts)", "main_job_blind")):
        scores = summary["scores"][model]
        for column, stat in (("coco_val_cider", scores["val"]["CIDEr"]), ("vqav2_val", scores["vqa"]["all"])):
            measurements += [Measurement("zero_shot_main", row, column, v, MINI_ROWS[row]) for v in stat["values"]]
    measurements += [Measurement("zero_shot_main", "main_job", "clock_hours", minutes / 60, MINI_ROWS["main_job"])
                     for minutes in summary["train_minutes"]["values"]]
    description = (f"main job ({summary['date']}, seeds {', '.join(map(str, summary['seeds']))}): COCO val CIDEr <- "
                   "shapes-world val CIDEr, VQAv2 val <- shapes-world zero-shot VQA test accuracy, clock h <- "
                   "wall time of the training job (validation included)")
    return Source(shown(path), description, measurements)


def from_summary(path: Path, paper: dict) -> Source:
    """A mini comparison's results.json or a main job's summary.json (a directory: the one it holds)."""
    path = Path(path)
    if path.is_dir():
        found = [p for p in (path / "results.json", path / "summary.json") if p.is_file()]
        if len(found) != 1:
            raise FileNotFoundError(f"{path} holds {len(found)} of results.json / summary.json; name the file")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"summary {path} does not exist")
    summary = json.loads(path.read_text())
    if "rows" in summary:
        return from_compare_summary(path, summary, paper)
    if "scores" in summary and "train_minutes" in summary:
        return from_main_job_summary(path, summary)
    raise ValueError(f"{path} is neither a mini comparison results.json (rows) nor a main-job summary.json "
                     f"(scores, train_minutes); for a LAVIS run directory use --run TABLE.ROW[:BENCHMARK]=DIR")
