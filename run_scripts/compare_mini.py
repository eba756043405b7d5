"""The paper's main comparison (BLIP-2 vs EVLGen, zero_shot_main) in miniature, on the offline mini world.

    python run_scripts/compare_mini.py [--nproc 2] [--output-dir output/compare/mini]
        [--results-dir DIR] [--rows ROW ...] [--target-fraction 0.95] [--options KEY=VALUE ...]
        [--reference EARLIER/results.json]

Every row is a LAVIS config in ``--config-dir`` (default projects/compare/mini/), trained with
the same step budget, data, vision encoder, LLM and processes, validated every
``run.iters_per_inner_epoch`` steps. For each row the command then evaluates the best-val
checkpoint: captions on test (by the training job), zero-shot VQA on test, and captions on val
with the soft prompts shuffled across the batch (the blind score: a row whose captions ignore
the image scores the same as its blind score). It writes to ``--results-dir``:

- results.md / results.json: the scores, trainable parameters, steps and training time of every
  row, the paper's numbers for the matching rows (docs/paper_results.yaml) beside them, and the
  training time each row takes to reach the target (``--target-fraction`` x BLIP-2 two-stage's
  best val CIDEr) with BLIP-2's two-stage total over each EVLGen row's;
- convergence.png: val CIDEr against training time, one line per row.

Training time is the time spent in training steps (validation excluded), summed over stages.
Finished rows (OUTPUT_DIR/<row>/row.json) are reused: rerun after an interruption to continue.
A run of some rows only (e.g. a longer budget for one row) can take its target and BLIP-2 line
from an earlier run's results.json (``--reference``).
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from lavis_evlgen.common.jobs import REPO_ROOT, launch_job

CAPTION_KEYS = [("CIDEr", "CIDEr"), ("Bleu_4", "BLEU-4"), ("METEOR", "METEOR"), ("ROUGE_L", "ROUGE-L")]
PAPER_RESULTS = REPO_ROOT / "docs/paper_results.yaml"


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


def stage(message: str, start: float) -> None:
    print(f"==== [{(time.time() - start) / 60:5.1f} min] {message}", flush=True)


# ---------------------------------------------------------------------------- configs
def model_config(cfg_path: Path, options: list[str]):
    """The model section LAVIS would build from ``cfg_path`` + ``options``: model-type defaults < project < options."""
    from lavis.common.registry import registry

    project = OmegaConf.merge(OmegaConf.load(cfg_path), OmegaConf.from_dotlist(options))
    model_cls = registry.get_model_class(project.model.arch)
    return model_cls, OmegaConf.merge(OmegaConf.load(model_cls.default_config_path(project.model.model_type)).model,
                                      project.model)


def count_trainable(cfg_path: Path, options: list[str]) -> int:
    """Trainable parameters of the model ``cfg_path`` builds (a stage-1 checkpoint is not needed to count)."""
    model_cls, cfg = model_config(cfg_path, options)
    if "stage1_checkpoint" in cfg:
        cfg.stage1_checkpoint = None
    return model_cls.from_config(cfg).num_trainable_parameters()


def prepare(config_dir: Path, rows: list[Row], options: list[str]) -> dict[str, list[int]]:
    """Generate the data, build every pretrained part once (cached); return trainable parameters per stage."""
    from lavis_evlgen.datasets.shapes_world import ensure_shapes_world

    world = OmegaConf.merge(OmegaConf.load(config_dir / f"{rows[0].configs[-1]}.yaml"),
                            OmegaConf.from_dotlist(options)).datasets.shapes_caption.build_info
    ensure_shapes_world(seed=world.seed, num_train=world.num_train, num_val=world.num_val, num_test=world.num_test)
    params = {}
    for row in rows:
        params[row.key] = [count_trainable(config_dir / f"{name}.yaml", options) for name in row.configs]
        print(f"  {row.label}: {' + '.join(f'{p:,}' for p in params[row.key])} trainable parameters", flush=True)
    return params


# ---------------------------------------------------------------------------- one row
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
    """Add the row's validation curve (read from its jobs' logs) and its best point to ``result``.

    Each stage validates after every training chunk, so validation i comes after chunks 0..i;
    a later stage's times start where the previous stage's training ended. The best point is the
    runner's (by its agg_metrics, CIDEr + BLEU-4): the checkpoint_best.pth every evaluation used.
    """
    curve, offset = [], 0.0
    for stage_info in result["stages"]:
        seconds, validations = read_training_log(Path(stage_info["job"]))
        for i, v in enumerate(validations):
            curve.append({"iters": v["iters"], "train_seconds": round(offset + sum(seconds[: i + 1]), 1),
                          "val": caption_scores(v["metrics"])})
        offset += sum(seconds)
    best_iters = validations[-1]["best_iters"]
    (best,) = [p for p in curve[-len(validations):] if p["iters"] == best_iters]
    return {**result, "curve": curve, "best_iters": best_iters, "val": best["val"]}


def read_metrics(job: Path, split: str) -> dict:
    return json.loads((job / f"metrics_{split}.json").read_text())


def caption_scores(metrics: dict) -> dict:
    return {label: round(100 * metrics[key], 2) for key, label in CAPTION_KEYS}


def run_row(row: Row, args, out: Path, start: float) -> dict:
    """Train a row's stages, evaluate its best checkpoint; returns (and saves) its results."""
    row_dir = out / row.key
    row_start = time.time()
    stages, stage1_checkpoint = [], None
    for name in row.configs:
        cfg = args.config_dir / f"{name}.yaml"
        options = list(args.options)
        if stage1_checkpoint is not None:
            options.append(f"model.stage1_checkpoint={stage1_checkpoint}")
        stage(f"{row.label}: training {cfg.name}", start)
        t0 = time.time()
        job = launch_job("train.py", cfg, args.nproc, row_dir / name, options, log=row_dir / f"{name}.log")
        seconds, _ = read_training_log(job)
        chunk = int(OmegaConf.merge(OmegaConf.load(cfg), OmegaConf.from_dotlist(options)).run.iters_per_inner_epoch)
        stages.append({"config": str(cfg.relative_to(REPO_ROOT)) if cfg.is_relative_to(REPO_ROOT) else str(cfg),
                       "job": str(job), "steps": chunk * len(seconds), "train_seconds": round(sum(seconds), 1),
                       "wall_seconds": round(time.time() - t0, 1)})
        stage1_checkpoint = job / "checkpoint_latest.pth"

    best_ckpt = job / "checkpoint_best.pth"
    trained = ["model.load_finetuned=True", f"model.finetuned={best_ckpt}"] + [o for o in args.options if o.startswith("model.")]
    if len(row.configs) > 1:
        trained.append("model.stage1_checkpoint=null")  # the finetuned checkpoint holds the whole Q-Former

    stage(f"{row.label}: zero-shot VQA (test) and blind captions (val, shuffled soft prompts)", start)
    vqa_cfg = row_dir / "vqa.yaml"
    vqa = OmegaConf.load(args.vqa_config)
    vqa.model = OmegaConf.load(cfg).model
    OmegaConf.save(vqa, vqa_cfg)
    vqa_job = launch_job("evaluate.py", vqa_cfg, args.nproc, row_dir / "vqa", trained + args.vqa_options,
                         log=row_dir / "vqa.log")
    blind_opts = ["run.evaluate=True", "run.train_splits=[]", "run.valid_splits=[]", "run.test_splits=[val]",
                  "model.prefix_ablation=shuffle"]
    blind_job = launch_job("evaluate.py", cfg, args.nproc, row_dir / "blind", args.options + trained + blind_opts,
                           log=row_dir / "blind.log")
    result = {
        "key": row.key,
        "label": row.label,
        "stages": stages,
        "steps": sum(s["steps"] for s in stages),
        "train_seconds": round(sum(s["train_seconds"] for s in stages), 1),
        "wall_seconds": round(time.time() - row_start, 1),
        "test": caption_scores(read_metrics(job, "test")),
        "vqa_test_accuracy": round(read_metrics(vqa_job, "test")["agg_metrics"], 2),
        "val_blind": caption_scores(read_metrics(blind_job, "val")),
    }
    (row_dir / "row.json").write_text(json.dumps(result, indent=2))
    return with_curve(result)


# ---------------------------------------------------------------------------- summary
def time_to_target(result: dict, target: float) -> float | None:
    """Training seconds at the first validation with val CIDEr >= target (None: never reached)."""
    return next((p["train_seconds"] for p in result["curve"] if p["val"]["CIDEr"] >= target), None)


def paper_row(selector: dict | None) -> dict | None:
    if selector is None:
        return None
    rows = yaml.safe_load(PAPER_RESULTS.read_text())["zero_shot_main"]["rows"]
    (match,) = [r for r in rows if all(str(r.get(k)) == v for k, v in selector.items())]
    return match


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    import torch

    return f"{os.cpu_count()} CPU cores ({cpu}), no GPU used; torch {torch.__version__}, {platform.system()}"


def fmt(value, digits=1, unit="") -> str:
    return "—" if value is None else f"{value:.{digits}f}{unit}"


def summarize(rows: list[Row], results: dict, params: dict, args) -> dict:
    """Write results.json, results.md and convergence.png to args.results_dir; return the summary."""
    reference, source = results.get("blip2_two_stage"), "this run"
    if reference is None and args.reference is not None:
        earlier = json.loads(args.reference.read_text())
        reference = next((r for r in earlier["rows"] if r["key"] == "blip2_two_stage"), None)
        if reference is None:
            raise KeyError(f"--reference {args.reference} has no blip2_two_stage row")
        source = str(args.reference.relative_to(REPO_ROOT) if args.reference.is_relative_to(REPO_ROOT) else args.reference)
    target = args.target_fraction * reference["val"]["CIDEr"] if reference else None
    reference_time = time_to_target(reference, target) if reference else None
    summary = {
        "command": " ".join(["python", "run_scripts/compare_mini.py", *args.argv]),
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "nproc": args.nproc,
        "wall_minutes": round(sum(results[r.key]["wall_seconds"] for r in rows if r.key in results) / 60, 1),
        "target": {"metric": "val CIDEr", "fraction_of_blip2_two_stage_best": args.target_fraction,
                   "value": None if target is None else round(target, 2), "source": source},
        "reference_row": reference if source != "this run" else None,
        "rows": [],
        "note": "caption metrics x100 (pycocoevalcap CIDEr 1.0 = 100); VQA accuracy in %; "
                "train time = seconds in training steps, all stages, validation excluded",
    }
    for row in rows:
        if row.key not in results:
            continue
        r = dict(results[row.key])
        r["trainable_params"] = params[row.key]
        r["seconds_to_target"] = time_to_target(r, target) if target is not None else None
        r["blip2_two_stage_time_ratio"] = (round(reference_time / r["seconds_to_target"], 2)
                                           if reference_time and r["seconds_to_target"] else None)
        r["paper"] = paper_row(row.paper)
        summary["rows"].append(r)

    out = args.results_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "results.md").write_text(markdown(summary))
    plot(summary, out / "convergence.png")
    return summary


def markdown(summary: dict) -> str:
    target = summary["target"]["value"]
    lines = [
        "# BLIP-2 vs EVLGen on the mini world",
        "",
        f"- command: `{summary['command']}`",
        f"- date: {summary['date']}; machine: {summary['machine']}; {summary['nproc']} processes; "
        f"all rows' jobs (training, validation, evaluation) {summary['wall_minutes']} min",
        "- every row: same data, ViT, LLM, batch, lr recipe and processes; steps as in the table; "
        "scores of the runner's best-val checkpoint (by CIDEr + BLEU-4)",
        f"- {summary['note']}",
        *([f"- target and the BLIP-2 two-stage reference from an earlier run: {summary['target']['source']}"]
          if summary["reference_row"] else []),
        "",
        "## Measured",
        "",
        "| row | trainable params | steps | train time (min) | val CIDEr | val CIDEr, blind | val B4 | val METEOR | val ROUGE-L "
        "| test CIDEr | test B4 | test METEOR | test ROUGE-L | VQA acc (test) |",
        "|---" * 14 + "|",
    ]
    for r in summary["rows"]:
        params = " + ".join(f"{p / 1e6:.1f}M" for p in r["trainable_params"])
        steps = " + ".join(str(s["steps"]) for s in r["stages"])
        v, t = r["val"], r["test"]
        lines.append(
            f"| {r['label']} | {params} | {steps} | {r['train_seconds'] / 60:.1f} | {v['CIDEr']:.1f} | "
            f"{r['val_blind']['CIDEr']:.1f} | {v['BLEU-4']:.1f} | {v['METEOR']:.1f} | {v['ROUGE-L']:.1f} | "
            f"{t['CIDEr']:.1f} | {t['BLEU-4']:.1f} | {t['METEOR']:.1f} | {t['ROUGE-L']:.1f} | {r['vqa_test_accuracy']:.1f} |"
        )
    lines += [
        "",
        "\"val CIDEr, blind\": the same checkpoint with its soft prompts shuffled across the batch "
        "(each caption conditioned on another image); a row near its blind score ignores the image.",
        "",
        f"## Time to target (val CIDEr >= {fmt(target)} = {summary['target']['fraction_of_blip2_two_stage_best']} "
        "x BLIP-2 two-stage's best) and the paper beside it",
        "",
        "| row | train min to target | BLIP-2 two-stage time / row's | paper row | paper COCO val CIDEr | paper VQAv2 val "
        "| paper trainable | paper steps (stage 1 + 2) | paper clock h |",
        "|---" * 9 + "|",
    ]
    for r in summary["rows"]:
        p = r["paper"] or {}
        steps = " + ".join(str(p[k]) for k in ("stage1_steps", "stage2_steps") if p.get(k)) or "—"
        paper_score = p.get("coco_val_cider", p.get("result", "—"))
        to_target = fmt(r["seconds_to_target"] / 60 if r["seconds_to_target"] else None)
        if r["seconds_to_target"] is None and target is not None:
            to_target = f"not reached in {r['steps']} steps"
        lines.append(
            f"| {r['label']} | {to_target} | {fmt(r['blip2_two_stage_time_ratio'], 2, 'x')} | "
            f"{p.get('model', '—')} {p.get('pretrain_pairs', '')} | {paper_score} | {p.get('vqav2_val', '—')} | "
            f"{p.get('trainable_params', '—')} | {steps} | {p.get('clock_hours', '—')} |"
        )
    lines += ["", "![val CIDEr against training time](convergence.png)", ""]
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    """val CIDEr against training minutes, one line per row; BLIP-2 two-stage starts after stage 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    reference = summary["reference_row"]
    for r in summary["rows"] + ([reference] if reference else []):
        xs = [p["train_seconds"] / 60 for p in r["curve"]]
        ys = [p["val"]["CIDEr"] for p in r["curve"]]
        if r is reference:
            (line,) = ax.plot(xs, ys, marker="o", linestyle="--", label=f"{r['label']} ({summary['target']['source']})")
        else:
            (line,) = ax.plot(xs, ys, marker="o", label=r["label"])
        if len(r["stages"]) > 1:
            stage1 = r["stages"][0]["train_seconds"] / 60
            ax.axvline(stage1, color=line.get_color(), linestyle=":", linewidth=1)
            ax.text(stage1, 0.02, "stage 1 done", transform=ax.get_xaxis_transform(), color=line.get_color(),
                    fontsize=8, rotation=90, va="bottom", ha="right")
    blind = max(r["val_blind"]["CIDEr"] for r in summary["rows"])
    ax.axhline(blind, color="gray", linestyle=":", linewidth=1, label=f"best blind score of any row ({blind:.1f})")
    if summary["target"]["value"] is not None:
        ax.axhline(summary["target"]["value"], color="black", linestyle="--", linewidth=1,
                   label=f"target ({summary['target']['value']:.1f})")
    ax.set_xlabel("training time, minutes (all stages, validation excluded)")
    ax.set_ylabel("val CIDEr (shapes world)")
    ax.set_title("BLIP-2 vs EVLGen on the mini world (same data, ViT and LLM)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2, help="CPU processes per job (torch.distributed.run)")
    parser.add_argument("--config-dir", type=Path, default=REPO_ROOT / "projects/compare/mini")
    parser.add_argument("--vqa-config", type=Path, default=REPO_ROOT / "projects/evlgen/mini/vqa.yaml",
                        help="datasets/run sections for the VQA evaluation (its model section is replaced)")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "output/compare/mini")
    parser.add_argument("--results-dir", type=Path, help="where results.{md,json} and convergence.png go (default: output dir)")
    parser.add_argument("--rows", nargs="+", choices=[r.key for r in ROWS], default=[r.key for r in ROWS])
    parser.add_argument("--target-fraction", type=float, default=0.95)
    parser.add_argument("--reference", type=Path,
                        help="an earlier results.json whose BLIP-2 two-stage row sets the target when this run has none")
    parser.add_argument("--options", nargs="*", default=[], help="overrides for every training job (key=value)")
    parser.add_argument("--vqa-options", nargs="*", default=[], help="overrides for the VQA evaluations")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    args.config_dir, args.output_dir = args.config_dir.resolve(), args.output_dir.resolve()
    args.results_dir = (args.results_dir or args.output_dir).resolve()
    args.reference = args.reference.resolve() if args.reference else None
    rows = [r for r in ROWS if r.key in args.rows]
    for row in rows:
        for name in row.configs:
            if not (args.config_dir / f"{name}.yaml").is_file():
                raise FileNotFoundError(f"row {row.key!r} needs {args.config_dir / name}.yaml")

    start = time.time()
    stage("preparing data and pretrained parts; counting trainable parameters", start)
    params = prepare(args.config_dir, rows, args.options)
    results = {}
    for row in rows:
        done = args.output_dir / row.key / "row.json"
        if done.is_file():
            stage(f"{row.label}: reusing {done}", start)
            results[row.key] = with_curve(json.loads(done.read_text()))
            continue
        try:
            results[row.key] = run_row(row, args, args.output_dir, start)
        except subprocess.CalledProcessError as error:
            log = error.output or ""
            raise SystemExit(f"{row.label} failed (exit {error.returncode}); {log}") from error
        r = results[row.key]
        stage(f"{row.label}: val CIDEr {r['val']['CIDEr']:.1f} (blind {r['val_blind']['CIDEr']:.1f}), "
              f"VQA {r['vqa_test_accuracy']:.1f}, {r['train_seconds'] / 60:.1f} train min", start)
    summary = summarize(rows, results, params, args)
    stage(f"done; written {args.results_dir / 'results.md'}, results.json, convergence.png", start)
    print((args.results_dir / "results.md").read_text())
    return summary


if __name__ == "__main__":
    main()
