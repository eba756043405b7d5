"""Run one row of the paper's tables (README, "Paper scale"): its config under projects/evlgen/paper/
through torch.distributed.run, train.py for training rows, evaluate.py for eval/ rows.

    python run_scripts/paper_row.py ROW [--nproc 8] [--options key=value ...]
    python run_scripts/paper_row.py --list
"""
import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "projects/evlgen/paper"


def rows() -> list[str]:
    """Every row config (layers/ holds partial configs, not rows)."""
    return sorted(str(p.relative_to(PAPER).with_suffix("")) for p in PAPER.rglob("*.yaml") if "layers" not in p.parts)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("row", nargs="?", help="a row, e.g. pretrain_opt2.7b_250k or eval/opt2.7b/coco")
    parser.add_argument("--nproc", type=int, default=8, help="processes (GPUs) (default: 8, the paper's)")
    parser.add_argument("--options", nargs="+", default=[], help="config overrides, as key=value")
    parser.add_argument("--list", action="store_true", help="print the rows and exit")
    args = parser.parse_args(argv)
    if args.list or args.row is None:
        print("\n".join(rows()))
        return
    if args.row not in rows():
        parser.error(f"unknown row {args.row!r}; rows: {rows()}")
    script = "evaluate.py" if args.row.startswith("eval/") else "train.py"
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", str(REPO / script),
               "--cfg-path", str(PAPER / f"{args.row}.yaml"), *(["--options", *args.options] if args.options else [])]
    print(" ".join(command), flush=True)
    os.execv(sys.executable, command)


if __name__ == "__main__":
    main()
