"""The main job: EVLGen on the offline mini world, end to end, on CPU processes, over seeds.

    python run_scripts/run_mini.py [--seeds 0 1 2] [--nproc 2] [--model-type mini] [--output-dir output/evlgen/mini]
                                   [--reevaluate]

Prepares what is missing (worlds, converted ViT, connector init, in-house text LM, under
$EVLGEN_CACHE), then per seed trains, evaluates captions (val, test) with scene-grounded scores and
zero-shot VQA (test), and evaluates the same checkpoint blind; prints and writes the mean ± std
over seeds to OUTPUT_DIR/summary.{md,json}. See lavis_evlgen/experiments/mini.py.
"""
import argparse
import sys
from pathlib import Path

from lavis_evlgen.common.jobs import REPO_ROOT
from lavis_evlgen.experiments.mini import run_main_job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="training and world seeds, one run each (default 0 1 2; one seed for a quick look)")
    parser.add_argument("--nproc", type=int, default=2, help="CPU processes per job (torch.distributed.run)")
    parser.add_argument("--model-type", default="mini", help="evlgen_vicuna model type: mini | mini_smollm2")
    parser.add_argument("--output-dir", type=Path, default=REPO_ROOT / "output/evlgen/mini")
    parser.add_argument("--options", nargs="*", default=[],
                        help="overrides for the caption jobs (training and evaluation); model.* ones also for VQA")
    parser.add_argument("--vqa-options", nargs="*", default=[], help="overrides for the VQA evaluations")
    parser.add_argument("--reevaluate", action="store_true",
                        help="evaluate finished seeds' checkpoints again with today's evaluation settings (no training)")
    args = parser.parse_args()
    run_main_job(args.seeds, args.model_type, args.nproc, args.output_dir.resolve(), args.options, args.vqa_options,
                 command=" ".join(["python", "run_scripts/run_mini.py", *sys.argv[1:]]), reevaluate=args.reevaluate)


if __name__ == "__main__":
    main()
