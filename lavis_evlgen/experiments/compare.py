"""The paper's main comparison (BLIP-2 vs EVLGen, ``zero_shot_main``) in miniature, over seeds.

Every row is one or more LAVIS configs (``projects/compare/mini/``; the last one is evaluated), all
trained with the same step budget, data, ViT, LLM and processes, validated every
``run.iters_per_inner_epoch`` steps. For each row and seed (training seed and world seed) the best-val
checkpoint is scored: captions on test (by the training job), zero-shot VQA on test, and captions on
val with the soft prompts shuffled across the batch (the blind score). Captions carry the
scene-grounded scores (``datasets/scene_scores.py``). The summary holds the mean ± std over seeds,
the training time each row takes to reach the target (``target_fraction`` x BLIP-2 two-stage's mean
best val CIDEr), the paper's numbers beside them, and which differences exceed the spread.

Training time is the time spent in training steps (validation excluded), summed over stages.
Finished (row, seed) runs (``OUTPUT_DIR/seed<k>/<row>/row.json``) are reused.
"""
import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from lavis_evlgen.common.jobs import REPO_ROOT, launch_job
from lavis_evlgen.common.run_config import load_config
from lavis_evlgen.experiments import report
from lavis_evlgen.experiments.mini import seed_options
from lavis_evlgen.results.paper import find_row

BLIND_OPTIONS = ["run.evaluate=True", "run.train_splits=[]", "run.valid_splits=[]", "run.test_splits=[val]",
                 "model.prefix_ablation=shuffle"]


@dataclass
class Row:
    """One row of the comparison: its configs (run in order; the last one is evaluated) and its paper row."""

    key: str
    label: str
    configs: list[str]
    paper: dict | None = field(default=None)  # attributes selecting a zero_shot_main row


ROWS = [
    Row("blip2_two_stage", "BLIP-2 stage 1 -> stage 2", ["blip2_stage1", "blip2_stage2"], {"model": "BLIP-2"}),
    Row("blip2_one_stage", "BLIP-2 one-stage", ["blip2_one_stage"], {"model": "BLIP-2 (one stage, no stage-1)"}),
    Row("evlgen_full_depth", "EVLGen, full depth", ["evlgen_full_depth"],
        {"model": "EVLGen", "pretrain_pairs": "104M", "trainable_params": "110M", "stage2_steps": "150k"}),
    Row("evlgen_half_depth", "EVLGen, half depth", ["evlgen_half_depth"], {"model": "EVLGen", "trainable_params": "55M"}),
    Row("evlgen_tenth_data", "EVLGen, full depth, 1/10 data", ["evlgen_tenth_data"],
        {"model": "EVLGen", "pretrain_pairs": "11M"}),
    Row("evlgen_two_layers", "EVLGen, 2 layers (main job's model)", ["evlgen_two_layers"]),
]
# The rows the README's verdicts rest on (each needs >= 3 seeds there).
HEADLINE_ROWS = ("blip2_two_stage", "evlgen_half_depth", "evlgen_two_layers")


# ---------------------------------------------------------------------------- configs
def model_config(cfg_path: Path, options: list[str]):
    """The model section LAVIS would build from ``cfg_path`` + ``options``: model-type defaults < project < options."""
    from lavis.common.registry import registry

    project = OmegaConf.merge(load_config(cfg_path), OmegaConf.from_dotlist(options))
    model_cls = registry.get_model_class(project.model.arch)
    return model_cls, OmegaConf.merge(OmegaConf.load(model_cls.default_config_path(project.model.model_type)).model,
                                      project.model)


def count_trainable(cfg_path: Path, options: list[str]) -> int:
    """Trainable parameters of the model ``cfg_path`` builds (a stage-1 checkpoint is not needed to count)."""
    model_cls, cfg = model_config(cfg_path, options)
    if "stage1_checkpoint" in cfg:
        cfg.stage1_checkpoint = None
    return model_cls.from_config(cfg).num_trainable_parameters()


def prepare(config_dir: Path, rows: list[Row], options: list[str], seeds: list[int] = (0,)) -> dict[str, list[int]]:
    """Generate each seed's world, build every pretrained part once (cached); return trainable parameters per stage."""
    from lavis_evlgen.datasets.shapes_world import ensure_shapes_world

    world = OmegaConf.merge(load_config(config_dir / f"{rows[0].configs[-1]}.yaml"),
                            OmegaConf.from_dotlist(options)).datasets.shapes_caption.build_info
    settings = {key: world[key] for key in ("num_train", "num_val", "num_test", "image_size") if key in world}
    for seed in seeds:
        ensure_shapes_world(seed=seed, **settings)
    params = {}
    for row in rows:
        params[row.key] = [count_trainable(config_dir / f"{name}.yaml", options) for name in row.configs]
        print(f"  {row.label}: {' + '.join(f'{p:,}' for p in params[row.key])} trainable parameters", flush=True)
    return params


# ---------------------------------------------------------------------------- one row, one seed
def read_training_log(job: Path) -> tuple[list[float], list[dict]]:
    """From a runner_evlgen_iter log.txt: the seconds of each training chunk, and each validation's
    {"iters", "best_iters" (the runner's best so far), "metrics"}, in order."""
    seconds, validations = [], []
    for line in (job / "log.txt").read_text().splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the multi-line config dump
            continue
        if "train_seconds" in record:
            seconds.append(float(record["train_seconds"]))
        elif "val_iters" in record:
            metrics = {k[len("val_"):]: v for k, v in record.items() if k.startswith("val_")}
            validations.append({"iters": int(record["val_iters"]), "best_iters": int(record["val_best_iters"]),
                                "metrics": metrics})
    return seconds, validations


def with_curve(result: dict) -> dict:
    """Add the run's validation curve (read from its jobs' logs) and its best point to ``result``.

    Each stage validates after every training chunk, so validation i comes after chunks 0..i;
    a later stage's times start where the previous stage's training ended. The best point is the
    runner's (by its agg_metrics, CIDEr + BLEU-4): the checkpoint_best.pth every evaluation used.
    A run that trained nothing (an evaluation-only row, no stages) is returned as it is.
    """
    if not result["stages"]:
        return result
    curve, offset = [], 0.0
    for stage_info in result["stages"]:
        seconds, validations = read_training_log(Path(stage_info["job"]))
        for i, v in enumerate(validations):
            curve.append({"iters": v["iters"], "train_seconds": round(offset + sum(seconds[: i + 1]), 1),
                          "val": report.caption_scores(v["metrics"])})
        offset += sum(seconds)
    best_iters = validations[-1]["best_iters"]
    (best,) = [p for p in curve[-len(validations):] if p["iters"] == best_iters]
    return {**result, "curve": curve, "best_iters": best_iters, "val": best["val"]}


def read_metrics(job: Path, split: str) -> dict:
    return json.loads((job / f"metrics_{split}.json").read_text())


def run_row(row: Row, seed: int, args, row_dir: Path, start: float) -> dict:
    """Train a row's stages with ``seed``, evaluate its best checkpoint; returns (and saves) its results."""
    row_start = time.time()
    caption_seed, vqa_seed = seed_options(seed, "shapes_caption"), seed_options(seed, "shapes_vqa")
    stages, stage1_checkpoint = [], None
    for name in row.configs:
        cfg = args.config_dir / f"{name}.yaml"
        options = caption_seed + list(args.options)
        if stage1_checkpoint is not None:
            options.append(f"model.stage1_checkpoint={stage1_checkpoint}")
        report.stage(f"{row.label}, seed {seed}: training {cfg.name}", start)
        t0 = time.time()
        job = launch_job("train.py", cfg, args.nproc, row_dir / name, options, log=row_dir / f"{name}.log")
        seconds, _ = read_training_log(job)
        chunk = int(OmegaConf.merge(load_config(cfg), OmegaConf.from_dotlist(options)).run.iters_per_inner_epoch)
        stages.append({"config": str(cfg.relative_to(REPO_ROOT)) if cfg.is_relative_to(REPO_ROOT) else str(cfg),
                       "job": str(job), "steps": chunk * len(seconds), "train_seconds": round(sum(seconds), 1),
                       "wall_seconds": round(time.time() - t0, 1)})
        stage1_checkpoint = job / "checkpoint_latest.pth"

    best_ckpt = job / "checkpoint_best.pth"
    model_options = [o for o in args.options if o.startswith("model.")]
    trained = ["model.load_finetuned=True", f"model.finetuned={best_ckpt}"]
    if len(row.configs) > 1:
        trained.append("model.stage1_checkpoint=null")  # the finetuned checkpoint holds the whole Q-Former

    report.stage(f"{row.label}, seed {seed}: zero-shot VQA (test) and blind captions (val, shuffled soft prompts)", start)
    vqa_cfg = row_dir / "vqa.yaml"
    vqa = load_config(args.vqa_config)
    vqa.model = load_config(cfg).model
    OmegaConf.save(vqa, vqa_cfg)
    vqa_job = launch_job("evaluate.py", vqa_cfg, args.nproc, row_dir / "vqa",
                         vqa_seed + model_options + trained + args.vqa_options, log=row_dir / "vqa.log")
    blind_job = launch_job("evaluate.py", cfg, args.nproc, row_dir / "blind",
                           caption_seed + args.options + trained + BLIND_OPTIONS, log=row_dir / "blind.log")
    result = {
        "key": row.key,
        "seed": seed,
        "options": list(args.options),
        "stages": stages,
        "steps": sum(s["steps"] for s in stages),
        "train_seconds": round(sum(s["train_seconds"] for s in stages), 1),
        "wall_seconds": round(time.time() - row_start, 1),
        "test": report.caption_scores(read_metrics(job, "test")),
        "vqa": report.vqa_scores(read_metrics(vqa_job, "test")),
        "val_blind": report.caption_scores(read_metrics(blind_job, "val")),
    }
    (row_dir / "row.json").write_text(json.dumps(result, indent=2))
    return with_curve(result)


def finished_run(row_dir: Path, options: list[str]) -> dict | None:
    """A (row, seed) run finished earlier with these options; an error when it was made with others."""
    done = row_dir / "row.json"
    if not done.is_file():
        return None
    result = json.loads(done.read_text())
    if result.get("options", []) != list(options):
        raise FileExistsError(f"{done} was made with options {result.get('options')}, not {list(options)}: "
                              "use another --output-dir")
    return with_curve(result)


# ---------------------------------------------------------------------------- summary
def time_to_target(run: dict, target: float) -> float | None:
    """Training seconds at the run's first validation with val CIDEr >= target (None: never reached)."""
    return next((p["train_seconds"] for p in run["curve"] if p["val"]["CIDEr"] >= target), None)


def paper_row(selector: dict | None) -> dict | None:
    """The zero_shot_main row of docs/paper_results.yaml a row's selector picks (None: no paper row)."""
    return None if selector is None else find_row("zero_shot_main", selector)


def row_summary(row: Row, runs: list[dict], params: list[int], target: float | None) -> dict:
    """One row over its seeds: per-seed runs, mean ± std of every score, time to target."""
    for run in runs:
        run["seconds_to_target"] = time_to_target(run, target) if target is not None else None
    reached = [run["seconds_to_target"] / 60 for run in runs if run["seconds_to_target"] is not None]
    return {
        "key": row.key, "label": row.label, "trainable_params": params, "seeds": [run["seed"] for run in runs],
        "steps": runs[0]["steps"], "stages": runs[0]["stages"], "paper": paper_row(row.paper),
        "stats": {section: report.aggregate([run[section] for run in runs])
                  for section in ("val", "val_blind", "test", "vqa")},
        "train_minutes": report.mean_std([run["train_seconds"] / 60 for run in runs]),
        "minutes_to_target": report.mean_std(reached) if reached else None,
        "seeds_reaching_target": len(reached),
        "per_seed": runs,
    }


def verdicts(rows: dict[str, dict]) -> list[str]:
    """Which differences exceed the spread: each row against its blind twin, each EVLGen row against
    BLIP-2 two-stage (val CIDEr and colour-shape pair F1)."""
    lines = []

    def compare(name_a, stats_a, name_b, stats_b, label):
        if label not in stats_a or label not in stats_b:
            return
        a, b = stats_a[label], stats_b[label]
        verdict = "exceeds the spread" if report.exceeds_spread(a, b) else "within the spread"
        lines.append(f"- {name_a} vs {name_b}, val {label}: {report.fmt(a)} vs {report.fmt(b)}: "
                     f"difference {a['mean'] - b['mean']:+.1f}, {verdict}")

    for r in rows.values():
        for label in ("CIDEr", "pair F1"):
            compare(r["label"], r["stats"]["val"], "its blind twin", r["stats"]["val_blind"], label)
    reference = rows.get("blip2_two_stage")
    if reference is not None:
        for key, r in rows.items():
            if key.startswith("evlgen"):
                for label in ("CIDEr", "pair F1"):
                    compare(r["label"], r["stats"]["val"], reference["label"], reference["stats"]["val"], label)
    return lines


def summarize(rows: list[Row], runs: dict[str, list[dict]], params: dict, args) -> dict:
    """Write results.json, results.md and convergence.png to args.results_dir; return the summary."""
    reference, source = runs.get("blip2_two_stage"), "this run"
    if reference is None and args.reference is not None:
        earlier = json.loads(args.reference.read_text())
        found = next((r for r in earlier["rows"] if r["key"] == "blip2_two_stage"), None)
        if found is None:
            raise KeyError(f"--reference {args.reference} has no blip2_two_stage row")
        reference = found["per_seed"]
        source = str(args.reference.relative_to(REPO_ROOT) if args.reference.is_relative_to(REPO_ROOT) else args.reference)
    target = (args.target_fraction * report.mean_std([run["val"]["CIDEr"] for run in reference])["mean"]
              if reference else None)
    summary_rows = {row.key: row_summary(row, runs[row.key], params[row.key], target) for row in rows if row.key in runs}
    reference_row = (summary_rows.get("blip2_two_stage")
                     or row_summary(ROWS[0], reference, [], target) if reference else None)
    for r in summary_rows.values():
        ref_minutes, minutes = (reference_row or {}).get("minutes_to_target"), r["minutes_to_target"]
        r["blip2_two_stage_time_ratio"] = (round(ref_minutes["mean"] / minutes["mean"], 2)
                                           if ref_minutes and minutes else None)
    summary = {
        **report.summary_header("run_scripts/compare_mini.py", args, runs),
        "target": {"metric": "val CIDEr", "fraction_of_blip2_two_stage_best": args.target_fraction,
                   "value": None if target is None else round(target, 2), "source": source},
        "reference_row": reference_row if source != "this run" else None,
        "rows": list(summary_rows.values()),
        "verdicts": verdicts(summary_rows),
        "note": "caption metrics x100 (pycocoevalcap CIDEr 1.0 = 100); scene scores and VQA accuracy in %; "
                "train time = minutes in training steps, all stages, validation excluded; mean ± std over seeds",
    }
    report.write_summary(args.results_dir, summary, markdown(summary), plot, "convergence.png")
    return summary


def markdown(summary: dict) -> str:
    target = summary["target"]["value"]
    fmt = report.fmt
    rows = summary["rows"]
    lines = [
        "# BLIP-2 vs EVLGen on the mini world",
        "",
        f"- command: `{summary['command']}`",
        f"- date: {summary['date']}; machine: {summary['machine']}; {summary['nproc']} processes per job; "
        f"all jobs (training, validation, evaluation) {summary['wall_minutes']} min",
        f"- seeds {', '.join(map(str, summary['seeds']))} (training seed and world seed); cells are mean ± std over them",
        "- every row: same data, ViT, LLM, batch, lr recipe and processes; steps as in the table; "
        "scores of the runner's best-val checkpoint (by CIDEr + BLEU-4)",
        f"- {summary['note']}",
        *([f"- target and the BLIP-2 two-stage reference from an earlier run: {summary['target']['source']}"]
          if summary["reference_row"] else []),
        "",
        "## Captions",
        "",
        report.markdown_table(
            ["row", "trainable params", "steps", "train min", "val CIDEr", "val CIDEr, blind", "val BLEU-4",
             "test CIDEr", "test BLEU-4", "VQA acc (test)"],
            [[r["label"], " + ".join(f"{p / 1e6:.1f}M" for p in r["trainable_params"]),
              " + ".join(str(s["steps"]) for s in r["stages"]), fmt(r["train_minutes"]),
              fmt(r["stats"]["val"].get("CIDEr")), fmt(r["stats"]["val_blind"].get("CIDEr")),
              fmt(r["stats"]["val"].get("BLEU-4")), fmt(r["stats"]["test"].get("CIDEr")),
              fmt(r["stats"]["test"].get("BLEU-4")), fmt(r["stats"]["vqa"].get("all"))] for r in rows]),
        "",
        "\"blind\": the same checkpoint with its soft prompts shuffled across the batch "
        "(each caption conditioned on another image); a row near its blind score ignores the image.",
        "",
        "## What the captions say (scene-grounded, %)",
        "",
        report.markdown_table(
            ["row", "val count acc", "val count acc, blind", "val colour F1", "val pair F1", "val pair F1, blind",
             "test pair F1", "test held-out pair recall", "VQA colour", "VQA count"],
            [[r["label"], fmt(r["stats"]["val"].get("count acc")), fmt(r["stats"]["val_blind"].get("count acc")),
              fmt(r["stats"]["val"].get("colour F1")), fmt(r["stats"]["val"].get("pair F1")),
              fmt(r["stats"]["val_blind"].get("pair F1")), fmt(r["stats"]["test"].get("pair F1")),
              fmt(r["stats"]["test"].get("held-out pair recall")), fmt(r["stats"]["vqa"].get("colour")),
              fmt(r["stats"]["vqa"].get("count"))] for r in rows]),
        "",
        f"## Time to target (val CIDEr >= {'—' if target is None else f'{target:.1f}'} = "
        f"{summary['target']['fraction_of_blip2_two_stage_best']} x BLIP-2 two-stage's mean best) and the paper beside it",
        "",
    ]
    table = []
    for r in rows:
        p = r["paper"] or {}
        steps = " + ".join(str(p[k]) for k in ("stage1_steps", "stage2_steps") if p.get(k)) or "—"
        to_target = fmt(r["minutes_to_target"])
        if target is not None:
            to_target += f" ({r['seeds_reaching_target']}/{len(r['seeds'])} seeds reached it in {r['steps']} steps)"
        ratio = r["blip2_two_stage_time_ratio"]
        table.append([r["label"], to_target, "—" if ratio is None else f"{ratio:.2f}x",
                      f"{p.get('model', '—')} {p.get('pretrain_pairs', '')}".strip(),
                      str(p.get("coco_val_cider", p.get("result", "—"))), str(p.get("vqav2_val", "—")),
                      str(p.get("trainable_params", "—")), steps, str(p.get("clock_hours", "—"))])
    lines += [report.markdown_table(["row", "train min to target", "BLIP-2 two-stage time / row's", "paper row",
                                     "paper COCO val CIDEr", "paper VQAv2 val", "paper trainable",
                                     "paper steps (stage 1 + 2)", "paper clock h"], table),
              "", "## Differences against the spread (|mean difference| > std + std)", "", *summary["verdicts"],
              "", "![val CIDEr against training time](convergence.png)", ""]
    return "\n".join(lines)


def mean_curve(runs: list[dict]) -> tuple[list[float], list[float], list[float]]:
    """Mean training minutes, mean and std of val CIDEr at each validation the runs share."""
    points = min(len(run["curve"]) for run in runs)
    xs, ys, spread = [], [], []
    for i in range(points):
        xs.append(report.mean_std([run["curve"][i]["train_seconds"] / 60 for run in runs])["mean"])
        stat = report.mean_std([run["curve"][i]["val"]["CIDEr"] for run in runs])
        ys.append(stat["mean"])
        spread.append(stat["std"])
    return xs, ys, spread


def plot(summary: dict, path: Path) -> None:
    """Mean val CIDEr against training minutes with a ±std band, one line per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    reference = summary["reference_row"]
    for r in summary["rows"] + ([reference] if reference else []):
        xs, ys, spread = mean_curve(r["per_seed"])
        label = r["label"] + (f" ({summary['target']['source']})" if r is reference else "")
        (line,) = ax.plot(xs, ys, marker="o", linestyle="--" if r is reference else "-", label=label)
        ax.fill_between(xs, [y - s for y, s in zip(ys, spread)], [y + s for y, s in zip(ys, spread)],
                        color=line.get_color(), alpha=0.15)
        if len(r["stages"]) > 1:
            stage1 = report.mean_std([run["stages"][0]["train_seconds"] / 60 for run in r["per_seed"]])["mean"]
            ax.axvline(stage1, color=line.get_color(), linestyle=":", linewidth=1)
            ax.text(stage1, 0.02, "stage 1 done", transform=ax.get_xaxis_transform(), color=line.get_color(),
                    fontsize=8, rotation=90, va="bottom", ha="right")
    blind = max(r["stats"]["val_blind"]["CIDEr"]["mean"] for r in summary["rows"])
    ax.axhline(blind, color="gray", linestyle=":", linewidth=1, label=f"best mean blind score of any row ({blind:.1f})")
    if summary["target"]["value"] is not None:
        ax.axhline(summary["target"]["value"], color="black", linestyle="--", linewidth=1,
                   label=f"target ({summary['target']['value']:.1f})")
    ax.set_xlabel("training time, minutes (all stages, validation excluded)")
    ax.set_ylabel("val CIDEr (shapes world), mean ± std over seeds")
    ax.set_title("BLIP-2 vs EVLGen on the mini world (same data, ViT and LLM)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def runs_over_seeds(items, seeds: list[int], output_dir: Path, options: list[str], run_one, outcome, start: float) -> dict:
    """Every (item, seed) of an experiment (comparison rows, sweep points: anything with ``key`` and
    ``label``), seeds outermost: reused from ``output_dir/seed<k>/<key>/row.json`` when it was made with
    the same ``options``, else ``run_one(item, seed, item_dir)``, then ``outcome(run)`` printed. A failed
    job ends the experiment with the item and seed named. Returns key -> runs in seed order."""
    runs = {}
    for seed in seeds:
        for item in items:
            item_dir = output_dir / f"seed{seed}" / item.key
            run = finished_run(item_dir, options)
            if run is not None:
                report.stage(f"{item.label}, seed {seed}: reusing {item_dir / 'row.json'}", start)
            else:
                try:
                    run = run_one(item, seed, item_dir)
                except subprocess.CalledProcessError as error:
                    raise SystemExit(f"{item.label}, seed {seed} failed (exit {error.returncode}); "
                                     f"{error.output or ''}") from error
                report.stage(f"{item.label}, seed {seed}: {outcome(run)}", start)
            runs.setdefault(item.key, []).append(run)
    return runs


def run_comparison(rows: list[Row], args) -> dict:
    """Run (or reuse) every (row, seed), then write and return the summary."""
    for row in rows:
        for name in row.configs:
            if not (args.config_dir / f"{name}.yaml").is_file():
                raise FileNotFoundError(f"row {row.key!r} needs {args.config_dir / name}.yaml")
    start = time.time()
    report.stage("preparing data and pretrained parts; counting trainable parameters", start)
    params = prepare(args.config_dir, rows, args.options, args.seeds)
    runs = runs_over_seeds(
        rows, args.seeds, args.output_dir, args.options, lambda row, seed, row_dir: run_row(row, seed, args, row_dir, start),
        lambda run: f"val CIDEr {run['val']['CIDEr']:.1f} (blind {run['val_blind']['CIDEr']:.1f}), "
                    f"{run['train_seconds'] / 60:.1f} train min",
        start,
    )
    summary = summarize(rows, runs, params, args)
    report.stage(f"done; written {args.results_dir / 'results.md'}, results.json, convergence.png", start)
    print((args.results_dir / "results.md").read_text())
    return summary
