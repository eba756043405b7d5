"""``python -m lavis_evlgen.bench [--size tiny|mini|paper] [--steps N] ... [--out DIR]``.

Options are ``BenchConfig``'s fields (defaults there). mini/tiny: timing, memory, generation and
MACs of built models -> DIR/bench.{json,md}; paper: connector MACs at the paper's sizes -> DIR/macs.{json,md}.
"""
import argparse
import dataclasses
import logging
import shlex
import sys
from pathlib import Path

import lavis_evlgen  # noqa: F401  (registers the models)
from lavis_evlgen.bench.run import BenchConfig, bench_table, macs_table, paper_macs, run_bench, stage1_text, \
    targets_text, write_outputs


def parse_args(argv: list[str]) -> BenchConfig:
    parser = argparse.ArgumentParser(prog="python -m lavis_evlgen.bench",
                                     description="EVLGen vs BLIP-2, side by side (README, Performance).")
    for f in dataclasses.fields(BenchConfig):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if isinstance(default, list):
            parser.add_argument(f"--{f.name.replace('_', '-')}", nargs="+", default=default, help=f"default: {default}")
        else:
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(default), default=default,
                                help=f"default: {default}")
    return BenchConfig(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = parse_args(argv)
    command = shlex.join(["python", "-m", "lavis_evlgen.bench", *argv])
    if config.size == "paper":
        result = paper_macs()
        print(macs_table(result), stage1_text(result), sep="\n\n")
    else:
        result = run_bench(config)
        print(bench_table(result))
    print("\nTargets:\n" + targets_text(result["targets"]))
    write_outputs(result, Path(config.out), command)
    print(f"written to {config.out}/")


if __name__ == "__main__":
    main()
