"""The main job (README, "Main job"): EVLGen on the offline mini world, over seeds, on CPU processes.

For each seed k (training seed ``run.seed=k`` and world seed ``build_info.seed=k``; the held-out
colour-shape pairs are the same for every world seed):

1. train EVLGen captioning (``projects/evlgen/mini/caption.yaml``) under torch.distributed.run;
2. evaluate the best-val checkpoint: captions on val and test (CIDEr, BLEU-4, METEOR, ROUGE-L and
   the scene-grounded scores), zero-shot VQA on test (overall and per question type);
3. evaluate the same checkpoint blind (soft prompts shuffled across the batch: each caption is
   conditioned on another image), the score a model that ignores the image gets.

Then the mean ± std over seeds goes to ``OUTPUT_DIR/summary.{md,json}``. A finished seed
(``seed<k>/scores.json``) made with the same settings is reused, so an interrupted run continues;
``--reevaluate`` evaluates its checkpoint again instead (training reused).
"""
import json
import time
from pathlib import Path

from omegaconf import OmegaConf

from lavis_evlgen.common.jobs import REPO_ROOT, launch_job
from lavis_evlgen.experiments import report

CAPTION_CFG = REPO_ROOT / "projects/evlgen/mini/caption.yaml"
VQA_CFG = REPO_ROOT / "projects/evlgen/mini/vqa.yaml"
MODELS = {"EVLGen": [], "blind (shuffled soft prompts)": ["model.prefix_ablation=shuffle"]}


def seed_options(seed: int, dataset: str) -> list[str]:
    """Overrides that make a job on the shapes ``dataset`` (shapes_caption | shapes_vqa) seed ``seed``:
    the training seed and the world seed."""
    return [f"run.seed={seed}", f"datasets.{dataset}.build_info.seed={seed}"]


def prepare(model_type: str, seeds: list[int], options: list[str]) -> None:
    """Build each seed's world and every pretrained part the model type names (cached after the first run)."""
    from lavis_evlgen.assets.resolver import resolve_pretrained
    from lavis_evlgen.datasets.shapes_world import ensure_shapes_world
    from lavis_evlgen.models import EVLGenVicuna

    project = OmegaConf.merge(OmegaConf.load(CAPTION_CFG), OmegaConf.from_dotlist(options))
    world = project.datasets.shapes_caption.build_info
    # The dataset config's defaults fill in what the project config leaves out.
    settings = {key: world[key] for key in ("num_train", "num_val", "num_test", "image_size") if key in world}
    for seed in seeds:
        ensure_shapes_world(seed=seed, **settings)
    model_cfg = OmegaConf.merge(OmegaConf.load(EVLGenVicuna.default_config_path(model_type)).model,
                                project.model)
    for key in ("vit_model", "connector_init", "llm_model"):
        print(f"  {key}: {model_cfg[key]} -> {resolve_pretrained(model_cfg[key], config_key=key)}", flush=True)


def read_metrics(job: Path, split: str) -> dict:
    return json.loads((job / f"metrics_{split}.json").read_text())


def run_seed(seed: int, model_type: str, nproc: int, out: Path, options: list[str], vqa_options: list[str],
             start: float) -> dict:
    """Train and evaluate one seed in ``out``; returns (and writes to ``out/scores.json``) its result.

    ``options`` apply to every caption job (training and evaluation); the VQA evaluations get
    its ``model.`` overrides and ``vqa_options``.
    """
    base = [f"model.model_type={model_type}"] + seed_options(seed, "shapes_caption")
    seed_start = time.time()
    report.stage(f"seed {seed}: training EVLGen captioning", start)
    train_job = launch_job("train.py", CAPTION_CFG, nproc, out / "train", base + options, log=out / "train.log")
    result = {"seed": seed, "model_type": model_type, "options": options + vqa_options, "nproc": nproc,
              "checkpoint": str(train_job / "checkpoint_best.pth"), "train_wall_seconds": round(time.time() - seed_start)}
    return evaluate_seed(result, out, options, vqa_options, start)


def evaluate_seed(result: dict, out: Path, options: list[str], vqa_options: list[str], start: float) -> dict:
    """Evaluate the checkpoint of a seed's ``result`` (trained and blind) in ``out``; returns the
    result with its ``scores`` and ``wall_seconds`` (training + this evaluation), also written to
    ``out/scores.json``."""
    seed, model_type, checkpoint = result["seed"], result["model_type"], Path(result["checkpoint"])
    if not checkpoint.is_file():
        raise FileNotFoundError(f"seed {seed}: checkpoint {checkpoint} (named in {out / 'scores.json'}) is missing")
    eval_start = time.time()
    trained = [f"model.model_type={model_type}", "model.load_finetuned=True", f"model.finetuned={checkpoint}"]
    caption_opts = seed_options(seed, "shapes_caption") + options + [
        "run.evaluate=True", "run.train_splits=[]", "run.valid_splits=[]", "run.test_splits=[val,test]"]
    vqa_opts = seed_options(seed, "shapes_vqa") + [o for o in options if o.startswith("model.")] + vqa_options

    scores = {}
    for name, ablation in MODELS.items():
        tag = "blind" if ablation else "eval"
        report.stage(f"seed {seed}: evaluating {name}: captions (val, test), zero-shot VQA (test)", start)
        caption_job = launch_job("evaluate.py", CAPTION_CFG, result["nproc"], out / f"{tag}_caption",
                                 trained + caption_opts + ablation, log=out / f"{tag}_caption.log")
        vqa_job = launch_job("evaluate.py", VQA_CFG, result["nproc"], out / f"{tag}_vqa", trained + vqa_opts + ablation,
                             log=out / f"{tag}_vqa.log")
        scores[name] = {"val": report.caption_scores(read_metrics(caption_job, "val")),
                        "test": report.caption_scores(read_metrics(caption_job, "test")),
                        "vqa": report.vqa_scores(read_metrics(vqa_job, "test"))}
    result = {**result, "wall_seconds": result["train_wall_seconds"] + round(time.time() - eval_start),
              "evaluated": time.strftime("%Y-%m-%d %H:%M"), "scores": scores}
    (out / "scores.json").write_text(json.dumps(result, indent=2))
    return result


def finished_seed(out: Path, seed: int, model_type: str, options: list[str]) -> dict | None:
    """A seed's earlier result in ``out`` when it was made with these settings; an error when with others."""
    done = out / "scores.json"
    if not done.is_file():
        return None
    result = json.loads(done.read_text())
    if (result["model_type"], result["options"]) != (model_type, options):  # options: caption + VQA ones
        raise FileExistsError(f"{done} holds seed {seed} run with model type {result['model_type']!r} and options "
                              f"{result['options']}, not {model_type!r} and {options}: use another --output-dir")
    return result


def summarize(results: list[dict]) -> dict:
    """Mean ± std over seeds of every score, per model and split: {model: {section: {label: stat}}}."""
    models = results[0]["scores"]
    return {model: {section: report.aggregate([r["scores"][model][section] for r in results])
                    for section in models[model]} for model in models}


def markdown(summary: dict) -> str:
    """The main job's tables: caption metrics, scene-grounded scores, zero-shot VQA per question type."""
    stats = summary["scores"]
    seeds = ", ".join(map(str, summary["seeds"]))
    caption_columns = [label for _, label in report.CAPTION_METRICS]
    caption_rows = {f"{model}, {split}": stats[model][split] for model in stats for split in ("val", "test")}
    scene_columns = [label for _, label in report.SCENE_METRICS]
    vqa_columns = [label for _, label in report.VQA_METRICS]
    return "\n".join([
        f"# Main job: EVLGen on the mini world, mean ± std over seeds {seeds}",
        "",
        f"- command: `{summary['command']}`",
        f"- date: {summary['date']}; machine: {summary['machine']}; {summary['nproc']} processes per job",
        f"- wall time {summary['wall_minutes']:.1f} min for {len(summary['seeds'])} seeds "
        f"(training {summary['train_minutes']['mean']:.1f} min per seed)",
        "- seed k = training seed k and world seed k; the held-out colour-shape pairs are the same in every world",
        "- blind: the same checkpoint with each caption conditioned on another image's soft prompts",
        "",
        "## Captions (pycocoevalcap, x100)",
        "",
        report.stats_table("model, split", caption_rows, caption_columns),
        "",
        "## What the captions say, scored against the scene (%; unparseable, repeated = numbers of captions)",
        "",
        report.stats_table("model, split", caption_rows, scene_columns),
        "",
        "## Zero-shot VQA on test, accuracy % per question type",
        "",
        report.stats_table("model", {model: stats[model]["vqa"] for model in stats}, vqa_columns),
        "",
    ])


def run_main_job(seeds: list[int], model_type: str, nproc: int, output_dir: Path, options: list[str],
                 vqa_options: list[str], command: str, reevaluate: bool = False) -> dict:
    """Run (or reuse) every seed, then write and return the summary over seeds. ``reevaluate``: a
    finished seed's checkpoint is evaluated again with today's evaluation settings (after a change
    of decoding, say), its training reused."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must be distinct integers, got {seeds}")
    start = time.time()
    report.stage("preparing data and pretrained parts (cached after the first run)", start)
    prepare(model_type, seeds, options)
    results = []
    for seed in seeds:
        out = output_dir / f"seed{seed}"
        result = finished_seed(out, seed, model_type, options + vqa_options)
        if result is not None and reevaluate:
            report.stage(f"seed {seed}: evaluating again the checkpoint of {out / 'scores.json'}", start)
            result = evaluate_seed(result, out, options, vqa_options, start)
        elif result is not None:
            report.stage(f"seed {seed}: reusing {out / 'scores.json'}", start)
        else:
            result = run_seed(seed, model_type, nproc, out, options, vqa_options, start)
        results.append(result)
        evlgen = result["scores"]["EVLGen"]["val"]
        blind = result["scores"]["blind (shuffled soft prompts)"]["val"]
        report.stage(f"seed {seed}: val CIDEr {evlgen['CIDEr']:.1f} (blind {blind['CIDEr']:.1f}), count acc "
              f"{evlgen['count acc']:.1f}, pair F1 {evlgen['pair F1']:.1f} (blind {blind['pair F1']:.1f})", start)

    summary = {
        "command": command,
        "date": time.strftime("%Y-%m-%d"),
        "machine": report.machine(),
        "model_type": model_type,
        "nproc": nproc,
        "seeds": seeds,
        "wall_minutes": sum(r["wall_seconds"] for r in results) / 60,
        "train_minutes": report.mean_std([r["train_wall_seconds"] / 60 for r in results]),
        "scores": summarize(results),
        "per_seed": results,
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (output_dir / "summary.md").write_text(markdown(summary))
    report.stage(f"done: {len(seeds)} seeds", start)
    print(markdown(summary))
    print(f"written: {output_dir / 'summary.md'}, {output_dir / 'summary.json'}")
    return summary
