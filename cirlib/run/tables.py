"""The paper's tables from every finished run under an outputs root (what notebook 11 does), from the shell.

    python -m cirlib.tables outputs [--out figures/] [--format md|latex|csv|all] [--runs a,b] [--published FILE|none]

Prints each dataset's table in Markdown (published rows, then ours: stage I beside stage II, each linking to its run
folder and commit) and every run folder left out with the reason (unfinished, not evaluated, damaged, stale), then
writes `table_<dataset>.{md,tex,csv}`, `tables_runs.csv` (every collected row), `tables_skipped.csv` and
`tables.provenance.json` into --out (default: figures/, next to the figures). Relative paths are taken from the
repository, as the notebooks' settings are. Exit 0, or 2 with one line when the outputs root holds no run folders or
a setting is wrong.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cirlib.workbook import tables
from cirlib.workbook.config import TablesConfig


def config_of(args: argparse.Namespace) -> TablesConfig:
    """The notebook's config from the command line's arguments."""
    return TablesConfig(runs=args.runs, formats=args.format, published=args.published,
                        figures_dir=str(args.out) if args.out else "", outputs=str(args.outputs_root))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outputs_root", type=Path, help="the outputs root holding stage1/ and stage2/ (e.g. outputs)")
    parser.add_argument("--out", type=Path, default=None, help="where the tables go (default: figures/)")
    parser.add_argument("--format", default="all", help="md, latex, csv (comma-separated) or all (default)")
    parser.add_argument("--runs", default="", help="only these run folders (comma-separated names; default: all)")
    parser.add_argument("--published", default="",
                        help="published-results YAML (default: the packaged one; none: no published rows)")
    args = parser.parse_args(argv)
    try:
        cfg = config_of(args)
        collection = tables.collect_runs(cfg)
        sys.stdout.write(tables.report(cfg, collection))
        written = tables.write_tables(cfg, collection)
    except (tables.TablesError, FileNotFoundError, ValueError) as err:
        print(f"tables failed: {err}", file=sys.stderr)
        return 2
    print("\nwrote " + ", ".join(tables._shown(p) for p in written))
    return 0
