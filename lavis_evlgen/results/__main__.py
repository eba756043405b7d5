"""python -m lavis_evlgen.results: the paper's tables from the evaluation outputs of any set of runs.

    python -m lavis_evlgen.results [SUMMARY ...] [--run TABLE.ROW[:BENCHMARK]=DIR ...]
        [--paper docs/paper_results.yaml] [--out output/results]

SUMMARY: a mini comparison's results.json or a main job's summary.json (or their directory).
--run: a LAVIS run directory and the cell it fills, e.g. zero_shot_main.evlgen_55m:coco=DIR
(benchmarks per table: see --list). Writes OUT/results.md and OUT/results.json and prints the markdown.
"""
import argparse
import json
from pathlib import Path

from lavis_evlgen.results import paper as paper_tables
from lavis_evlgen.results import sources, tables


def listing() -> str:
    """Tables, row keys and benchmarks that --run accepts."""
    lines = []
    for table in paper_tables.TABLES.values():
        lines.append(f"{table.key}: {table.title}")
        lines.append(f"  rows: {', '.join(table.rows)}")
        for key, b in table.benchmarks.items():
            where = "log.txt" if b.kind == "train" else f"metrics_{b.split}.json"
            lines.append(f"  benchmark {key}: {b.kind}, {where} -> {', '.join(table.columns[c] for c in b.cells)}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("summaries", nargs="*", type=Path, help="mini comparison results.json / main job summary.json")
    parser.add_argument("--run", action="append", default=[], metavar="TABLE.ROW[:BENCHMARK]=DIR",
                        help="a LAVIS run directory and the cell it fills (repeat; the same cell again: another seed)")
    parser.add_argument("--paper", type=Path, default=paper_tables.PAPER_RESULTS, help="the paper's numbers (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("output/results"), help="where results.md/.json go (default: %(default)s)")
    parser.add_argument("--list", action="store_true", help="print the tables, rows and benchmarks --run accepts")
    args = parser.parse_args(argv)
    if args.list:
        print(listing())
        return {}
    if not args.summaries and not args.run:
        parser.error("give at least one SUMMARY or --run")
    paper = paper_tables.load_paper(args.paper)
    inputs = [sources.from_summary(path, paper) for path in args.summaries]
    inputs += [sources.from_run_dir(spec) for spec in args.run]
    result = tables.build(inputs, paper, sources.shown(args.paper))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    (args.out / "results.md").write_text(tables.markdown(result))
    print(tables.markdown(result), end="")
    print(f"written: {args.out / 'results.md'}, {args.out / 'results.json'}")
    return result


if __name__ == "__main__":
    main()
