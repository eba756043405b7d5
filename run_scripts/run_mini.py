"""The main job: EVLGen on the offline mini world, end to end, on CPU processes.

    python run_scripts/run_mini.py [--nproc 2] [--model-type mini] [--output-dir output/evlgen/mini]

1. prepares what is missing: the shapes world, the converted ViT, the connector init and the
   in-house text LM (all under $EVLGEN_CACHE);
2. trains EVLGen captioning (projects/evlgen/mini/caption.yaml) under torch.distributed.run;
3. evaluates the best checkpoint -- captions on val and test, zero-shot VQA on test -- and the
   same checkpoint blind (soft prompts shuffled across the batch, so each caption is conditioned
   on another image);
4. prints and writes (OUTPUT_DIR/summary.{md,json}) the scores side by side.
"""
import argparse
import json
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from lavis_evlgen.common.jobs import launch_job as launch

REPO = Path(__file__).resolve().parents[1]
CAPTION_CFG = REPO / "projects/evlgen/mini/caption.yaml"
VQA_CFG = REPO / "projects/evlgen/mini/vqa.yaml"
CAPTION_KEYS = [("CIDEr", "CIDEr"), ("Bleu_4", "BLEU-4"), ("METEOR", "METEOR"), ("ROUGE_L", "ROUGE-L")]


def stage(message: str, start: float) -> None:
    print(f"\n==== [{time.time() - start:6.0f} s] {message}", flush=True)


def prepare(model_type: str) -> None:
    """Build the data and every pretrained part the mini model names, with progress output."""
    from lavis_evlgen.assets.resolver import resolve_pretrained
    from lavis_evlgen.datasets.shapes_world import ensure_shapes_world
    from lavis_evlgen.models import EVLGenVicuna

    world = OmegaConf.load(CAPTION_CFG).datasets.shapes_caption.build_info
    ensure_shapes_world(seed=world.seed, num_train=world.num_train, num_val=world.num_val, num_test=world.num_test)
    model_cfg = OmegaConf.load(EVLGenVicuna.default_config_path(model_type)).model
    for key in ("vit_model", "connector_init", "llm_model"):
        print(f"  {key}: {model_cfg[key]} -> {resolve_pretrained(model_cfg[key], config_key=key)}", flush=True)


def read_metrics(job: Path, split: str) -> dict:
    return json.loads((job / f"metrics_{split}.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2, help="CPU processes (torch.distributed.run)")
    parser.add_argument("--model-type", default="mini", help="evlgen_vicuna model type: mini | mini_smollm2")
    parser.add_argument("--output-dir", type=Path, default=REPO / "output/evlgen/mini")
    parser.add_argument("--options", nargs="*", default=[], help="extra overrides for the training config")
    args = parser.parse_args()
    out = args.output_dir.resolve()
    start = time.time()
    model = [f"model.model_type={args.model_type}"]

    stage("1/4 preparing data and pretrained parts (cached after the first run)", start)
    prepare(args.model_type)

    stage("2/4 training EVLGen captioning", start)
    train_job = launch("train.py", CAPTION_CFG, args.nproc, out / "train", model + args.options)
    checkpoint = train_job / "checkpoint_best.pth"
    trained = model + ["model.load_finetuned=True", f"model.finetuned={checkpoint}"]
    train_seconds = time.time() - start

    stage("3/4 evaluating the trained model: captions (val, test), zero-shot VQA (test)", start)
    caption_opts = ["run.evaluate=True", "run.train_splits=[]", "run.valid_splits=[]", "run.test_splits=[val,test]"]
    seen = launch("evaluate.py", CAPTION_CFG, args.nproc, out / "eval_caption", trained + caption_opts)
    seen_vqa = launch("evaluate.py", VQA_CFG, args.nproc, out / "eval_vqa", trained)

    stage("4/4 evaluating the blind baseline (same checkpoint, soft prompts shuffled across the batch)", start)
    blind_opts = ["model.prefix_ablation=shuffle"]
    blind = launch("evaluate.py", CAPTION_CFG, args.nproc, out / "blind_caption", trained + caption_opts + blind_opts)
    blind_vqa = launch("evaluate.py", VQA_CFG, args.nproc, out / "blind_vqa", trained + blind_opts)

    rows = {}
    for name, caption_job, vqa_job in (("EVLGen", seen, seen_vqa), ("blind (shuffled soft prompts)", blind, blind_vqa)):
        row = {f"{split} {label}": 100 * read_metrics(caption_job, split)[key]
               for split in ("val", "test") for key, label in CAPTION_KEYS}
        row["test VQA acc"] = read_metrics(vqa_job, "test")["agg_metrics"]
        rows[name] = row
    wall = time.time() - start
    columns = list(next(iter(rows.values())))
    table = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    table += [f"| {name} | " + " | ".join(f"{row[c]:.1f}" for c in columns) + " |" for name, row in rows.items()]
    summary = {
        "command": " ".join(["python", "run_scripts/run_mini.py", *sys.argv[1:]]),
        "model_type": args.model_type,
        "nproc": args.nproc,
        "wall_seconds": round(wall),
        "seconds_until_trained": round(train_seconds),
        "checkpoint": str(checkpoint),
        "scores": rows,
        "note": "caption metrics x100 (CIDEr 100 = 1.0 in pycocoevalcap's scale); VQA accuracy in %",
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text("\n".join(table) + f"\n\nwall time {wall / 60:.1f} min, {args.nproc} processes\n")
    stage(f"done in {wall / 60:.1f} min", start)
    print("\n".join(table))
    print(f"\nwritten: {out / 'summary.md'}, {out / 'summary.json'}")


if __name__ == "__main__":
    main()
