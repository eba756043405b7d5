"""What the experiment commands print and commit: scores as named columns, means and spreads over
seeds, markdown tables, and the machine a number came from.

One run is an anecdote (README, "Numbers that reproduce"): every table cell here is a mean over
seeds with its sample standard deviation, and a difference between two rows is called real only
when it exceeds the sum of their spreads (``exceeds_spread``).
"""
import json
import os
import platform
import statistics
import time
from pathlib import Path

# pycocoevalcap key -> column label; these scores are fractions, shown x100.
CAPTION_METRICS = (("CIDEr", "CIDEr"), ("Bleu_4", "BLEU-4"), ("METEOR", "METEOR"), ("ROUGE_L", "ROUGE-L"))
# Scene-grounded scores (datasets/scene_scores.py, prefixed "scene_" by the caption task), already in %.
SCENE_METRICS = (("scene_count_acc", "count acc"), ("scene_color_f1", "colour F1"), ("scene_shape_f1", "shape F1"),
                 ("scene_pair_precision", "pair P"), ("scene_pair_recall", "pair R"), ("scene_pair_f1", "pair F1"),
                 ("scene_position_acc", "position acc"), ("scene_held_out_recall", "held-out pair recall"),
                 ("scene_unparseable", "unparseable"), ("scene_repeated", "repeated"))
# The video world's scene-grounded scores (datasets/video_scene_scores.py), in %: events stated right
# (colour, shape, action, new colour), per kind of action, the order of two events, held-out events.
VIDEO_SCENE_METRICS = (("scene_event_f1", "event F1"), ("scene_action_acc", "action acc"),
                       ("scene_direction_acc", "direction acc"), ("scene_change_acc", "change acc"),
                       ("scene_appearance_acc", "appearance acc"), ("scene_color_f1", "colour F1"),
                       ("scene_order_acc", "order acc"), ("scene_held_out_recall", "held-out event recall"),
                       ("scene_unparseable", "unparseable"))
# Zero-shot VQA accuracy (tasks/vqa.py), in %, overall and per shapes-world question type.
VQA_METRICS = (("accuracy", "all"), ("accuracy_count", "count"), ("accuracy_color", "colour"),
               ("accuracy_shape", "shape"), ("accuracy_position", "position"))


def scene_metrics(metrics: dict) -> tuple[tuple[str, str], ...]:
    """The scene-grounded scores of the world ``metrics`` come from: the video world's when they
    hold its event scores, else the image world's."""
    return VIDEO_SCENE_METRICS if "scene_event_f1" in metrics else SCENE_METRICS


def caption_scores(metrics: dict) -> dict[str, float]:
    """A caption task's ``metrics_{split}.json`` as {label: value}: caption metrics x100, scene scores
    (``scene_metrics``) as they are.

    Scene scores a split does not have (held-out recall on val) are left out.
    """
    scores = {label: 100.0 * metrics[key] for key, label in CAPTION_METRICS}
    scores.update({label: float(metrics[key]) for key, label in scene_metrics(metrics) if key in metrics})
    return scores


def vqa_scores(metrics: dict) -> dict[str, float]:
    """A VQA task's ``metrics_{split}.json`` as {label: accuracy %}, per question type where present."""
    return {label: float(metrics[key]) for key, label in VQA_METRICS if key in metrics}


def mean_std(values: list[float]) -> dict:
    """{"mean", "std" (sample std; 0 for one value), "n", "values"} of a list of numbers."""
    if not values:
        raise ValueError("mean_std needs at least one value")
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values), "values": list(values)}


def aggregate(runs: list[dict[str, float]]) -> dict[str, dict]:
    """Per-key ``mean_std`` over runs (one dict of scores per seed); a key missing from any run is dropped."""
    keys = [k for k in runs[0] if all(k in run for run in runs)]
    return {k: mean_std([run[k] for run in runs]) for k in keys}


def fmt(stat: dict | None, digits: int = 1) -> str:
    """``mean ± std`` (``mean`` alone for one seed); "—" for a missing statistic."""
    if stat is None:
        return "—"
    if stat["n"] == 1:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def exceeds_spread(a: dict, b: dict) -> bool:
    """Whether two rows' means differ by more than the sum of their standard deviations."""
    return abs(a["mean"] - b["mean"]) > a["std"] + b["std"]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def stats_table(first_column: str, rows: dict[str, dict[str, dict]], columns: list[str], digits: int = 1) -> str:
    """A table of ``fmt`` cells: one row per name in ``rows`` ({name: {column: stat}}), ``columns`` in order."""
    return markdown_table([first_column, *columns],
                          [[name, *(fmt(stats.get(c), digits) for c in columns)] for name, stats in rows.items()])


def machine() -> str:
    """The machine a number was measured on: cores, CPU model, torch version, threads per job process."""
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU used"
    # torch.distributed.run gives each worker OMP_NUM_THREADS=1 unless the caller set it.
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    return (f"{os.cpu_count()} CPU cores ({cpu}), {gpu}; torch {torch.__version__}, "
            f"{threads} thread(s) per job process, {platform.system()}")


def summary_header(script: str, args, runs: dict[str, list[dict]]) -> dict:
    """What every experiment summary starts with: the command (``script`` and ``args.argv``), the date,
    the machine, processes per job, seeds, and the wall minutes of all its runs (key -> runs)."""
    return {"command": " ".join(["python", script, *args.argv]), "date": time.strftime("%Y-%m-%d"),
            "machine": machine(), "nproc": args.nproc, "seeds": args.seeds,
            "wall_minutes": round(sum(run["wall_seconds"] for key in runs for run in runs[key]) / 60, 1)}


def write_summary(out: Path, summary: dict, markdown: str, plot, figure: str) -> None:
    """An experiment's outputs in ``out``: results.json, results.md and the figure ``plot(summary, out / figure)``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "results.md").write_text(markdown)
    plot(summary, out / figure)


def stage(message: str, start: float) -> None:
    """A progress line of a long experiment: minutes since ``start``, then the message."""
    print(f"==== [{(time.time() - start) / 60:5.1f} min] {message}", flush=True)
