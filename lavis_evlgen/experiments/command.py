"""The command line every experiment script shares (run_scripts/compare_mini.py, sweep_r.py,
video_mini.py): seeds, processes per job, where the runs and the results go, job overrides; parsed
with the seeds checked and the command kept for the results' record (``report.summary_header``)."""
import argparse
import sys
from pathlib import Path


def add_experiment_arguments(parser: argparse.ArgumentParser, output_dir: Path, figure: str,
                             options_help: str = "overrides for every job (key=value)") -> None:
    """--seeds, --nproc, --output-dir (default ``output_dir``), --results-dir (results.{md,json} and
    ``figure``; default: the output dir) and --options."""
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training and world seeds")
    parser.add_argument("--nproc", type=int, default=2, help="CPU processes per job (torch.distributed.run)")
    parser.add_argument("--output-dir", type=Path, default=output_dir)
    parser.add_argument("--results-dir", type=Path, help=f"where results.{{md,json}} and {figure} go (default: output dir)")
    parser.add_argument("--options", nargs="*", default=[], help=options_help)


def parse_experiment_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The parsed arguments, with distinct seeds (else the parser's error), ``argv`` (the command line
    after the script) and absolute ``output_dir`` and ``results_dir``."""
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct, got {args.seeds}")
    args.argv = sys.argv[1:] if argv is None else list(argv)
    args.output_dir = args.output_dir.resolve()
    args.results_dir = (args.results_dir or args.output_dir).resolve()
    return args
