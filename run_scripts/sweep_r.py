"""The r trade-off: EVLGen's connector options against the soft-prompt count, on the offline mini world.

    python run_scripts/sweep_r.py [--seeds 0 1 2] [--tokens 65 49 33 29 17] [--layers 3 6] [--depth-tokens 29]
        [--max-iters N] [--no-feature-cache] [--nproc 2] [--config CFG.yaml]
        [--output-dir output/sweep_r/mini] [--results-dir DIR] [--options KEY=VALUE ...]

Writes results.md / results.json / r_sweep.png (mean ± std over seeds) to --results-dir.
What it runs and reports: lavis_evlgen/experiments/sweep.py.
"""
import argparse
from pathlib import Path

from lavis_evlgen.common.jobs import REPO_ROOT
from lavis_evlgen.experiments.command import add_experiment_arguments, parse_experiment_arguments
from lavis_evlgen.experiments.sweep import budget_options, run_sweep


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_experiment_arguments(parser, REPO_ROOT / "output/sweep_r/mini", "r_sweep.png")
    parser.add_argument("--tokens", type=int, nargs="+", default=[65, 49, 33, 29, 17],
                        help="soft-prompt counts of the merging and pooling points at the config's depth")
    parser.add_argument("--layers", type=int, nargs="*", default=[3, 6],
                        help="other TomeFormer depths, each merging down to --depth-tokens")
    parser.add_argument("--depth-tokens", type=int, default=29, help="where the --layers points end")
    parser.add_argument("--max-iters", type=int, help="training steps per point (default: the config's)")
    parser.add_argument("--feature-cache", action=argparse.BooleanOptionalAction, default=True,
                        help="read the frozen ViT's tokens from the feature cache (run.feature_cache)")
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "projects/compare/mini/evlgen_two_layers.yaml",
                        help="the base training config every point overrides")
    args = parse_experiment_arguments(parser, argv)
    if args.max_iters is not None and args.max_iters < 1:
        parser.error(f"--max-iters must be positive, got {args.max_iters}")
    args.config = args.config.resolve()
    args.options = budget_options(args.config, args.options, args.max_iters, args.feature_cache)
    return run_sweep(args)


if __name__ == "__main__":
    main()
