"""The benchmark suite: every workload (--all) or one, then the table and plots.

    python bench/run.py --all --quick                # a smoke run of every workload
    python bench/run.py --workload small-card        # one workload, as `hetero bench --workload small-card`
    python bench/run.py --report-only                # rebuild summary.md and the plots from the JSON
"""

from __future__ import annotations

import argparse
import sys

from hetero.bench_cli import add_arguments, run
from hetero.errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="every workload, one after the other")
    add_arguments(parser, workload_required=False)
    args = parser.parse_args(argv)
    if not (args.all or args.workload or args.report_only):
        parser.error("give --all, --workload NAME or --report-only")
    from suite.workloads import WORKLOADS

    try:
        return run(args, list(WORKLOADS) if args.all else None, program="python bench/run.py")
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"bench/run.py: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
