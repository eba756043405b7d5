"""The paper's MSR-VTT table (msrvtt_captioning) in miniature, on the offline mini video world.

    python run_scripts/video_mini.py (--main-job-dir output/evlgen/mini | --image-checkpoint CKPT ...)
        [--seeds 0 1 2] [--nproc 2] [--config-dir projects/video/mini] [--output-dir output/video/mini]
        [--results-dir DIR] [--options KEY=VALUE ...]

Writes results.md / results.json / video_table.png (mean ± std over seeds) to --results-dir.
What it runs and reports, and what it costs: lavis_evlgen/experiments/video.py.
"""
import argparse
from pathlib import Path

from lavis_evlgen.common.jobs import REPO_ROOT
from lavis_evlgen.experiments.command import add_experiment_arguments, parse_experiment_arguments
from lavis_evlgen.experiments.video import run_video_table


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_experiment_arguments(parser, REPO_ROOT / "output/video/mini", "video_table.png")
    checkpoints = parser.add_mutually_exclusive_group(required=True)
    checkpoints.add_argument("--image-checkpoint", type=Path, nargs="+",
                             help="EVLGen-image checkpoints (evlgen_vicuna mini), one per seed in --seeds order")
    checkpoints.add_argument("--main-job-dir", type=Path,
                             help="output dir of run_scripts/run_mini.py holding seed<k>/ for every seed")
    parser.add_argument("--config-dir", type=Path, default=REPO_ROOT / "projects/video/mini")
    args = parse_experiment_arguments(parser, argv)
    args.config_dir = args.config_dir.resolve()
    return run_video_table(args)


if __name__ == "__main__":
    main()
