"""The r trade-off and what merging is worth (README, "The r trade-off"), on the mini world, over seeds.

EVLGen merges ViT tokens inside its connector (ToMe bipartite soft matching, method.md §2 step 4)
to cut cost. This sweep measures what the merging buys against the two connectors a practitioner
would try first, all options of the same model (``model.connector``, models/evlgen.py):

- ``tomeformer`` at the base config's depth, one point per soft-prompt count in ``tokens`` (per-layer
  r from ``schedule_to_count``); the full count is r=0: every ViT token through the same BERT;
- ``tomeformer`` at other depths (``layers``) ending at ``depth_tokens``: per-layer schedules, since
  ToMe caps a layer at (T - 1) // 2 merges and a uniform r does not always get there;
- ``avgpool`` at every count of the first axis below the full one: the same BERT layers on the ViT
  tokens average-pooled on the patch grid to that count (at the full count it is the r=0 point);
- ``mlp``: LLaVA's Linear-GELU-Linear on every ViT token, no BERT, no reduction.

Every point trains the base config (train.py under torch.distributed.run) per seed (training and
world seed). Its scores are the runner's best-val checkpoint's val captions (CIDEr, BLEU-4, the
scene-grounded scores) and, when the run tests, its test captions; its time is the seconds spent in
training steps (validation excluded). Finished (point, seed) runs (``OUTPUT_DIR/seed<k>/<point>/row.json``)
made with the same options are reused.
"""
import json
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from lavis_evlgen.common.jobs import REPO_ROOT, launch_job
from lavis_evlgen.common.run_config import load_config
from lavis_evlgen.experiments import report
from lavis_evlgen.experiments.compare import Row, count_trainable, model_config, prepare, read_training_log, \
    runs_over_seeds, with_curve
from lavis_evlgen.experiments.mini import seed_options
from lavis_evlgen.models.merge import schedule_to_count

# Val scores the table and figure show, besides CIDEr: the caption metrics and the scene-grounded ones.
TABLE_SCORES = ("CIDEr", "BLEU-4", "count acc", "colour F1", "shape F1", "pair F1")
# Figure panels: (section of a point's stats, score label, axis label).
PANELS = (("val", "CIDEr", "val CIDEr"), ("val", "count acc", "val count accuracy (%)"),
          ("val", "pair F1", "val colour-shape pair F1 (%)"), (None, "train_minutes", "training minutes"))


@dataclass(frozen=True)
class Point:
    """One connector setting: ``connector`` with ``num_layers`` BERT layers and merge schedule ``r``
    (for avgpool: the schedule whose token count it pools to), ending at ``tokens`` soft prompts."""

    connector: str
    num_layers: int
    r: tuple[int, ...]
    tokens: int

    @property
    def key(self) -> str:
        return f"mlp_t{self.tokens}" if self.connector == "mlp" else f"{self.connector}_L{self.num_layers}_t{self.tokens}"

    @property
    def label(self) -> str:
        if self.connector == "mlp":
            return f"MLP projector, all {self.tokens} tokens"
        if self.connector == "avgpool":
            return f"avg pool to {self.tokens}, {self.num_layers} BERT layers"
        return f"ToMe r={list(self.r)}, {self.num_layers} layers"

    def options(self) -> list[str]:
        """The model overrides that make the base config this point."""
        if self.connector == "mlp":
            return ["model.connector=mlp"]
        return [f"model.connector={self.connector}", f"model.num_layers={self.num_layers}",
                f"model.tome_r=[{','.join(map(str, self.r))}]"]


def sweep_points(num_tokens: int, base_layers: int, tokens: list[int], layers: list[int],
                 depth_tokens: int) -> list[Point]:
    """The sweep's points for ``num_tokens`` ViT tokens (see the module docstring), in table order:
    merging at the base depth by count (most tokens first), pooling, merging at other depths, the MLP."""
    counts = sorted(set(tokens), reverse=True)
    merging = [Point("tomeformer", base_layers, tuple(schedule_to_count(num_tokens, base_layers, t)), t) for t in counts]
    pooling = [Point("avgpool", p.num_layers, p.r, p.tokens) for p in merging if p.tokens < num_tokens]
    depths = [Point("tomeformer", n, tuple(schedule_to_count(num_tokens, n, depth_tokens)), depth_tokens)
              for n in sorted(set(layers)) if (n, depth_tokens) not in {(base_layers, t) for t in counts}]
    return merging + pooling + depths + [Point("mlp", 0, (), num_tokens)]


def budget_options(cfg_path: Path, options: list[str], max_iters: int | None, feature_cache: bool) -> list[str]:
    """``options`` plus the run overrides of the sweep's budget flags: ``run.feature_cache`` (the frozen
    ViT's tokens read from disk, datasets/feature_cache.py) and ``run.max_iters``, with
    ``run.iters_per_inner_epoch`` lowered to it when larger (the runner trains whole chunks of that size)."""
    extra = [f"run.feature_cache={feature_cache}"]
    if max_iters is not None:
        run = OmegaConf.merge(load_config(cfg_path), OmegaConf.from_dotlist(options)).run
        extra.append(f"run.max_iters={max_iters}")
        if int(run.iters_per_inner_epoch) > max_iters:
            extra.append(f"run.iters_per_inner_epoch={max_iters}")
    return list(options) + extra


def base_shape(cfg_path: Path, options: list[str]) -> tuple[int, int]:
    """(ViT tokens per image, connector depth) of the model ``cfg_path`` + ``options`` builds."""
    from lavis_evlgen.models.vision import vision_token_count

    model_cls, cfg = model_config(cfg_path, options)
    model = model_cls.from_config(cfg)
    return vision_token_count(model.visual_encoder, cfg.vit_model, cfg.image_size), model.connector.num_layers


def run_point(point: Point, seed: int, args, point_dir: Path) -> dict:
    """Train one point with ``seed``; returns (and saves to ``point_dir/row.json``) its scores and time."""
    t0 = time.time()
    options = seed_options(seed, "shapes_caption") + point.options() + list(args.options)
    job = launch_job("train.py", args.config, args.nproc, point_dir / "train", options, log=point_dir / "train.log")
    seconds, validations = read_training_log(job)
    steps = validations[-1]["iters"] if validations else None
    result = {"key": point.key, "seed": seed, "options": list(args.options),
              "stages": [{"job": str(job), "steps": steps, "train_seconds": round(sum(seconds), 1),
                          "wall_seconds": round(time.time() - t0, 1)}],
              "steps": steps, "train_seconds": round(sum(seconds), 1), "wall_seconds": round(time.time() - t0, 1)}
    test = job / "metrics_test.json"
    if test.is_file():
        result["test"] = report.caption_scores(json.loads(test.read_text()))
    (point_dir / "row.json").write_text(json.dumps(result, indent=2))
    return with_curve(result)


def point_summary(point: Point, runs: list[dict], params: int) -> dict:
    """One point over its seeds: settings, per-seed runs, mean ± std of every score and of training time."""
    stats = {"val": report.aggregate([run["val"] for run in runs])}
    if all("test" in run for run in runs):
        stats["test"] = report.aggregate([run["test"] for run in runs])
    return {"key": point.key, "label": point.label, "connector": point.connector, "num_layers": point.num_layers,
            "r": list(point.r), "tokens": point.tokens, "trainable_params": params,
            "seeds": [run["seed"] for run in runs], "steps": runs[0]["steps"], "stats": stats,
            "train_minutes": report.mean_std([run["train_seconds"] / 60 for run in runs]), "per_seed": runs}


def verdicts(points: list[dict], num_tokens: int, base_layers: int) -> list[str]:
    """The two questions the sweep answers, as differences against the spread: merging vs pooling at
    equal token count and depth; every token kept (r=0, and the MLP) vs each merged count."""
    by_key = {p["key"]: p for p in points}
    lines = []

    def compare(a: dict, b: dict, label: str) -> None:
        sa, sb = a["stats"]["val"].get(label), b["stats"]["val"].get(label)
        if sa is None or sb is None:
            return
        if min(sa["n"], sb["n"]) < 2:
            verdict = "one seed: no spread to compare against"
        else:
            verdict = "exceeds the spread" if report.exceeds_spread(sa, sb) else "within the spread"
        lines.append(f"- {a['label']} vs {b['label']}, val {label}: {report.fmt(sa)} vs {report.fmt(sb)}: "
                     f"difference {sa['mean'] - sb['mean']:+.1f}, {verdict}")

    for p in points:
        merged = by_key.get(f"tomeformer_L{p['num_layers']}_t{p['tokens']}")
        if p["connector"] == "avgpool" and merged:
            for label in ("CIDEr", "count acc", "pair F1"):
                compare(merged, p, label)
    every_token = [by_key[k] for k in (f"tomeformer_L{base_layers}_t{num_tokens}", f"mlp_t{num_tokens}") if k in by_key]
    for full in every_token:
        for p in points:
            if p["connector"] == "tomeformer" and p["tokens"] < num_tokens:
                compare(p, full, "CIDEr")
                ratio = full["train_minutes"]["mean"] / p["train_minutes"]["mean"]
                lines.append(f"  training time: {full['label']} {report.fmt(full['train_minutes'], 2)} min, "
                             f"{p['label']} {report.fmt(p['train_minutes'], 2)} min (every token: {ratio:.2f}x the time)")
    return lines


def markdown(summary: dict) -> str:
    """The sweep's table (one row per point), the verdicts and the figure."""
    fmt = report.fmt
    rows = []
    for p in summary["points"]:
        val, test = p["stats"]["val"], p["stats"].get("test", {})
        rows.append([p["label"], p["connector"], str(p["num_layers"] or "—"), str(p["r"] or "—"), str(p["tokens"]),
                     f"{p['trainable_params'] / 1e6:.2f}M", fmt(p["train_minutes"], 2),
                     *(fmt(val.get(label)) for label in TABLE_SCORES), fmt(test.get("CIDEr"))])
    return "\n".join([
        "# The r trade-off on the mini world: ToMe merging vs average pooling vs an MLP projector",
        "",
        f"- command: `{summary['command']}`",
        f"- date: {summary['date']}; machine: {summary['machine']}; {summary['nproc']} processes per job; "
        f"all jobs {summary['wall_minutes']} min",
        f"- seeds {', '.join(map(str, summary['seeds']))} (training seed and world seed); cells are mean ± std "
        f"over them (one value: one seed); {summary['steps']} training steps per point",
        f"- {summary['num_tokens']} ViT tokens per image; every point: same data, ViT, LLM, batch and lr recipe; "
        "scores of the runner's best-val checkpoint (by CIDEr + BLEU-4); caption metrics x100, scene scores in %; "
        "train min = minutes in training steps, validation excluded",
        f"- options for every job: `{' '.join(summary['options']) or '(none)'}`",
        "",
        report.markdown_table(["point", "connector", "BERT layers", "r per layer", "soft prompts", "trainable",
                               "train min", *(f"val {label}" for label in TABLE_SCORES), "test CIDEr"], rows),
        "",
        "avgpool: the ViT tokens (CLS kept) average-pooled on the patch grid to the count of the ToMe schedule "
        "in its row, then the same BERT layers with no merging; MLP: Linear-GELU-Linear on every token.",
        "",
        "## Differences against the spread (|mean difference| > std + std)",
        "",
        *summary["verdicts"],
        "",
        "![val scores and training time against soft prompts](r_sweep.png)",
        "",
    ])


def plot(summary: dict, path: Path) -> None:
    """Four panels against the soft-prompt count: val CIDEr, count accuracy, pair F1, training minutes;
    merging and pooling at the base depth as lines, other depths and the MLP as markers (± std bars).
    Answers: does merging beat pooling at equal count, and what does it cost against every token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points, base = summary["points"], summary["base_layers"]
    series = [("ToMe merging, %d layers" % base, "o-", [p for p in points if p["connector"] == "tomeformer"
                                                         and p["num_layers"] == base]),
              ("average pooling, %d BERT layers" % base, "s--", [p for p in points if p["connector"] == "avgpool"])]
    series += [(f"ToMe merging, {n} layers", marker, [p for p in points if p["connector"] == "tomeformer"
                                                      and p["num_layers"] == n])
               for n, marker in zip(sorted({p["num_layers"] for p in points
                                            if p["connector"] == "tomeformer" and p["num_layers"] != base}), "^vD<>")]
    series.append(("MLP projector (no BERT)", "*", [p for p in points if p["connector"] == "mlp"]))

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), dpi=120)
    for ax, (section, label, axis_label) in zip(axes.flat, PANELS):
        for i, (name, style, group) in enumerate(series):
            group = sorted(group, key=lambda p: p["tokens"])
            stats = [p[label] if section is None else p["stats"][section].get(label) for p in group]
            # Series share token counts: each is moved sideways a little so that no marker hides another.
            dodge = 0.4 * (i - (len(series) - 1) / 2)
            shown = [(p["tokens"] + dodge, s) for p, s in zip(group, stats) if s is not None]
            if shown:
                ax.errorbar([x for x, _ in shown], [s["mean"] for _, s in shown], yerr=[s["std"] for _, s in shown],
                            fmt=style, capsize=3, markersize=9 if style == "*" else 6, label=name)
        ax.set_xlabel(f"soft prompts (ViT tokens after the connector; {summary['num_tokens']} = every token; "
                      "series dodged sideways)", fontsize=8)
        ax.set_ylabel(axis_label)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"EVLGen connectors on the mini world: {summary['steps']} steps, seeds "
                 f"{', '.join(map(str, summary['seeds']))}, mean ± std", fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_sweep(args) -> dict:
    """Run (or reuse) every (point, seed); write results.json, results.md and r_sweep.png to
    ``args.results_dir``; return the summary."""
    start = time.time()
    report.stage("preparing data and pretrained parts (cached after the first run)", start)
    prepare(args.config.parent, [Row("base", "base config", [args.config.stem])], args.options, args.seeds)
    num_tokens, base_layers = base_shape(args.config, args.options)
    points = sweep_points(num_tokens, base_layers, args.tokens, args.layers, args.depth_tokens)
    params = {p.key: count_trainable(args.config, p.options() + list(args.options)) for p in points}
    for p in points:
        print(f"  {p.key}: {p.label}, {params[p.key]:,} trainable parameters", flush=True)

    def train_point(point, seed: int, point_dir: Path) -> dict:
        report.stage(f"{point.label}, seed {seed}: training", start)
        return run_point(point, seed, args, point_dir)

    runs = runs_over_seeds(points, args.seeds, args.output_dir, args.options, train_point,
                           lambda run: f"val CIDEr {run['val']['CIDEr']:.1f}, {run['train_seconds'] / 60:.2f} train min",
                           start)

    summaries = [point_summary(p, runs[p.key], params[p.key]) for p in points]
    summary = {
        **report.summary_header("run_scripts/sweep_r.py", args, runs),
        "options": list(args.options),
        "config": str(args.config.relative_to(REPO_ROOT) if args.config.is_relative_to(REPO_ROOT) else args.config),
        "num_tokens": num_tokens,
        "base_layers": base_layers,
        "steps": summaries[0]["steps"],
        "points": summaries,
        "verdicts": verdicts(summaries, num_tokens, base_layers),
    }
    report.write_summary(args.results_dir, summary, markdown(summary), plot, "r_sweep.png")
    report.stage(f"done; written {args.results_dir / 'results.md'}, results.json, r_sweep.png", start)
    print(markdown(summary))
    return summary
