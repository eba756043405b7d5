"""The paper's main comparison (BLIP-2 vs EVLGen, zero_shot_main) in miniature, on the offline mini world.

    python run_scripts/compare_mini.py [--seeds 0 1 2] [--rows ROW ...] [--nproc 2]
        [--output-dir output/compare/mini] [--results-dir DIR] [--target-fraction 0.95]
        [--options KEY=VALUE ...] [--vqa-options KEY=VALUE ...] [--reference EARLIER/results.json]

Writes results.md / results.json / convergence.png (mean ± std over seeds) to --results-dir.
What it runs and reports: lavis_evlgen/experiments/compare.py.
"""
import argparse
from pathlib import Path

from lavis_evlgen.common.jobs import REPO_ROOT
from lavis_evlgen.experiments.command import add_experiment_arguments, parse_experiment_arguments
from lavis_evlgen.experiments.compare import ROWS, run_comparison


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_experiment_arguments(parser, REPO_ROOT / "output/compare/mini", "convergence.png",
                             options_help="overrides for every caption job (key=value)")
    parser.add_argument("--config-dir", type=Path, default=REPO_ROOT / "projects/compare/mini")
    parser.add_argument("--vqa-config", type=Path, default=REPO_ROOT / "projects/evlgen/mini/vqa.yaml",
                        help="datasets/run sections for the VQA evaluation (its model section is replaced)")
    parser.add_argument("--rows", nargs="+", choices=[r.key for r in ROWS], default=[r.key for r in ROWS])
    parser.add_argument("--target-fraction", type=float, default=0.95)
    parser.add_argument("--reference", type=Path,
                        help="an earlier results.json whose BLIP-2 two-stage row sets the target when this run has none")
    parser.add_argument("--vqa-options", nargs="*", default=[], help="overrides for the VQA evaluations")
    args = parse_experiment_arguments(parser, argv)
    args.config_dir = args.config_dir.resolve()
    args.reference = args.reference.resolve() if args.reference else None
    return run_comparison([r for r in ROWS if r.key in args.rows], args)


if __name__ == "__main__":
    main()
