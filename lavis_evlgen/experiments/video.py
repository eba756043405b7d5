"""The paper's MSR-VTT table (``msrvtt_captioning``; method.md section 3) in miniature, on the offline
video world, over seeds (README, "EVLGen-video").

Every row is one config of ``projects/video/mini/`` (``base.yaml`` plus the keys that make the row)
and one row of the paper's table, in its order:

- ``concat``, ``mean``, ``video``: train.py from the seed's EVLGen-image checkpoint; scores of the
  runner's best-val checkpoint: val and test captions (the training job's);
- ``image``: evaluate.py of the EVLGen-image checkpoint on the frames (val and test), no training;
- ``video_scst``: train.py with SCST from the ``video`` row's best checkpoint of the same seed, its
  references file written from the seed's training split first (``models/scst.py``);
- every row: val captions of the same checkpoint with its soft prompts shuffled across the batch
  (``compare.BLIND_OPTIONS``), the score of a model that ignores the clip.

Seed k is the training seed and the world seed (``mini.seed_options``) and takes the EVLGen-image
checkpoint of seed k: given per seed, or read from a main job's output
(``<main job>/seed<k>/train/<job>/checkpoint_best.pth``, run_scripts/run_mini.py). Caption scores are
CIDEr, BLEU-4, METEOR, ROUGE-L (x100) and the video world's scene-grounded scores
(``datasets/video_scene_scores.py``: events, directions, changes, appearances, colours, order, held-out
events; %). The summary holds mean ± std over seeds per row, the blind score per row, the paper's
MSR-VTT test rows beside them, and for each of the paper's claims (temporal > mean > concat, SCST
helps) whether the miniature's difference exceeds the spread. Finished (row, seed) runs
(``OUTPUT_DIR/seed<k>/<row>/row.json``) made with the same options and image checkpoint are reused.

Cost: the budget in base.yaml (25 steps of 2 x 8 clips; a 200/24/24-clip world) and
video_scst.yaml (4 SCST steps) fits 3 seeds in 30 minutes on 2 CPU cores: 21.7 min measured
(README "EVLGen-video", 2026-12-01, ViT cut after block 5), 7-8 min per seed, of which ~2 min are
training steps (a `video` step ~1.8 s, gradients flowing back through the frozen ViT) and the rest
the 30 jobs' start-up (imports, model build, data check, the JVMs of METEOR and the PTB tokenizer:
~35 s each) and captioning (5 beams, up to 30 tokens: ~0.15 s per clip). On the machine shared with
other jobs, under ``nice -n 19``, every part took several times longer.
"""
import json
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from lavis_evlgen.common.jobs import REPO_ROOT, launch_job
from lavis_evlgen.common.run_config import load_config
from lavis_evlgen.experiments import report
from lavis_evlgen.experiments.compare import BLIND_OPTIONS, read_metrics, read_training_log, runs_over_seeds, \
    with_curve
from lavis_evlgen.experiments.mini import seed_options
from lavis_evlgen.results.paper import TABLES, find_row

DATASET = "shapes_video_caption"
PAPER_TABLE = TABLES["msrvtt_captioning"]


@dataclass(frozen=True)
class VideoRow:
    """One row: ``key`` names its config (``<config dir>/<key>.yaml``) and its ``msrvtt_captioning``
    row (results/paper.py); ``label`` is the paper's name for it. ``start``: the checkpoint training
    starts from, "image" or the key of an earlier row (None: evaluation only)."""

    key: str
    label: str
    start: str | None = "image"


ROWS = (VideoRow("concat", "Baseline (concat)"), VideoRow("mean", "Baseline (mean)"),
        VideoRow("image", "EVLGen-image", start=None), VideoRow("video", "EVLGen-video"),
        VideoRow("video_scst", "EVLGen-video-scst", start="video"))
# The paper's claims: (row, row it beats, claim), judged on the test scores CLAIM_SCORES.
CLAIMS = (("video", "mean", "temporal > mean"), ("mean", "concat", "mean > concat"),
          ("video_scst", "video", "SCST helps"))
CLAIM_SCORES = ("CIDEr", "event F1")
CAPTION_COLUMNS = [label for _, label in report.CAPTION_METRICS]
SCENE_COLUMNS = [label for _, label in report.VIDEO_SCENE_METRICS]


# ---------------------------------------------------------------------------- inputs
def main_job_checkpoint(main_job_dir: Path, seed: int) -> Path:
    """The EVLGen-image checkpoint run_scripts/run_mini.py trained for ``seed`` under ``main_job_dir``:
    the one its seed's scores.json names, else the only ``seed<k>/train/<job>/checkpoint_best.pth``."""
    seed_dir = main_job_dir / f"seed{seed}"
    scores = seed_dir / "scores.json"
    if scores.is_file():
        return Path(json.loads(scores.read_text())["checkpoint"])
    found = sorted(seed_dir.glob("train/*/checkpoint_best.pth"))
    if len(found) != 1:
        raise FileNotFoundError(f"--main-job-dir {main_job_dir}: seed {seed} needs {seed_dir}/scores.json or exactly "
                                f"one train/<job>/checkpoint_best.pth, found {[str(p) for p in found]}")
    return found[0]


def image_checkpoints(seeds: list[int], given: list[Path] | None, main_job_dir: Path | None) -> dict[int, Path]:
    """seed -> its EVLGen-image checkpoint, from one list per seed or a main job's directory; every
    file must exist (FileNotFoundError naming it and the seed)."""
    if (given is None) == (main_job_dir is None):
        raise ValueError("give the EVLGen-image checkpoints by --image-checkpoint (one per seed) or --main-job-dir")
    if given is not None and len(given) != len(seeds):
        raise ValueError(f"--image-checkpoint: {len(given)} paths for {len(seeds)} seeds {seeds}; give one per seed")
    checkpoints = dict(zip(seeds, given)) if given is not None else {
        seed: main_job_checkpoint(main_job_dir, seed) for seed in seeds}
    for seed, path in checkpoints.items():
        if not path.is_file():
            raise FileNotFoundError(f"EVLGen-image checkpoint of seed {seed}: {path} does not exist")
    return {seed: path.resolve() for seed, path in checkpoints.items()}


def check_reusable(rows, checkpoints: dict[int, Path], output_dir: Path) -> None:
    """FileExistsError naming a finished (row, seed) run made from another image checkpoint."""
    for seed, checkpoint in checkpoints.items():
        for row in rows:
            done = output_dir / f"seed{seed}" / row.key / "row.json"
            made_from = json.loads(done.read_text())["image_checkpoint"] if done.is_file() else str(checkpoint)
            if made_from != str(checkpoint):
                raise FileExistsError(f"{done} was made from image checkpoint {made_from}, not {checkpoint}: "
                                      "use another --output-dir")


# ---------------------------------------------------------------------------- one row, one seed
def start_checkpoint(row: VideoRow, seed: int, image_checkpoint: Path, output_dir: Path) -> Path:
    """What ``row`` trains from: the image checkpoint, or the best checkpoint of its start row (same seed)."""
    if row.start == "image":
        return image_checkpoint
    done = output_dir / f"seed{seed}" / row.start / "row.json"
    if not done.is_file():
        raise FileNotFoundError(f"row {row.key!r} starts from row {row.start!r}, which has no finished run ({done})")
    return Path(json.loads(done.read_text())["checkpoint"])


def run_row(row: VideoRow, seed: int, args, row_dir: Path, start: float) -> dict:
    """Train (or only evaluate) one row with ``seed``, then its blind score; returns (and saves to
    ``row_dir/row.json``) its scores."""
    row_start = time.time()
    cfg = args.config_dir / f"{row.key}.yaml"
    image_checkpoint = args.image_checkpoints[seed]
    options = seed_options(seed, DATASET) + list(args.options)
    result = {"key": row.key, "seed": seed, "options": list(args.options), "image_checkpoint": str(image_checkpoint)}
    if row.start is None:
        report.stage(f"{row.label}, seed {seed}: evaluating {cfg.name} (val, test)", start)
        trained = [f"model.finetuned={image_checkpoint}"]
        job = launch_job("evaluate.py", cfg, args.nproc, row_dir / "eval", options + trained, log=row_dir / "eval.log")
        result.update(stages=[], steps=0, train_seconds=0.0, checkpoint=str(image_checkpoint),
                      val=report.caption_scores(read_metrics(job, "val")))
    else:
        from_checkpoint = start_checkpoint(row, seed, image_checkpoint, args.output_dir)
        project = OmegaConf.merge(load_config(cfg), OmegaConf.from_dotlist(options))
        if project.model.get("scst", False):
            references = row_dir / "scst_references.json"
            report.stage(f"{row.label}, seed {seed}: SCST references of the training split -> {references}", start)
            options.append(f"model.scst_references={references}")
            from lavis_evlgen.models.scst import write_config_references  # imports LAVIS and the models

            write_config_references(cfg, references, options)
        report.stage(f"{row.label}, seed {seed}: training {cfg.name} from {from_checkpoint}", start)
        job = launch_job("train.py", cfg, args.nproc, row_dir / "train", options + [f"model.pretrained={from_checkpoint}"],
                         log=row_dir / "train.log")
        seconds, _ = read_training_log(job)
        stage = {"config": str(cfg.relative_to(REPO_ROOT)) if cfg.is_relative_to(REPO_ROOT) else str(cfg),
                 "job": str(job), "steps": int(project.run.iters_per_inner_epoch) * len(seconds),
                 "train_seconds": round(sum(seconds), 1),
                 "wall_seconds": round(time.time() - row_start, 1)}
        trained = ["model.load_finetuned=True", f"model.finetuned={job / 'checkpoint_best.pth'}"]
        result.update(start_checkpoint=str(from_checkpoint), stages=[stage], steps=stage["steps"],
                      train_seconds=stage["train_seconds"], checkpoint=str(job / "checkpoint_best.pth"))

    report.stage(f"{row.label}, seed {seed}: blind captions (val, shuffled soft prompts)", start)
    blind_job = launch_job("evaluate.py", cfg, args.nproc, row_dir / "blind", options + trained + BLIND_OPTIONS,
                           log=row_dir / "blind.log")
    result.update(wall_seconds=round(time.time() - row_start, 1), test=report.caption_scores(read_metrics(job, "test")),
                  val_blind=report.caption_scores(read_metrics(blind_job, "val")))
    (row_dir / "row.json").write_text(json.dumps(result, indent=2))
    return with_curve(result)


# ---------------------------------------------------------------------------- summary
def paper_row(row: VideoRow) -> dict:
    """The row's msrvtt_captioning row of docs/paper_results.yaml ({model, C, B4, M, R})."""
    return find_row(PAPER_TABLE.key, PAPER_TABLE.rows[row.key])


def row_summary(row: VideoRow, runs: list[dict]) -> dict:
    """One row over its seeds: per-seed runs, mean ± std of every score and of training time."""
    return {"key": row.key, "label": row.label, "trains": row.start is not None, "seeds": [run["seed"] for run in runs],
            "steps": runs[0]["steps"], "paper": paper_row(row),
            "stats": {section: report.aggregate([run[section] for run in runs]) for section in ("val", "val_blind", "test")},
            "train_minutes": report.mean_std([run["train_seconds"] / 60 for run in runs]), "per_seed": runs}


def spread_verdict(a: dict, b: dict) -> str:
    """Whether two stats over seeds differ beyond their spread."""
    if min(a["n"], b["n"]) < 2:
        return "one seed: no spread to compare against"
    return "exceeds the spread" if report.exceeds_spread(a, b) else "within the spread"


def claim_verdict(a: dict, b: dict) -> str:
    """What the difference ``a - b`` says of the claim a > b."""
    verdict = spread_verdict(a, b)
    if verdict == "within the spread":
        return f"{verdict}: the miniature cannot tell"
    if verdict == "exceeds the spread":
        return f"{verdict}: the miniature {'agrees' if a['mean'] > b['mean'] else 'disagrees'}"
    return verdict


def verdicts(rows: dict[str, dict]) -> list[str]:
    """A line per paper claim and score (test), with the paper's CIDEr difference, then each row
    against its blind score (val CIDEr)."""
    lines = []
    for a, b, claim in CLAIMS:
        if a not in rows or b not in rows:
            continue
        ra, rb = rows[a], rows[b]
        paper = (f"; paper (MSR-VTT test CIDEr): {ra['paper']['C']} vs {rb['paper']['C']} "
                 f"({ra['paper']['C'] - rb['paper']['C']:+.1f})")
        for label in CLAIM_SCORES:
            sa, sb = ra["stats"]["test"].get(label), rb["stats"]["test"].get(label)
            if sa is None or sb is None:
                continue
            lines.append(f"- {claim}: {ra['label']} vs {rb['label']}, test {label}: {report.fmt(sa)} vs "
                         f"{report.fmt(sb)}, difference {sa['mean'] - sb['mean']:+.1f}, {claim_verdict(sa, sb)}"
                         + (paper if label == "CIDEr" else ""))
    for r in rows.values():
        seen, blind = r["stats"]["val"]["CIDEr"], r["stats"]["val_blind"]["CIDEr"]
        lines.append(f"- {r['label']} vs its blind score, val CIDEr: {report.fmt(seen)} vs {report.fmt(blind)}, "
                     f"difference {seen['mean'] - blind['mean']:+.1f}, {spread_verdict(seen, blind)}")
    return lines


def markdown(summary: dict) -> str:
    fmt = report.fmt
    rows = summary["rows"]
    budget = ", ".join(f"{r['label']} {r['steps']}" for r in rows if r["trains"])
    caption_table = report.markdown_table(
        ["row", "steps", *(f"test {c}" for c in CAPTION_COLUMNS), "val CIDEr", "val CIDEr, blind",
         *(f"paper {c}" for c in PAPER_TABLE.columns)],
        [[r["label"], str(r["steps"]), *(fmt(r["stats"]["test"].get(c)) for c in CAPTION_COLUMNS),
          fmt(r["stats"]["val"].get("CIDEr")), fmt(r["stats"]["val_blind"].get("CIDEr")),
          *(str(r["paper"].get(c, "—")) for c in PAPER_TABLE.columns)] for r in rows])
    return "\n".join([
        "# The MSR-VTT table in miniature: EVLGen-video on the mini video world",
        "",
        f"- command: `{summary['command']}`",
        f"- date: {summary['date']}; machine: {summary['machine']}; {summary['nproc']} processes per job; "
        f"all jobs {summary['wall_minutes']} min",
        f"- seeds {', '.join(map(str, summary['seeds']))} (training seed and world seed, each from that seed's "
        "EVLGen-image checkpoint); cells are mean ± std over them",
        f"- training steps (batch_size_train clips per process): {budget}; val and test: {summary['clips']['val']} and "
        f"{summary['clips']['test']} clips",
        f"- {summary['note']}",
        "",
        "## Captions (test) beside the paper's MSR-VTT test rows",
        "",
        caption_table,
        "",
        "\"blind\": the same checkpoint with its soft prompts shuffled across the batch (each caption "
        "conditioned on another clip); a row near its blind score ignores the clip.",
        "",
        "## What the captions say, scored against each clip's events (test, %)",
        "",
        report.stats_table("row", {r["label"]: r["stats"]["test"] for r in rows}, SCENE_COLUMNS),
        "",
        "## The paper's claims (difference against the spread: |mean difference| > std + std)",
        "",
        *summary["verdicts"],
        "",
        "![test CIDEr and event F1 per row beside the paper's CIDEr](video_table.png)",
        "",
    ])


def plot(summary: dict, path: Path) -> None:
    """Per row: test CIDEr (mean ± std over seeds) with the blind val CIDEr beside it, test event F1,
    and the paper's MSR-VTT test CIDEr."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    labels = [r["label"].replace(" (", "\n(").replace("EVLGen-", "EVLGen-\n") for r in rows]
    xs = range(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.5), dpi=110)
    panels = ((axes[0], "CIDEr", "test CIDEr (mini world)"), (axes[1], "event F1", "test event F1 (%)"))
    for ax, score, title in panels:
        stats = [r["stats"]["test"][score] for r in rows]
        ax.bar([x - 0.2 for x in xs], [s["mean"] for s in stats], 0.4, yerr=[s["std"] for s in stats], capsize=3,
               label="mean ± std over seeds")
        if score == "CIDEr":
            blind = [r["stats"]["val_blind"]["CIDEr"] for r in rows]
            ax.bar([x + 0.2 for x in xs], [s["mean"] for s in blind], 0.4, yerr=[s["std"] for s in blind], capsize=3,
                   color="lightgray", hatch="//", label="blind (val, shuffled soft prompts)")
        else:  # a percentage: from 0, and visible when every row scores 0
            ax.set_ylim(0, 1.1 * max(5.0, *(s["mean"] + s["std"] for s in stats)))
        ax.set_title(title)
    axes[2].bar(xs, [r["paper"]["C"] for r in rows], 0.5, color="tab:green")
    axes[2].set_ylim(min(r["paper"]["C"] for r in rows) - 5, max(r["paper"]["C"] for r in rows) + 2)
    axes[2].set_title("paper: MSR-VTT test CIDEr")
    for ax in axes:
        ax.set_xticks(list(xs), labels, fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"The MSR-VTT rows on the mini video world, seeds {', '.join(map(str, summary['seeds']))}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def summarize(rows: list[VideoRow], runs: dict[str, list[dict]], args) -> dict:
    """Write results.json, results.md and video_table.png to args.results_dir; return the summary."""
    summary_rows = {row.key: row_summary(row, runs[row.key]) for row in rows}
    world = OmegaConf.merge(load_config(args.config_dir / f"{rows[0].key}.yaml"),
                            OmegaConf.from_dotlist(args.options)).datasets[DATASET].build_info
    summary = {
        **report.summary_header("run_scripts/video_mini.py", args, runs),
        "image_checkpoints": {str(seed): str(path) for seed, path in args.image_checkpoints.items()},
        "clips": {split: int(world[f"num_{split}"]) for split in ("train", "val", "test")},
        "rows": list(summary_rows.values()),
        "verdicts": verdicts(summary_rows),
        "note": "caption metrics x100 (pycocoevalcap CIDEr 1.0 = 100); scene scores in %; scores of the runner's "
                "best-val checkpoint; the paper's columns are its MSR-VTT test numbers (C, B4, M, R)",
    }
    report.write_summary(args.results_dir, summary, markdown(summary), plot, "video_table.png")
    return summary


def run_video_table(args) -> dict:
    """Run (or reuse) every (row, seed), then write and return the summary. ``args``: seeds, nproc,
    config_dir, output_dir, results_dir, options, image_checkpoint (list or None), main_job_dir
    (or None), argv (the command line, for the record)."""
    rows = list(ROWS)
    for row in rows:
        if not (args.config_dir / f"{row.key}.yaml").is_file():
            raise FileNotFoundError(f"row {row.key!r} needs {args.config_dir / row.key}.yaml")
    args.image_checkpoints = image_checkpoints(args.seeds, args.image_checkpoint, args.main_job_dir)
    check_reusable(rows, args.image_checkpoints, args.output_dir)
    start = time.time()
    runs = runs_over_seeds(
        rows, args.seeds, args.output_dir, args.options, lambda row, seed, row_dir: run_row(row, seed, args, row_dir, start),
        lambda run: f"test CIDEr {run['test']['CIDEr']:.1f}, event F1 {run['test']['event F1']:.1f} "
                    f"(blind val CIDEr {run['val_blind']['CIDEr']:.1f}), {run['train_seconds'] / 60:.1f} train min",
        start,
    )
    summary = summarize(rows, runs, args)
    report.stage(f"done; written {args.results_dir / 'results.md'}, results.json, video_table.png", start)
    print((args.results_dir / "results.md").read_text())
    return summary
