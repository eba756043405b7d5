"""Soak: N short train + evaluate cycles in one process, resident memory after each.

    python -m lavis_evlgen.soak [--cycles 5] [--max-growth-mb 64] [--cfg-path projects/evlgen/tiny/caption.yaml]

Each cycle builds config, datasets, model and runner from scratch (train.py's ``build_runner``),
trains ``run.max_epoch`` (1 by default here) with validation and test, and drops everything. A
leak (a cache, hook, registry entry or tensor kept per run) shows as resident memory that keeps
rising; the first ``--warmup`` cycles are left out (lazy imports, allocator pools, the first
compiled kernels). Exits 1 when memory after the last cycle exceeds that after the warm-up by
more than ``--max-growth-mb``.
"""
import argparse
import gc
import os
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "projects/evlgen/tiny/caption.yaml"


def resident_mb() -> float:
    """This process's resident set size now, in MiB (from /proc/self/statm)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def growth_mb(rss: list[float], warmup: int) -> float:
    """Resident memory after the last cycle minus after the warm-up cycles (0 if too few cycles)."""
    if len(rss) <= warmup:
        return 0.0
    return rss[-1] - rss[warmup - 1] if warmup else rss[-1] - rss[0]


def run_cycle(cfg_path: Path, output_dir: Path, options: list[str]) -> None:
    """One train + evaluate run, all of it dropped afterwards."""
    import train  # the repository's train.py (on sys.path: see main)

    runner = train.build_runner(["--cfg-path", str(cfg_path), "--options", f"run.output_dir={output_dir}", *options])
    runner.train()
    del runner
    gc.collect()


def soak(cycles: int, cfg_path: Path, options: list[str], warmup: int, log=print) -> list[float]:
    """Runs ``cycles`` cycles; returns resident MiB after each."""
    rss = []
    with tempfile.TemporaryDirectory(prefix="evlgen-soak-") as out:
        for cycle in range(cycles):
            run_cycle(cfg_path, Path(out), options)
            rss.append(resident_mb())
            note = " (warm-up)" if cycle < warmup else f", {growth_mb(rss, warmup):+.1f} MiB since warm-up"
            log(f"soak cycle {cycle + 1}/{cycles}: resident {rss[-1]:.1f} MiB{note}")
    return rss


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=5, help="train + evaluate cycles")
    parser.add_argument("--warmup", type=int, default=2, help="first cycles left out of the growth")
    parser.add_argument("--max-growth-mb", type=float, default=64.0, help="allowed growth after the warm-up, MiB")
    parser.add_argument("--cfg-path", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--options", nargs="*", default=["run.max_epoch=1"], help="train.py overrides, key=value")
    args = parser.parse_args(argv)
    if args.cycles <= args.warmup:
        parser.error(f"--cycles ({args.cycles}) must exceed --warmup ({args.warmup})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO_ROOT))
    rss = soak(args.cycles, args.cfg_path, args.options, args.warmup)
    growth = growth_mb(rss, args.warmup)
    verdict = "FAIL" if growth > args.max_growth_mb else "ok"
    print(f"soak {verdict}: {growth:+.1f} MiB over {args.cycles - args.warmup} cycles after the warm-up "
          f"(bound {args.max_growth_mb} MiB); per cycle: {', '.join(f'{m:.1f}' for m in rss)}")
    return 1 if verdict == "FAIL" else 0


if __name__ == "__main__":
    sys.exit(main())
